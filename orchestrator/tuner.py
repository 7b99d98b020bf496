"""The sweep's Ray Tune Tuner, new or restored: what it explores (the grid, or an Optuna search),
the ASHA scheduler, the trainable with each variant's resources, and the callbacks."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Repeater, Searcher
from ray.tune.search.optuna import OptunaSearch

from mosaic_core.metrics import STEP
from orchestrator.launch import holds_tune_state
from orchestrator.progress import TrialProgress
from orchestrator.sweep_folder import OPTUNA_DB, TUNE, SweepFolder, sqlite_uri
from orchestrator.tracking.callback import SweepTracker
from orchestrator.trainables import sweep_trainable
from orchestrator.trial_configs import VARIANT
from orchestrator.tune_state import TuneStateBackup
from search_spaces.schema import Search, Sweep

log = logging.getLogger(__name__)

_DOMAINS = {
    "uniform": lambda low, high: tune.uniform(low, high),
    "loguniform": lambda low, high: tune.loguniform(low, high),
    # Tune's upper bound is exclusive
    "int": lambda low, high: tune.randint(int(low), int(high) + 1),
    "logint": lambda low, high: tune.lograndint(int(low), int(high) + 1),
}


def tuner(
    sweep: Sweep,
    folder: SweepFolder,
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    max_concurrent: int | None,
    verbose: bool,
) -> tune.Tuner:
    """Tune's Tuner: restored, with the run config, callbacks, searcher and scheduler the sweep left,
    when the folder holds Tune state; new otherwise."""
    configs = folder.configs()
    resources = {
        name: sweep.resources.model_copy(
            update={"workers": folder.launch.workers.get(name, sweep.resources.workers)}
        )
        for name in configs
    }
    trainable = sweep_trainable(configs, resources, folder.launch.tune_path, sweep.max_failures)
    if holds_tune_state(folder.launch):
        if max_concurrent is not None:
            log.warning(
                "--max-concurrent applies to new sweeps; Tune restores a sweep with its first settings"
            )
        return tune.Tuner.restore(folder.launch.tune_path, trainable=trainable, resume_errored=True)
    callbacks = [
        SweepTracker(client, experiment_id, parent_id, folder, configs),
        TrialProgress(folder.launch.trials, configs, folder.path),
    ]
    if folder.launch.tune_state_backup is not None:
        callbacks.append(
            TuneStateBackup(str(folder.launch.tune_state_backup), folder.launch.tune_path)
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep, list(configs)),
        tune_config=_tune_config(sweep, folder, max_concurrent),
        run_config=tune.RunConfig(
            name=TUNE,
            storage_path=folder.launch.storage_path,
            callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=2 if verbose else 0,
        ),
    )


def _tune_config(sweep: Sweep, folder: SweepFolder, max_concurrent: int | None) -> tune.TuneConfig:
    return tune.TuneConfig(
        search_alg=search_algorithm(sweep, folder.path),
        scheduler=scheduler(sweep),
        num_samples=folder.launch.trials if sweep.search else 1,
        max_concurrent_trials=max_concurrent,
        # GPU trials each in a fresh process, so their GPU memory goes back when they end; CPU
        # trials reuse their processes (a fresh one costs ~4 s of imports: bench/RESULTS.md),
        # unless some drive Ray Train runs, whose workers must end with their trial
        reuse_actors=sweep.resources.gpu == 0
        and max(folder.launch.workers.values(), default=1) == 1,
        trial_dirname_creator=lambda trial: trial.trial_id,
    )


def param_space(sweep: Sweep, variants: list[str]) -> dict[str, Any]:
    """Tune's param_space: a grid over the variants, or the search's distributions."""
    if sweep.search is None:
        return {VARIANT: tune.grid_search(variants)}
    space: dict[str, Any] = {VARIANT: tune.choice(variants) if len(variants) > 1 else variants[0]}
    for key, distribution in sweep.search.space.items():
        ((kind, values),) = distribution.items()
        space[key] = tune.choice(values) if kind == "choice" else _DOMAINS[kind](*values)
    return space


def scheduler(sweep: Sweep) -> TrialScheduler:
    """ASHA over training steps when the sweep file asks for it; otherwise every trial runs to the end."""
    if sweep.scheduler is None:
        return FIFOScheduler()
    metric, mode = sweep.metric
    return ASHAScheduler(
        time_attr=STEP,
        metric=metric,
        mode=mode,
        max_t=_max_steps(sweep),
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def _max_steps(sweep: Sweep) -> int:
    """The steps of the longest trial: ASHA's max_t, which a scheduler needs all trials to share."""
    return max(trial.config.train.max_steps for trial in sweep.trials)


class SeedRepeater(Repeater):
    """Ray's Repeater (each suggestion trained once per seed; the searcher gets the mean of the
    seeds' last values), except that a suggestion with a seed the scheduler stopped before
    `max_steps` reaches the searcher with no value, which Optuna records as PRUNED: its seeds'
    last values come from different budgets, and their mean would mix them."""

    def __init__(self, searcher: Searcher, repeat: int, max_steps: int) -> None:
        super().__init__(searcher, repeat=repeat)
        self.max_steps = max_steps
        self.pruned: set[str] = set()  # primary trial ids of suggestions with a seed stopped early

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """The first seed's evaluations as the study's intermediate values at their training step,
        so that optuna-dashboard draws learning curves (Repeater forwards none)."""
        group = self._trial_id_to_group.get(trial_id)
        metric = self.searcher.metric
        if group is None or trial_id != group.primary_trial_id or metric not in result:
            return
        value = {metric: result[metric], TRAINING_ITERATION: int(result[STEP])}
        self.searcher.on_trial_result(trial_id, value)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The mean of the seeds' values once all are in; PRUNED (see above); a suggestion whose
        seeds all failed as failed (Repeater would pass the mean of no value, NaN, with numpy's and
        Optuna's warnings)."""
        group = self._trial_id_to_group.get(trial_id)
        if group is None:
            super().on_trial_complete(trial_id, result, **kwargs)
            return
        step = (result or {}).get(STEP)
        if step is not None and step < self.max_steps:
            self.pruned.add(group.primary_trial_id)
        group.report(trial_id, (result or {}).get(self.searcher.metric, math.nan))
        if not group.finished_reporting():
            return
        values = [value for value in group.scores() if not math.isnan(value)]
        if group.primary_trial_id in self.pruned:
            self.searcher.on_trial_complete(group.primary_trial_id, result=None, **kwargs)
        elif not values:
            self.searcher.on_trial_complete(group.primary_trial_id, **{**kwargs, "error": True})
        else:
            mean = {self.searcher.metric: sum(values) / len(values)}
            self.searcher.on_trial_complete(group.primary_trial_id, result=mean, **kwargs)


def optuna_storage_url(search: Search, sweep_dir: Path) -> str:
    """The study lives beside the results, so `--resume` continues it (or in the database the file names)."""
    return search.storage or sqlite_uri(sweep_dir / OPTUNA_DB)


def search_algorithm(sweep: Sweep, sweep_dir: Path) -> Searcher | None:
    """OptunaSearch with a persistent study (named after the sweep), each suggestion repeated per
    seed; the study sees the mean over the seeds of each suggestion's last value, or PRUNED where
    the scheduler stopped one of them early."""
    if sweep.search is None:
        return None
    optuna.logging.set_verbosity(logging.getLogger().getEffectiveLevel())  # quiet unless -v
    search = sweep.search
    sampler = (
        optuna.samplers.TPESampler(seed=search.sampler_seed)
        if search.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=search.sampler_seed)
    )
    storage = optuna.storages.RDBStorage(optuna_storage_url(search, sweep_dir))
    # the study first, to name its objective after the metric (optuna-dashboard's "Objective 0")
    direction = "minimize" if search.mode == "min" else "maximize"
    study = optuna.create_study(
        storage=storage, study_name=sweep.name, direction=direction, load_if_exists=True
    )
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what the dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([search.metric])
    optuna_search = OptunaSearch(
        metric=search.metric,
        mode=search.mode,
        sampler=sampler,
        storage=storage,
        study_name=sweep.name,
    )
    # Tune's searcher checkpoint keeps its seed groups
    return SeedRepeater(optuna_search, repeat=search.seeds, max_steps=_max_steps(sweep))

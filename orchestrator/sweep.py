"""Run a validated sweep through Ray Tune: one trial per expanded config, tracked in MLflow."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_spaces.schema import Sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: Path
    table_markdown: str
    parent_run_id: str
    tracking_uri: str
    trials_by_status: dict[str, int]


def prepare_output_dir(sweep_dir: Path, overwrite: bool, what: str = "a sweep") -> None:
    """Refuse to mix two runs in one folder; with `overwrite`, keep the old one aside, never delete it."""
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{sweep_dir} already holds {what}; pass --resume to continue it, --overwrite to start again "
                f"(the old folder is kept as a backup), or --out another folder"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = sweep_dir.with_name(f"{sweep_dir.name}.bak-{stamp}")
        n = 1
        while backup.exists():
            backup = sweep_dir.with_name(f"{sweep_dir.name}.bak-{stamp}-{n}")
            n += 1
        shutil.move(sweep_dir, backup)
        log.warning("moved the existing %s to %s", sweep_dir, backup)
    sweep_dir.mkdir(parents=True, exist_ok=True)


def with_absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Data folders relative to where the sweep was launched: Tune runs trials in other folders."""
    task = dict(config["task"])
    for key in ("data_dir", "ood_data_dir"):
        if task.get(key):
            task[key] = str(Path(task[key]).resolve())
    return {**config, "task": task}


def _sweep_tables(sweep: Sweep, results: Any) -> list[tuple[str, str, Any]]:
    """(layout, title, table numbers) for each task family in the sweep that has results: the
    paper's table for it (Table 2, Table 1, losses per depth), each trial at the paper's model
    selection, which the title names."""
    from analysis.tables import LAYOUTS, caption, table_stats

    families = {trial.config.task.name for trial in sweep.trials}
    tables = []
    for layout in LAYOUTS.values():
        if families & layout.tasks:
            try:
                stats = table_stats(results, by=layout.by, planned_seeds=sweep.planned_seeds, row_order=sweep.kernel_labels)
            except ValueError:  # nothing reported for this layout (every trial failed early)
                continue
            tables.append((layout.by, f"{sweep.name}: {caption(layout, stats.select)}", stats))
    return tables


def write_tables(sweep: Sweep, results: Any, sweep_dir: Path) -> tuple[str, list[Path]]:
    """table.md (printed at the end of a run), and table-<layout>.tex / .csv beside it; for a
    search, the suggestions ranked by the search's metric."""
    from analysis.tables import markdown_cells, search_ranking, to_csv, to_latex, to_markdown

    if sweep.search is not None:
        metric, mode = sweep.metric
        ranking = search_ranking(results, metric, mode)
        markdown = to_markdown(ranking, title=f"{sweep.name}: suggestions by {metric} ({mode}), mean over seeds",
                               index_header="Suggestion")
        written = [sweep_dir / "table.md", sweep_dir / "table-search.csv"]
        written[0].write_text(markdown + "\n")
        ranking.to_csv(written[1])
        return markdown, written
    tables = _sweep_tables(sweep, results)
    markdown = "\n".join(to_markdown(markdown_cells(stats), title=title) for _, title, stats in tables)
    written = [sweep_dir / "table.md"]
    written[0].write_text(markdown + "\n")
    for by, _, stats in tables:
        for suffix, render in ((".tex", to_latex), (".csv", to_csv)):
            path = sweep_dir / f"table-{by}{suffix}"
            path.write_text(render(stats))
            written.append(path)
    return markdown, written


def _run_trial(config: dict[str, Any], configs: dict[str, dict[str, Any]]) -> None:
    """The Ray Tune function trainable: one `train_trial`, reporting through `ray.tune.report`.

    Tune's config holds only the variant's short name and any searched values (readable in its
    progress table); the variants' full configs are shipped once through the object store.
    """
    from ray import tune

    from mosaic_core.train import train_trial
    from orchestrator.data_parallel import use_ray_share
    from orchestrator.search import validated_trial_config

    placement = use_ray_share()  # Ray's CPUs are logical: torch keeps inside its share

    def report(metrics: dict[str, float], checkpoint_dir: str) -> None:
        tune.report({**metrics, **placement}, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    full_config = validated_trial_config(config, configs)
    checkpoint = tune.get_checkpoint()  # set when Tune restarts this trial after a failure or a resume
    if checkpoint is None:
        train_trial(full_config, report=report)
    else:
        with checkpoint.as_directory() as directory:
            train_trial(full_config, report=report, resume_from=directory)


LAUNCH = "launch.json"  # where the sweep's Tune state and MLflow store are, so --resume finds them


def _storage_path(storage: str | None, sweep_dir: Path) -> str:
    """Tune's storage_path: the sweep folder locally; `<storage>/<sweep folder name>` on shared storage."""
    if storage is None:
        return str(sweep_dir.resolve())
    if "://" in storage:
        return f"{storage.rstrip('/')}/{sweep_dir.name}"
    return str(Path(storage).resolve() / sweep_dir.name)


def run_sweep(sweep: Sweep, sweep_dir: Path, tracking_uri: str, *, overwrite: bool = False, resume: bool = False,
              verbose: bool = False, address: str | None = None, storage: str | None = None,
              max_concurrent: int | None = None) -> SweepOutcome:
    """Run every trial of `sweep` on Ray (this machine, or the cluster at `address`); return the summary table.

    With `resume`, continue the sweep in `sweep_dir` through `Tuner.restore`: finished trials are
    not run again, interrupted ones continue from their last checkpoint, errored ones retry; the
    MLflow parent and child runs, the Tune storage and the Optuna study of the first invocation are reused.
    """
    from orchestrator.resources import PlacementError, check_fits, connect

    launch_file = sweep_dir / LAUNCH
    if resume:
        if not launch_file.is_file():
            raise FileNotFoundError(f"{sweep_dir} holds no sweep to resume; run it without --resume first")
        launch = json.loads(launch_file.read_text())
        if tracking_uri != launch["tracking_uri"]:
            log.warning("resuming with the sweep's own MLflow store %s", launch["tracking_uri"])
        if max_concurrent is not None:
            log.warning("--max-concurrent applies to new sweeps; Tune restores a sweep with its first settings")
        tracking_uri, storage_path, num_trials = launch["tracking_uri"], launch["storage_path"], launch["trials"]
    else:
        storage_path, num_trials = _storage_path(storage, sweep_dir), sweep.num_trials
        if storage is not None and _holds_tune_state(storage_path):
            raise FileExistsError(f"{storage_path} already holds the Tune state of a sweep named like {sweep_dir.name}; "
                                  "give --out another folder name, or pass --resume to continue that sweep")
        prepare_output_dir(sweep_dir, overwrite)  # before Ray starts: a folder in use is refused at once
    cluster = connect(address, verbose)
    if cluster.needs_shared_storage and storage is None and not resume:
        nodes = f"has {len(cluster.nodes)} nodes" if len(cluster.nodes) > 1 else "adds nodes as it scales"
        raise PlacementError(f"{cluster.where} {nodes}: trials need shared storage for their checkpoints; "
                             f"pass --storage with a path every node sees, or s3://bucket/prefix")
    check_fits(sweep.widest, cluster)
    return _tune(sweep, sweep_dir, tracking_uri, storage_path, num_trials, resume=resume, verbose=verbose,
                 max_concurrent=max_concurrent)


def _tune_path(storage_path: str) -> str:
    """Tune's experiment folder (RunConfig name "tune") under the storage path."""
    return f"{storage_path}/tune"


def _holds_tune_state(storage_path: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(_tune_path(storage_path))


def _tune(sweep: Sweep, sweep_dir: Path, tracking_uri: str, storage_path: str, num_trials: int, *, resume: bool,
          verbose: bool, max_concurrent: int | None) -> SweepOutcome:
    """Ray is up and the trials fit: the MLflow parent run, the Tuner (new or restored), the tables."""
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus
    from ray import tune

    from analysis.plots import make_plots
    from analysis.results_store import read_results, trial_states
    from orchestrator.data_parallel import sweep_trainable
    from orchestrator.progress import TrialProgress
    from orchestrator.search import param_space, scheduler, search_algorithm
    from orchestrator.tracking import SweepTracker, end_unfinished_runs, load_run_map, save_run_map

    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)  # importing mlflow reset it
    if not verbose:  # Tune's new output engine prints its set-up box at any verbosity; the classic one obeys 0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # short trials checkpoint often: Tune's advice to checkpoint less is noise here
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tune_path = _tune_path(storage_path)
    configs_file = sweep_dir / "trials.json"
    if resume:
        run_map = load_run_map(sweep_dir)
        if not (configs_file.is_file() and run_map and tune.Tuner.can_restore(tune_path)):
            raise FileNotFoundError(f"{sweep_dir} holds no sweep to resume; run it without --resume first")
        client = MlflowClient(tracking_uri=tracking_uri)
        configs = json.loads(configs_file.read_text())  # as first expanded: an edited sweep file cannot derail it
        parent_id = run_map["parent"]
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
        workers = json.loads((sweep_dir / LAUNCH).read_text()).get("workers", {})  # as first launched
    else:
        workers = {trial.describe(): sweep.trial_resources(trial).workers for trial in sweep.trials}
        (sweep_dir / LAUNCH).write_text(json.dumps({"tracking_uri": tracking_uri, "storage_path": storage_path, "trials": num_trials,
                                                    "workers": workers}, indent=1))
        configs = {trial.describe(): with_absolute_paths(trial.config.model_dump()) for trial in sweep.trials}
        configs_file.write_text(json.dumps(configs, indent=1))
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(sweep.name)
        if experiment is None:
            artifacts = (sweep_dir.parent / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(sweep.name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        parent = client.create_run(experiment_id, run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={"sweep_dir": str(sweep_dir.resolve()), "mlflow.note.content": sweep.description})
        parent_id = parent.info.run_id
        save_run_map(sweep_dir, parent_id, {})  # before any trial: a resume always finds its parent
    status = RunStatus.FAILED
    try:
        resources = {name: sweep.resources.model_copy(update={"workers": workers.get(name, 1)}) for name in configs}
        trainable = sweep_trainable(_run_trial, configs, resources, tune_path, sweep.max_failures)
        if resume:  # Tune restores its run config, callbacks, searcher and scheduler as the sweep left them
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(sweep, list(configs)),
                tune_config=tune.TuneConfig(
                    search_alg=search_algorithm(sweep, sweep_dir), scheduler=scheduler(sweep),
                    num_samples=num_trials if sweep.search else 1, max_concurrent_trials=max_concurrent,
                    # GPU trials each in a fresh process, so their GPU memory goes back when they end; CPU
                    # trials reuse their processes (a fresh one costs ~4 s of imports: bench/RESULTS.md),
                    # unless some drive Ray Train runs, whose workers must end with their trial
                    reuse_actors=sweep.resources.gpu == 0 and max(workers.values(), default=1) == 1,
                    trial_dirname_creator=lambda trial: trial.trial_id,
                ),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=storage_path,
                    callbacks=[SweepTracker(client, experiment_id, parent_id, sweep_dir, configs),
                               TrialProgress(num_trials, configs, sweep_dir)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                    verbose=2 if verbose else 0,
                ),
            )
        tuner.fit()  # returns early, its state saved, after Ctrl-C
        # what the tracker recorded, not Tune's statuses: Tune marks the trials it stopped on Ctrl-C TERMINATED
        results = read_results(sweep_dir)
        states = trial_states(results)
        done = {state: states[state] for state in ("TERMINATED", "ERROR") if states.get(state)}
        unfinished = num_trials - sum(done.values())
        trials_by_status = {**done, **({"UNFINISHED": unfinished} if unfinished else {})}
        markdown, table_files = write_tables(sweep, results, sweep_dir)
        for path in table_files:
            client.log_artifact(parent_id, str(path))
        plots = make_plots(results, sweep_dir / "plots")
        if plots:
            client.log_artifacts(parent_id, str(sweep_dir / "plots"), artifact_path="plots")
        status = RunStatus.KILLED if unfinished else RunStatus.FAILED if "ERROR" in done else RunStatus.FINISHED
        return SweepOutcome(sweep_dir, markdown, parent_id, tracking_uri, trials_by_status)
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:  # the runs of trials still RUNNING: their processes are gone (or were stopped, when KILLED)
        end_unfinished_runs(client, sweep_dir, RunStatus.to_string(RunStatus.KILLED if status == RunStatus.KILLED
                                                                    else RunStatus.FAILED))
        client.set_terminated(parent_id, status=RunStatus.to_string(status))

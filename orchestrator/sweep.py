"""Run a validated sweep through Ray Tune: one trial per expanded config, tracked in MLflow."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.schema import TrialStatus
from orchestrator.sweep_folder import (
    LAUNCH,
    LaunchRecord,
    RunMap,
    SweepFolder,
    SweepFolderError,
    storage_path,
)
from search_spaces.schema import Sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: Path
    table_markdown: str
    parent_run_id: str
    tracking_uri: str
    trials_by_status: dict[TrialStatus, int]  # the trials that ended: TERMINATED, ERROR
    unfinished: int = 0  # planned trials that have not ended (interrupted, or never started)


def new_sweep_folder(
    sweep: Sweep, sweep_dir: Path, tracking_uri: str, storage: str | None, overwrite: bool
) -> SweepFolder:
    """The folder of a new sweep, holding its launch record and its expanded trials."""
    launch = LaunchRecord(
        tracking_uri=tracking_uri,
        storage_path=storage_path(storage, sweep_dir),
        trials=sweep.num_trials,
        workers={trial.describe(): sweep.trial_resources(trial).workers for trial in sweep.trials},
    )
    if storage is not None and _holds_tune_state(launch):
        raise SweepFolderError(
            f"{launch.storage_path} already holds the Tune state of a sweep named like "
            f"{sweep_dir.name}; give --out another folder name, or pass --resume to continue that sweep"
        )
    configs = {
        trial.describe(): with_absolute_paths(trial.config.model_dump()) for trial in sweep.trials
    }
    replaced = _sweep_in(sweep_dir) if overwrite else None
    backups = set(sweep_dir.parent.glob(f"{sweep_dir.name}.bak-*"))
    folder = SweepFolder.create(sweep_dir, launch, configs, overwrite=overwrite)
    moved = set(sweep_dir.parent.glob(f"{sweep_dir.name}.bak-*")) - backups
    if replaced is not None and moved:
        _tag_moved_parent(replaced, moved.pop())
    return folder


def _sweep_in(sweep_dir: Path) -> SweepFolder | None:
    """The sweep an --overwrite is about to move aside, if the folder holds one."""
    try:
        return SweepFolder.open(sweep_dir) if (sweep_dir / LAUNCH).is_file() else None
    except SweepFolderError:
        return None


def _tag_moved_parent(old: SweepFolder, backup: Path) -> None:
    """The moved sweep's parent run names its new folder, so two sweeps of one name stay apart in MLflow."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run_map = SweepFolder.open(backup).run_map()
        if run_map is not None:
            MlflowClient(tracking_uri=old.launch.tracking_uri).set_tag(
                run_map.parent, "sweep_dir", str(backup.resolve())
            )
    except (
        MlflowException,
        SweepFolderError,
    ) as error:  # a run or store gone since: the backup is all there is
        log.warning("could not tag the moved sweep's MLflow run: %s", error)


def resumable_sweep_folder(sweep_dir: Path) -> SweepFolder:
    """The folder of a sweep to resume: its launch record, its trials and its Tune state are all there."""
    if not (sweep_dir / LAUNCH).is_file():
        raise SweepFolderError(
            f"{sweep_dir} holds no sweep to resume (no {LAUNCH}); run it without --resume first"
        )
    folder = SweepFolder.open(sweep_dir)
    folder.configs()  # read now: a missing or corrupt trials.json is refused before Ray starts
    if not _holds_tune_state(folder.launch):
        raise SweepFolderError(
            f"{sweep_dir} holds no Tune state to resume ({folder.launch.tune_path}); "
            "start it again with --overwrite"
        )
    return folder


def _holds_tune_state(launch: LaunchRecord) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(launch.tune_path)


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
                stats = table_stats(
                    results,
                    by=layout.by,
                    planned_seeds=sweep.planned_seeds,
                    row_order=sweep.kernel_labels,
                )
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
        markdown = to_markdown(
            ranking,
            title=f"{sweep.name}: suggestions by {metric} ({mode}), mean over seeds",
            index_header="Suggestion",
        )
        written = [sweep_dir / "table.md", sweep_dir / "table-search.csv"]
        written[0].write_text(markdown + "\n")
        ranking.to_csv(written[1])
        return markdown, written
    tables = _sweep_tables(sweep, results)
    markdown = "\n".join(
        to_markdown(markdown_cells(stats), title=title) for _, title, stats in tables
    )
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

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = (
            None if checkpoint_dir is None else tune.Checkpoint.from_directory(checkpoint_dir)
        )
        tune.report(
            {**metrics, **placement}, checkpoint=checkpoint
        )  # between evaluations: progress, no checkpoint

    full_config = validated_trial_config(config, configs)
    checkpoint = (
        tune.get_checkpoint()
    )  # set when Tune restarts this trial after a failure or a resume
    if checkpoint is None:
        train_trial(full_config, report=report)
    else:
        with checkpoint.as_directory() as directory:
            train_trial(full_config, report=report, resume_from=directory)


def run_sweep(
    sweep: Sweep,
    folder: SweepFolder,
    *,
    address: str | None = None,
    verbose: bool = False,
    max_concurrent: int | None = None,
    sweep_file: Path | None = None,
) -> SweepOutcome:
    """Run the trials of the sweep in `folder` on Ray (this machine, or the cluster at `address`,
    already joined); return the summary table.

    A folder that holds Tune state is resumed through `Tuner.restore`: finished trials are not run
    again, interrupted ones continue from their last checkpoint, errored ones retry; the MLflow
    parent and child runs, the Tune storage and the Optuna study of the first invocation are reused.
    `sweep_file` goes with the parent run, as an artifact.
    """
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    from orchestrator.resources import connect, resource_plan
    from orchestrator.tracking import end_unfinished_runs

    cluster = connect(
        address, verbose
    )  # Ray starts on this machine only now: everything before was checked without it
    _quiet_logs(verbose)
    client = MlflowClient(tracking_uri=folder.launch.tracking_uri)
    experiment_id, parent_id = _parent_run(
        client, folder, sweep, sweep_file, resource_plan(sweep, cluster, max_concurrent)
    )
    status = RunStatus.FAILED
    try:
        _tuner(
            sweep, folder, client, experiment_id, parent_id, max_concurrent, verbose
        ).fit()  # returns early, state saved, after Ctrl-C
        outcome = _summary(sweep, folder, client, parent_id)
        status = (
            RunStatus.KILLED
            if outcome.unfinished
            else RunStatus.FAILED
            if TrialStatus.ERROR in outcome.trials_by_status
            else RunStatus.FINISHED
        )
        return outcome
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:  # the runs of trials still RUNNING: their processes are gone (or were stopped, when KILLED)
        end_unfinished_runs(
            client,
            folder,
            RunStatus.to_string(
                RunStatus.KILLED if status == RunStatus.KILLED else RunStatus.FAILED
            ),
        )
        client.set_terminated(parent_id, status=RunStatus.to_string(status))


class _ExpectedTrialFailure(logging.Filter):
    """Tune logs the traceback of every failing trial: without -v, the progress line, the MLflow run
    (tag `error`, artifact `error.txt`) and results.parquet tell it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial task failed")


_TUNE_CONTROLLER_LOG = "ray.tune.execution.tune_controller"


def _quiet_logs(verbose: bool) -> None:
    """MLflow's and Tune's chatter only with -v."""
    # progress reports between evaluations (train.log_interval) carry no evaluation metric: ASHA and
    # the search skip results without theirs, and Tune's check that every result has it must too
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    logging.getLogger("mlflow").setLevel(
        logging.INFO if verbose else logging.WARNING
    )  # importing mlflow reset it
    controller = logging.getLogger(_TUNE_CONTROLLER_LOG)
    for old in [f for f in controller.filters if isinstance(f, _ExpectedTrialFailure)]:
        controller.removeFilter(old)
    if not verbose:
        controller.addFilter(_ExpectedTrialFailure())
        # Tune's new output engine prints its set-up box at any verbosity; the classic one obeys 0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # short trials checkpoint often: Tune's advice to checkpoint less is noise here
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _parent_run(
    client: Any, folder: SweepFolder, sweep: Sweep, sweep_file: Path | None, plan: list[str]
) -> tuple[str, str]:
    """(experiment id, parent run id): the sweep's parent run, created on its first invocation with
    what the sweep ran from (`describe_parent_run`), and RUNNING again on a resume."""
    from mlflow.entities import RunStatus

    from orchestrator.tracking import (
        EXPERIMENT_KIND_TAG,
        MODEL_TRAINING,
        NOTE_TAG,
        describe_parent_run,
    )

    run_map = folder.run_map()
    if run_map is not None:
        client.update_run(run_map.parent, status=RunStatus.to_string(RunStatus.RUNNING))
        return client.get_run(run_map.parent).info.experiment_id, run_map.parent
    experiment = client.get_experiment_by_name(sweep.name)
    if experiment is None:
        artifacts = (folder.path.parent / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(sweep.name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    parent = client.create_run(
        experiment_id,
        run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"sweep_dir": str(folder.path.resolve()), NOTE_TAG: sweep.description},
    )
    folder.save_run_map(
        RunMap(parent=parent.info.run_id)
    )  # before any trial: a resume always finds its parent
    describe_parent_run(client, parent.info.run_id, sweep_file, plan)
    return experiment_id, parent.info.run_id


def _tuner(
    sweep: Sweep,
    folder: SweepFolder,
    client: Any,
    experiment_id: str,
    parent_id: str,
    max_concurrent: int | None,
    verbose: bool,
) -> Any:
    """Tune's Tuner: restored, with the run config, callbacks, searcher and scheduler the sweep left,
    when the folder holds Tune state; new otherwise."""
    from ray import tune

    from orchestrator.data_parallel import sweep_trainable

    configs = folder.configs()
    resources = {
        name: sweep.resources.model_copy(
            update={"workers": folder.launch.workers.get(name, sweep.resources.workers)}
        )
        for name in configs
    }
    trainable = sweep_trainable(
        _run_trial, configs, resources, folder.launch.tune_path, sweep.max_failures
    )
    if _holds_tune_state(folder.launch):
        if max_concurrent is not None:
            log.warning(
                "--max-concurrent applies to new sweeps; Tune restores a sweep with its first settings"
            )
        return tune.Tuner.restore(folder.launch.tune_path, trainable=trainable, resume_errored=True)
    from orchestrator.progress import TrialProgress
    from orchestrator.search import param_space
    from orchestrator.tracking import SweepTracker

    callbacks = [
        SweepTracker(client, experiment_id, parent_id, folder, configs),
        TrialProgress(folder.launch.trials, configs, folder.path),
    ]
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep, list(configs)),
        tune_config=_tune_config(sweep, folder, max_concurrent),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=folder.launch.storage_path,
            callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=2 if verbose else 0,
        ),
    )


def _tune_config(sweep: Sweep, folder: SweepFolder, max_concurrent: int | None) -> Any:
    from ray import tune

    from orchestrator.search import scheduler, search_algorithm

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


def _summary(sweep: Sweep, folder: SweepFolder, client: Any, parent_id: str) -> SweepOutcome:
    """Trials by state, from what the tracker recorded (Tune marks the trials it stopped on Ctrl-C
    TERMINATED); the tables and plots, also as artifacts of the parent run."""
    from analysis.plots import make_plots
    from analysis.results_store import read_results, trial_states
    from orchestrator.tracking import NOTE_TAG

    results = read_results(folder.path)
    states = trial_states(results)
    ended = {
        state: states[state]
        for state in (TrialStatus.TERMINATED, TrialStatus.ERROR)
        if states.get(state)
    }
    markdown, table_files = write_tables(sweep, results, folder.path)
    for path in table_files:
        client.log_artifact(parent_id, str(path))
    client.set_tag(
        parent_id, NOTE_TAG, f"{sweep.description}\n\n{markdown}".strip()
    )  # the run's description
    if make_plots(results, folder.path / "plots"):
        client.log_artifacts(parent_id, str(folder.path / "plots"), artifact_path="plots")
    return SweepOutcome(
        folder.path,
        markdown,
        parent_id,
        folder.launch.tracking_uri,
        ended,
        unfinished=folder.launch.trials - sum(ended.values()),
    )

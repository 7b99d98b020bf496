"""Every call to MLflow's client: the sweep's parent run and its trials' child runs.

One experiment per sweep name, one parent run per invocation, one child run per trial (tag
`PARENT_TAG`). Logging happens in the driver only, so a SQLite tracking store has a single writing
process. A reviewer can check a sweep from its runs: the parent carries the sweep file, the code's
commit, the package versions and the resource plan; each child run has the system metrics (CPU,
memory, GPU) of the machine its trial ran on, sampled by MLflow's monitor in the driver.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from analysis.tables import rendered_markdown
from mosaic_core.metrics import STEP, length_metric_name, parse_head_metric
from orchestrator.sweep_folder import MLFLOW_ARTIFACTS, RunMap, SweepFolder, SweepFolderError
from orchestrator.tracking.names import (
    DIAGNOSTICS_DIR,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    KERNEL_LABEL_TAG,
    MODEL_TRAINING,
    NOTE_TAG,
    OVERRIDES_TAG,
    PARENT_TAG,
    RESOURCE_PLAN_TAG,
    RUNNING,
    SWEEP_DIR_TAG,
    SYSTEM_METRIC_PREFIX,
    TRIAL_ID_TAG,
    VERSION_TAG_PREFIX,
    diagnostics_step,
    diagnostics_table,
)

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

VERSIONED_PACKAGES = ("torch", "ray", "mlflow", "triton", "adasplash")
# MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
SYSTEM_METRICS_INTERVAL_S = 10.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# how long a busy store is waited for (SQLite waits 20 s itself on each attempt), and the most
# time between two attempts
BUSY_STORE_PATIENCE_S = 180.0
BUSY_STORE_MAX_DELAY_S = 20.0
# another process holds the SQLite store's lock: it ends; anything else (a full disk) does not
_BUSY = ("database is locked", "database table is locked")


def retried(function: F) -> F:
    """`function` called again, with backoff, while the MLflow store is busy (SQLite's `database
    is locked`: another process writes to it), for up to BUSY_STORE_PATIENCE_S: a lock of a
    minute does not end a sweep. A busy SQLite store rolls the write back, so calling again
    writes it once. The one retry wrapper: every function here that writes or reads the store."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        deadline, delay = time.monotonic() + BUSY_STORE_PATIENCE_S, 1.0
        while True:
            try:
                return function(*args, **kwargs)
            except MlflowException as error:
                if not any(busy in str(error) for busy in _BUSY):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("the MLflow store is locked by another process: again in %.0f s", delay)
                time.sleep(delay)
                delay = min(2 * delay, BUSY_STORE_MAX_DELAY_S)

    return call  # type: ignore[return-value]


def missing_run(error: MlflowException) -> bool:
    """Whether MLflow's error says the run (or its store) is not there."""
    return error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


@retried
def all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """Every run of the experiment that matches the filter, page after page."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


# ---------------------------------------------------------------------------------------------
# the parent run: one per invocation of a sweep


@retried
def open_parent_run(
    client: MlflowClient,
    folder: SweepFolder,
    name: str,
    description: str,
    sweep_file: Path | None,
    plan: list[str],
) -> tuple[str, str]:
    """(experiment id, parent run id): the sweep's parent run, created on its first invocation with
    what the sweep ran from (`describe_parent_run`), and RUNNING again on a resume. A resume whose
    store lost the run (its database deleted or moved) gets a new parent run, with a line saying
    so; the sweep's tracker re-logs the trials' runs from the results store."""
    run_map = folder.run_map()
    if run_map is not None:
        try:
            client.update_run(run_map.parent, status=RUNNING)
            return client.get_run(run_map.parent).info.experiment_id, run_map.parent
        except MlflowException as error:
            if not missing_run(error):
                raise
        log.warning(
            "the MLflow store %s holds no run %s (deleted or moved?): the sweep's runs are "
            "logged again from its results store",
            folder.launch.tracking_uri,
            run_map.parent,
        )
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifacts = (folder.path.parent / MLFLOW_ARTIFACTS).resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    overrides = (
        {OVERRIDES_TAG: " ".join(folder.launch.overrides)} if folder.launch.overrides else {}
    )
    parent = client.create_run(
        experiment_id,
        run_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={SWEEP_DIR_TAG: str(folder.path.resolve()), NOTE_TAG: description, **overrides},
    )
    # before any trial: a resume always finds its parent (the trials' runs of a lost store: none)
    folder.save_run_map(RunMap(parent=parent.info.run_id))
    describe_parent_run(client, parent.info.run_id, sweep_file, plan)
    return experiment_id, parent.info.run_id


def package_versions() -> dict[str, str]:
    """`version.<package>` -> version, for those installed; read from their metadata, none imported."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[f"{VERSION_TAG_PREFIX}{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The commit of the checkout the code runs from, and whether tracked files differ from it;
    nothing when the code is not a git checkout of its own (an installed package)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    try:
        top, commit = git("rev-parse", "--show-toplevel", "HEAD").split()
        if Path(top).resolve() != root.resolve():
            return {}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return {GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: str(dirty).lower()}


def describe_parent_run(
    client: MlflowClient, run_id: str, sweep_file: Path | None, plan: list[str]
) -> None:
    """What a reviewer needs to trust a sweep's numbers: its file, the code's commit, the package
    versions and how its trials were placed."""
    tags = {**git_commit(), **package_versions(), RESOURCE_PLAN_TAG: "\n".join(plan)}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    if sweep_file is not None:
        client.log_artifact(run_id, str(sweep_file))


@retried
def log_sweep_outputs(
    client: MlflowClient, run_id: str, files: list[Path], note: str, plots: Path | None
) -> None:
    """The sweep's tables (and plots folder) as artifacts of its parent run, the table in its note."""
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_tag(run_id, NOTE_TAG, rendered_markdown(note))
    if plots is not None:
        client.log_artifacts(run_id, str(plots), artifact_path=plots.name)


@retried
def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    """The run ends with an MLflow status (FINISHED, FAILED, KILLED)."""
    client.set_terminated(run_id, status=status)


@retried
def end_unfinished_runs(
    client: MlflowClient, folder: SweepFolder, status: str, reason: str | None = None
) -> list[str]:
    """End every child run still RUNNING once Tune is done (FAILED, or KILLED after Ctrl-C): its
    trial's process is gone; `reason`, where the sweep stopped for one, as the run's error tag.
    The parent's children as MLflow holds them count too: a full disk can keep a new run out of
    the run map."""
    run_map = folder.run_map() or RunMap(parent="")
    known = set(run_map.trials.values())
    if run_map.parent:
        experiment_id = client.get_run(run_map.parent).info.experiment_id
        known |= set(child_runs(client, experiment_id, run_map.parent).values())
    stuck = [run_id for run_id in sorted(known) if client.get_run(run_id).info.status == RUNNING]
    for run_id in stuck:
        if reason is not None:
            client.set_tag(run_id, ERROR_TAG, reason)
        client.set_terminated(run_id, status=status)
    return stuck


def tag_moved_parent(old: SweepFolder, backup: Path) -> None:
    """The moved sweep's parent run names its new folder, so two sweeps of one name stay apart in MLflow."""
    try:
        run_map = SweepFolder.open(backup).run_map()
        if run_map is not None:
            MlflowClient(tracking_uri=old.launch.tracking_uri).set_tag(
                run_map.parent, SWEEP_DIR_TAG, str(backup.resolve())
            )
    # a run or store gone since: the backup is all there is
    except (MlflowException, SweepFolderError) as error:
        log.warning("could not tag the moved sweep's MLflow run: %s", error)


@retried
def experiment_of(tracking_uri: str, run_id: str) -> str:
    """The experiment id of a run; MlflowException when the store has no such run."""
    return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id


# ---------------------------------------------------------------------------------------------
# a trial's child run


@retried
def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of the parent run's child runs, as MLflow holds them."""
    runs = all_runs(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return {
        run.data.tags[TRIAL_ID_TAG]: run.info.run_id
        for run in runs
        if TRIAL_ID_TAG in run.data.tags
    }


@retried
def start_child_run(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    name: str,
    kernel_label: str,
) -> str:
    """A new child run of the parent run for one trial; its id."""
    tags = {PARENT_TAG: parent_run_id, TRIAL_ID_TAG: trial_id, KERNEL_LABEL_TAG: kernel_label}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@retried
def log_params(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    """The trial's flattened config as params (MLflow takes identical params again)."""
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in values.items()])


@retried
def reopen_run(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """A restarted trial's run RUNNING again; (metric, step) of every point it holds of what the
    trial reports (not MLflow's `system/…`), and (`DIAGNOSTICS_DIR`, step) of each diagnostics
    table it holds."""
    client.update_run(run_id, status=RUNNING)
    tables = client.list_artifacts(run_id, DIAGNOSTICS_DIR)
    return {(key, step) for key, step, _ in _points(client, run_id)} | {
        (DIAGNOSTICS_DIR, diagnostics_step(table.path)) for table in tables
    }


@retried
def metric_points(client: MlflowClient, run_id: str) -> list[tuple[str, int, float]]:
    """(metric, step, value) of every point the run holds of what its trial reports (not MLflow's
    `system/…`), by step: what rebuilds the trial's results rows when their file was lost."""
    return _points(client, run_id)


def _points(client: MlflowClient, run_id: str) -> list[tuple[str, int, float]]:
    metrics = client.get_run(run_id).data.metrics
    keys = [key for key in metrics if not key.startswith(SYSTEM_METRIC_PREFIX)]
    points = [
        (key, m.step, m.value) for key in keys for m in client.get_metric_history(run_id, key)
    ]
    return sorted(points, key=lambda point: (point[1], point[0]))


@retried
def run_status(client: MlflowClient, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return client.get_run(run_id).info.status


@retried
def log_points(client: MlflowClient, run_id: str, rows: list[dict[str, Any]]) -> None:
    """The finite values of results rows as the run's metric points, as the trial reported them,
    but those the run holds: what brings a trial's run up to its rows after its writes were lost
    (a driver killed with writes still queued, or the MLflow store lost)."""
    now = int(time.time() * 1000)
    held = {(key, step) for key, step, _ in _points(client, run_id)}
    metrics = [
        Metric(_metric_key(row["metric"], row["length_factor"]), row["value"], now, row["step"])
        for row in rows
        if row["metric"] is not None
        and row["value"] is not None
        and math.isfinite(row["value"])
        and (_metric_key(row["metric"], row["length_factor"]), row["step"]) not in held
    ]
    # MLflow takes at most 1000 metrics in one batch
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _metric_key(metric: str, length_factor: float | None) -> str:
    """The name the trial reported a results row's metric by: `exact_match_2x`, `train_loss`."""
    return metric if length_factor is None else length_metric_name(metric, length_factor)


@retried
def log_new_points(
    client: MlflowClient,
    run_id: str,
    metrics: dict[str, float],
    step: int,
    logged: set[tuple[str, int]],
) -> None:
    """Log the finite points not in `logged` yet (a restarted trial repeats steps), and add them;
    an evaluation's per-head diagnostics go to its table (`log_diagnostics`) instead, once (MLflow
    appends the rows of a table logged again)."""
    heads = {key: head for key in metrics if (head := parse_head_metric(key)) is not None}
    if heads and (DIAGNOSTICS_DIR, step) not in logged:
        log_diagnostics(client, run_id, {head: metrics[key] for key, head in heads.items()}, step)
        logged.add((DIAGNOSTICS_DIR, step))
    now = int(time.time() * 1000)
    new = [
        Metric(key, value, now, step)
        for key, value in metrics.items()
        if key != STEP and key not in heads and math.isfinite(value) and (key, step) not in logged
    ]
    if new:
        client.log_batch(run_id, metrics=new)
        logged.update((metric.key, step) for metric in new)


@retried
def log_diagnostics(
    client: MlflowClient, run_id: str, heads: dict[tuple[str, int, int], float], step: int
) -> None:
    """Per-head diagnostics (`support_size/l0h3`) as one MLflow table per evaluation, a row per
    layer and head (`diagnostics/step_000010.json`), not as metrics: MLflow 3.17's run page puts
    each `name/…` group of charts in a section of its own before every other metric."""
    rows: dict[tuple[int, int], dict[str, float]] = {}
    for (name, layer, head), value in heads.items():
        rows.setdefault((layer, head), {"layer": layer, "head": head})[name] = value
    table = pd.DataFrame([rows[key] for key in sorted(rows)])
    client.log_table(run_id, table, diagnostics_table(step))


@retried
def tag_run(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


@retried
def fail_run(client: MlflowClient, run_id: str, error: str, error_file: str | None) -> None:
    """A failed trial's run: its error line as a tag, its whole traceback as an artifact."""
    client.set_tag(run_id, ERROR_TAG, error)
    if error_file and Path(error_file).is_file():
        client.log_artifact(run_id, error_file)


def system_metrics(run_id: str, tracking_uri: str) -> SystemMetricsMonitor:
    """MLflow's system metrics (`system/…`: CPU, memory, disk, network, each NVIDIA GPU) of this
    machine into the run, from a thread that samples every SYSTEM_METRICS_INTERVAL_S once started."""
    return SystemMetricsMonitor(
        run_id,
        sampling_interval=SYSTEM_METRICS_INTERVAL_S,
        resume_logging=True,
        tracking_uri=tracking_uri,
    )

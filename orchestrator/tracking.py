"""MLflow tracking and the results store, fed from the Ray Tune driver.

One experiment per sweep name, one parent run per invocation, one child run per trial (tag
`mlflow.parentRunId`). Logging happens in the driver only, so a SQLite tracking store has a single
writing process. Ray's own MLflowLoggerCallback makes flat runs and leaves them RUNNING when a trial
dies; this callback nests them and always ends them.

A reviewer can check a sweep from its runs: the parent carries the sweep file, the code's commit,
the package versions and the resource plan; each child run has the system metrics (CPU, memory,
GPU) of the machine its trial ran on, sampled by MLflow's monitor in the driver.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from pydantic import ValidationError
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS

from analysis.mlflow_source import PARENT_TAG, TRIAL_ID_TAG, all_runs
from analysis.results_store import read_trial_rows, write_trial_rows
from analysis.schema import TYPED_CONFIG, TrialStatus, config_json, varied_keys
from mosaic_core.config import TrialConfig, flatten
from mosaic_core.kernels import kernel_label
from mosaic_core.metrics import parse_metric_name
from orchestrator.search import VARIANT, searched_values, trial_config, trial_name
from orchestrator.sweep_folder import RunMap, SweepFolder

_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint"}
_ROW_IDENTITY = ("trial_id", "status", "mlflow_run_id", "error")  # set when rows are written
_PLACEMENT_KEYS = (
    "hostname",
    "node_ip",
    "pid",
    "cuda_visible_devices",
)  # Tune's own, and our trainable's

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# the experiment is model training, not GenAI: MLflow's experiment-kind tag, which 3.17's UI reads
# only with its workflow switch off; `mosaic-sweep ui` links past the switch (orchestrator/mlflow_ui)
MODEL_TRAINING = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's description in MLflow's UI (Markdown)
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own name: the run page shows it
VERSIONED_PACKAGES = ("torch", "ray", "mlflow", "triton", "adasplash")
SYSTEM_METRICS_INTERVAL_S = (
    10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_tracking_uri(sweeps_dir: Path) -> str:
    """`--mlflow-uri`, else MLFLOW_TRACKING_URI, else a SQLite file beside the sweep folders."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{sweeps_dir.resolve() / 'mlflow.db'}"
    )


def reported_metrics(result: dict[str, Any]) -> dict[str, float]:
    """What the trial itself reported, without the bookkeeping keys Ray Tune adds."""
    return {
        key: float(value)
        for key, value in result.items()
        if key not in _TUNE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def trial_columns(config: TrialConfig) -> dict[str, Any]:
    """The results-store columns that identify a trial's place in the grid: the typed ones."""
    flat = flatten(config.model_dump())
    columns = {column: flat.get(key) for column, key in TYPED_CONFIG.items()}
    if columns["k"] is not None:  # kernel parameters are floats in the config
        columns["k"] = int(columns["k"])
    return {
        **columns,
        "kernel_label": kernel_label(config.model.kernel, **config.model.kernel_params),
        "seed": config.seed,
    }


def package_versions() -> dict[str, str]:
    """`version.<package>` -> version, for those installed; read from their metadata, none imported."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[f"version.{package}"] = importlib.metadata.version(package)
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
    return {GIT_COMMIT_TAG: commit, "git.dirty": str(dirty).lower()}


def describe_parent_run(
    client: MlflowClient, run_id: str, sweep_file: Path | None, plan: list[str]
) -> None:
    """What a reviewer needs to trust a sweep's numbers: its file, the code's commit, the package
    versions and how its trials were placed."""
    tags = {**git_commit(), **package_versions(), "resource_plan": "\n".join(plan)}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    if sweep_file is not None:
        client.log_artifact(run_id, str(sweep_file))


def end_unfinished_runs(
    client: MlflowClient, folder: SweepFolder, status: str = "FAILED"
) -> list[str]:
    """End every child run still RUNNING once Tune is done (FAILED, or KILLED after Ctrl-C): its trial's process is gone."""
    run_map = folder.run_map() or RunMap(parent="")
    stuck = [
        run_id
        for run_id in run_map.trials.values()
        if client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING)
    ]
    for run_id in stuck:
        client.set_terminated(run_id, status=status)
    return stuck


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of the parent run's child runs, as MLflow holds them."""
    runs = all_runs(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return {
        run.data.tags[TRIAL_ID_TAG]: run.info.run_id
        for run in runs
        if TRIAL_ID_TAG in run.data.tags
    }


def logged_points(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """(metric, step) of every point the run holds of what trials report (not MLflow's `system/…`)."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


class SweepTracker(Callback):
    """Ray Tune callback: child MLflow runs and results-store rows for every trial of a sweep.

    Its memory lives in the sweep folder (the trial → run map, the results store) and in MLflow,
    not in this object: Tune restores callbacks as they were pickled when the sweep began, so a
    resumed sweep reads back which runs, rows and metric points exist and reuses them instead of
    duplicating them, even those a driver killed between two writes left in one store only.
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        parent_run_id: str,
        folder: SweepFolder,
        configs: dict[str, dict[str, Any]],
    ) -> None:
        self.client = client
        self.configs = configs
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.folder = folder
        self.sweep_dir = folder.path
        self.run_ids: dict[str, str] = {}
        self.unmapped: dict[str, str] = {}  # trial id -> child run missing from the run map
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.logged: dict[str, set[tuple[str, int]]] = {}  # (metric, step) in each trial's run
        self.placed: set[str] = set()  # trials whose current process has told where it runs
        self.monitors: dict[
            str, SystemMetricsMonitor
        ] = {}  # threads: made after Tune pickled this callback
        self.node_ip = ""

    def setup(self, **info: Any) -> None:
        from ray.util import get_node_ip_address

        self.run_ids = (self.folder.run_map() or RunMap(parent=self.parent_run_id)).trials
        self.unmapped = {  # made by a driver killed before it saved the run map
            trial_id: run_id
            for trial_id, run_id in child_runs(
                self.client, self.experiment_id, self.parent_run_id
            ).items()
            if trial_id not in self.run_ids
        }
        self.monitors, self.node_ip = (
            {},
            get_node_ip_address(),
        )  # also for a tracker pickled by older code

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:  # no result reached its run yet
            run_id = self._child_run(trial)
            self.logged[trial.trial_id] = set()
        else:  # a trial Tune restarts (retry or resume): same run, the points and rows it has
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.logged[trial.trial_id] = logged_points(self.client, run_id)
        self._monitor(trial.trial_id, run_id)
        self.placed.discard(trial.trial_id)
        earlier = read_trial_rows(self.sweep_dir, trial.trial_id)
        self.rows[trial.trial_id] = [
            {key: row[key] for key in row if key not in _ROW_IDENTITY}
            for row in earlier
            if row["metric"] is not None
        ]

    def _child_run(self, trial: Trial) -> str:
        """The trial's child run with its params, saved in the run map: made now, or the one a
        killed driver made before it could save the map (MLflow takes identical params again)."""
        config = self._config(trial)
        run_id = (
            self.unmapped.pop(trial.trial_id, None)
            or self.client.create_run(
                self.experiment_id,
                run_name=trial_name(trial.config),
                tags={
                    PARENT_TAG: self.parent_run_id,
                    TRIAL_ID_TAG: trial.trial_id,
                    "kernel_label": kernel_label(config.model.kernel, **config.model.kernel_params),
                },
            ).info.run_id
        )
        values = {**flatten(config.model_dump()), **searched_values(trial.config)}
        self.client.log_batch(run_id, params=[Param(key, str(v)) for key, v in values.items()])
        self.run_ids[trial.trial_id] = run_id
        self.folder.save_run_map(RunMap(parent=self.parent_run_id, trials=self.run_ids))
        return run_id

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        metrics = reported_metrics(result)
        step = int(metrics.get("step", result.get("training_iteration", 0)))
        rows = self.rows[trial.trial_id]
        run_id = self.run_ids[trial.trial_id]
        if trial.trial_id not in self.placed:
            self._place(trial.trial_id, run_id, result)
        self._log_new_points(trial.trial_id, run_id, metrics, step)
        columns = self._columns(trial)
        for key, value in metrics.items():
            if key == "step":
                continue
            metric, factor = parse_metric_name(key)
            # a trial restarted from a checkpoint reports some steps again: the new value replaces the old
            rows[:] = [
                r
                for r in rows
                if (r["metric"], r["length_factor"], r["step"]) != (metric, factor, step)
            ]
            rows.append(
                {**columns, "metric": metric, "length_factor": factor, "step": step, "value": value}
            )
        self._write_rows(trial, TrialStatus.RUNNING)

    def _log_new_points(
        self, trial_id: str, run_id: str, metrics: dict[str, float], step: int
    ) -> None:
        """Log the points MLflow does not hold yet: a restarted trial repeats steps."""
        logged, now = self.logged[trial_id], int(time.time() * 1000)
        new = [
            Metric(key, value, now, step)
            for key, value in metrics.items()
            if key != "step" and math.isfinite(value) and (key, step) not in logged
        ]
        if new:
            self.client.log_batch(run_id, metrics=new)
            logged.update((metric.key, step) for metric in new)

    def _place(self, trial_id: str, run_id: str, result: dict[str, Any]) -> None:
        """Where the trial runs now (which machine, which GPU); on another machine than the driver's,
        the driver's system metrics are not the trial's, and stop."""
        self.placed.add(trial_id)
        tags = [
            RunTag(f"ray.{key}", str(result[key]))
            for key in _PLACEMENT_KEYS
            if result.get(key) is not None
        ]
        node = result.get("node_ip")
        if node is not None and node != self.node_ip:
            self._stop_monitor(trial_id)
            tags.append(
                RunTag(
                    "system_metrics",
                    f"not sampled: the trial runs on {node}, the driver on {self.node_ip}",
                )
            )
        self.client.log_batch(run_id, tags=tags)

    def _monitor(self, trial_id: str, run_id: str) -> None:
        """MLflow's system metrics (`system/…`: CPU, memory, disk, network, each NVIDIA GPU) of this
        machine into the trial's run, from a thread that samples every SYSTEM_METRICS_INTERVAL_S."""
        self._stop_monitor(trial_id)
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=SYSTEM_METRICS_INTERVAL_S,
            resume_logging=True,
            tracking_uri=self.folder.launch.tracking_uri,
        )
        monitor.start()
        self.monitors[trial_id] = monitor

    def _stop_monitor(self, trial_id: str) -> None:
        monitor = self.monitors.pop(trial_id, None)
        if monitor is not None:
            monitor.finish()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial_id in list(self.monitors):
            self._stop_monitor(trial_id)

    def on_trial_recover(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """Tune retries the trial from its last checkpoint: the run keeps count and the attempt's error."""
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None:
            self.client.log_batch(
                run_id,
                tags=[
                    RunTag("ray.retries", str(trial.num_failures)),
                    RunTag("ray.last_retried_error", _last_error_line(trial)),
                ],
            )

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._end(trial, TrialStatus.TERMINATED, RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        error = _last_error_line(trial)
        self.client.set_tag(run_id, "error", error)
        if trial.error_file and Path(trial.error_file).is_file():
            self.client.log_artifact(run_id, trial.error_file)  # the whole traceback
        self._end(trial, TrialStatus.ERROR, RunStatus.to_string(RunStatus.FAILED), error=error)

    def _end(
        self, trial: Trial, status: TrialStatus, mlflow_status: str, error: str | None = None
    ) -> None:
        self._stop_monitor(trial.trial_id)
        if trial.trial_id not in self.run_ids:
            return
        self.client.set_terminated(self.run_ids[trial.trial_id], status=mlflow_status)
        self._write_rows(trial, status, error)

    def _write_rows(self, trial: Trial, status: TrialStatus, error: str | None = None) -> None:
        """All the trial's rows; a failed trial that never reported still gets one row, with its error."""
        identity = {
            "trial_id": trial.trial_id,
            "status": status,
            "mlflow_run_id": self.run_ids[trial.trial_id],
            "error": error,
        }
        rows = self.rows.get(trial.trial_id) or ([self._columns(trial)] if error else [])
        write_trial_rows(self.sweep_dir, trial.trial_id, [{**row, **identity} for row in rows])

    def _config(self, trial: Trial) -> TrialConfig:
        """The trial's config; the variant's where a suggestion makes an invalid one (that trial fails
        with the reason, and the sweep goes on)."""
        try:
            return TrialConfig.model_validate(trial_config(trial.config, self.configs))
        except ValidationError:
            return TrialConfig.model_validate(self.configs[trial.config[VARIANT]])

    def _columns(self, trial: Trial) -> dict[str, Any]:
        """The results-store columns of the trial's grid point (and suggestion, in a search; with
        several variants, the variant is one of the searched values): the typed ones, and in
        `config` every key the sweep varies (grid, cases, kernels, searched), so the store alone
        tells configurations apart."""
        searched = searched_values(trial.config)
        varied = {*varied_keys(flatten(variant) for variant in self.configs.values()), *searched}
        ran = flatten(
            trial_config(trial.config, self.configs)
        )  # as suggested, even where that is invalid
        if searched and len(self.configs) > 1:
            searched = {VARIANT: trial.config[VARIANT], **searched}
        return {
            **trial_columns(self._config(trial)),
            "searched": json.dumps(searched) if searched else None,
            "config": config_json(ran, varied),
        }


def _last_error_line(trial: Trial) -> str:
    """The exception line of the trial's error file (Tune keeps the whole traceback there)."""
    if trial.error_file and Path(trial.error_file).is_file():
        lines = [
            line for line in Path(trial.error_file).read_text().strip().splitlines() if line.strip()
        ]
        if lines:
            return lines[-1][:5000]
    return "unknown error (the trial's process died)"

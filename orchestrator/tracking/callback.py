"""Ray Tune events -> MLflow child runs (through `runs`) and results-store rows, in the driver.

Ray's own MLflowLoggerCallback makes flat runs and leaves them RUNNING when a trial dies; this
callback nests them under the sweep's parent run and always ends them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from pydantic import ValidationError
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS
from ray.util import get_node_ip_address

from analysis.results_store import read_trial_rows, write_trial_rows
from analysis.schema import TYPED_CONFIG, TrialStatus, config_json, typed_value, varied_keys
from mosaic_core.checkpoint import load_checkpoint
from mosaic_core.config import TrialConfig, flatten
from mosaic_core.kernel_specs import kernel_label
from mosaic_core.metrics import STEP, parse_metric_name
from orchestrator.checkpoint_records import repair_checkpoint_record
from orchestrator.faults import DiskFullError, fills_disk
from orchestrator.sweep_folder import RunMap, SweepFolder
from orchestrator.tracking import runs
from orchestrator.tracking.names import (
    CHECKPOINT_FALLBACK_TAG,
    LAST_RETRIED_ERROR_TAG,
    PLACEMENT_TAG_PREFIX,
    RETRIES_TAG,
    RUN_STATUS,
    STOPPED_TAG,
    SYSTEM_METRICS_TAG,
)
from orchestrator.trainables import resume_point
from orchestrator.trial_configs import VARIANT, searched_values, trial_config, trial_name

log = logging.getLogger(__name__)
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint"}
_ROW_IDENTITY = ("trial_id", "status", "mlflow_run_id", "error")  # set when rows are written
# Tune's own, and our trainable's
_PLACEMENT_KEYS = ("hostname", "node_ip", "pid", "cuda_visible_devices")


def reported_metrics(result: dict[str, Any]) -> dict[str, float]:
    """What the trial itself reported, without the bookkeeping keys Ray Tune adds."""
    return {
        key: float(value)
        for key, value in result.items()
        if key not in _TUNE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def stopped_step(trial: Trial, configs: dict[str, dict[str, Any]]) -> int | None:
    """The step a completed trial ended at, where that is before its `train.max_steps`: the
    scheduler (ASHA) stopped it (Ctrl-C stops trials without completing them); else None."""
    step = reported_metrics(trial.last_result).get(STEP)
    planned = trial_config(trial.config, configs)["train"]["max_steps"]
    return None if step is None or step >= planned else int(step)


def trial_columns(config: TrialConfig) -> dict[str, Any]:
    """The results-store columns that identify a trial's place in the grid: the typed ones."""
    flat = flatten(config.model_dump())
    columns = {column: typed_value(column, flat.get(key)) for column, key in TYPED_CONFIG.items()}
    return {
        **columns,
        "kernel_label": kernel_label(config.model.kernel, **config.model.kernel_params),
        "seed": config.seed,
        "planned_steps": config.train.max_steps,
    }


class SweepTracker(Callback):
    """Ray Tune callback: child MLflow runs and results-store rows for every trial of a sweep.

    Its memory lives in the sweep folder (the trial → run map, the results store) and in MLflow,
    not in this object: Tune restores callbacks as they were pickled when the sweep began, so a
    resumed sweep reads back which runs, rows and metric points exist and reuses them instead of
    duplicating them, even those a driver killed between two writes left in one store only.

    A result's rows reach the results store at once; its MLflow writes queue, in order, on one
    writer thread (`_later`), so a busy MLflow store (waited out by `runs.retried`) holds back
    MLflow alone, not the results; they are all done before the sweep ends.
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
        # whether both stores hold every trial this invocation knows (`_reconcile`)
        self.reconciled = False
        # threads: made after Tune pickled this callback
        self.writer: ThreadPoolExecutor | None = None
        self.writes: list[Future[Any]] = []  # queued MLflow writes, in order
        self.monitors: dict[str, SystemMetricsMonitor] = {}
        self.node_ip = ""

    def setup(self, **info: Any) -> None:
        run_map = self.folder.run_map() or RunMap(parent=self.parent_run_id)
        # a resume whose MLflow store was lost has a new parent run (`runs.open_parent_run`)
        self.parent_run_id, self.run_ids = run_map.parent, run_map.trials
        tracking_uri = self.folder.launch.tracking_uri
        self.experiment_id = runs.experiment_of(tracking_uri, self.parent_run_id)
        self.reconciled = False
        self.writer, self.writes = None, []
        self.unmapped = {  # made by a driver killed before it saved the run map
            trial_id: run_id
            for trial_id, run_id in runs.child_runs(
                self.client, self.experiment_id, self.parent_run_id
            ).items()
            if trial_id not in self.run_ids
        }
        # also for a tracker pickled by older code
        self.monitors, self.node_ip = {}, get_node_ip_address()

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self.reconciled:
            self._reconcile(trials)

    def _reconcile(self, trials: list[Trial]) -> None:
        """Before anything runs, each trial's Tune checkpoint record matched to its folder
        (`repair_checkpoint_record`) and each trial in both stores, however one lost it: rows
        rebuilt from the trial's run where its part file was set aside (`set_aside_unreadable`),
        its run logged again from its rows where the MLflow store was lost (a line for each),
        every other run brought up to its rows."""
        self.reconciled = True
        for trial in trials:
            repaired = repair_checkpoint_record(trial)
            if repaired:
                log.warning("trial %s: %s", trial_name(trial.config, self.configs), repaired)
            rows = read_trial_rows(self.sweep_dir, trial.trial_id)
            run_id = self.run_ids.get(trial.trial_id)
            if run_id is None and rows:
                self._relog_run(trial, rows)
                continue
            if run_id is not None and not rows:
                rows = self._rebuild_rows(trial, run_id)
            # a finished trial neither store holds: Tune runs it no more
            if not rows and trial.status == Trial.TERMINATED:
                rows = self._rows_from_checkpoint(trial)
            if rows:
                self._sync_run(trial, self.run_ids[trial.trial_id], rows)

    def _relog_run(self, trial: Trial, rows: list[dict[str, Any]]) -> None:
        """A new run for a trial the MLflow store lost, from its rows, which then name the run."""
        run_id = self._child_run(trial)
        self._sync_run(trial, run_id, rows)
        write_trial_rows(
            self.sweep_dir, trial.trial_id, [{**row, "mlflow_run_id": run_id} for row in rows]
        )
        name = trial_name(trial.config, self.configs)
        log.warning("trial %s: its MLflow run logged again from the results store", name)

    def _sync_run(self, trial: Trial, run_id: str, rows: list[dict[str, Any]]) -> None:
        """The trial's run brought up to its rows: the points it lacks, and the end of a trial
        whose rows say it ended (writes a killed driver still had queued, or a lost store)."""
        runs.log_points(self.client, run_id, rows)
        status, error = TrialStatus(rows[-1]["status"]), rows[-1]["error"]
        ended = RUN_STATUS[status]
        if status in (TrialStatus.RUNNING, TrialStatus.INTERRUPTED):
            # goes on when Tune restarts the trial (its run RUNNING again then)
            ended = RUN_STATUS[TrialStatus.INTERRUPTED]
        if runs.run_status(self.client, run_id) == ended:
            return
        step = stopped_step(trial, self.configs)
        if status == TrialStatus.STOPPED and step is not None:
            runs.tag_run(self.client, run_id, {STOPPED_TAG: str(step)})
        if error is not None:
            runs.fail_run(self.client, run_id, error, trial.error_file)
        runs.end_run(self.client, run_id, ended)

    def _rebuild_rows(self, trial: Trial, run_id: str) -> list[dict[str, Any]]:
        """The rows of a trial whose part file was set aside, from its run's points (all but
        non-finite values, which MLflow does not keep), as the trial's state in Tune says."""
        columns, rows = self._columns(trial), []
        for key, step, value in runs.metric_points(self.client, run_id):
            metric, factor = parse_metric_name(key)
            rows.append(
                {**columns, "metric": metric, "length_factor": factor, "step": step, "value": value}
            )
        self.rows[trial.trial_id] = rows
        status, error = _tune_status(trial, self.configs), None
        if status == TrialStatus.ERROR:
            error = _last_error_line(trial)
        if not rows and error is None:
            return []
        name = trial_name(trial.config, self.configs)
        log.warning("trial %s: its results rows rebuilt from its MLflow run %s", name, run_id)
        return self._write_rows(trial, status, error)

    def _rows_from_checkpoint(self, trial: Trial) -> list[dict[str, Any]]:
        """The rows of a finished trial whose part file was set aside and whose run holds no
        points, from the metrics its latest readable checkpoint keeps: those of its last
        evaluation, which the tables read (the earlier ones are lost, which the line says)."""
        config = self._config(trial)
        with resume_point(trial.checkpoint, config) as (directory, _):
            if directory is None:
                return []
            metrics = reported_metrics(load_checkpoint(directory, config)["metrics"])
        step, columns = int(metrics.pop(STEP, 0)), self._columns(trial)
        rows = []
        for key, value in metrics.items():
            metric, factor = parse_metric_name(key)
            rows.append(
                {**columns, "metric": metric, "length_factor": factor, "step": step, "value": value}
            )
        if trial.trial_id not in self.run_ids:
            self._child_run(trial)
        self.rows[trial.trial_id] = rows
        name = trial_name(trial.config, self.configs)
        log.warning(
            "trial %s: neither its results rows nor its MLflow run held its points; its step-%d "
            "evaluation is rebuilt from its checkpoint, the earlier ones are lost",
            name,
            step,
        )
        return self._write_rows(trial, _tune_status(trial, self.configs))

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:  # no result reached its run yet
            run_id = self._child_run(trial)
            self.logged[trial.trial_id] = set()
        else:  # a trial Tune restarts (retry or resume): same run, the points and rows it has
            # its queued points in it first
            self._flush()
            self.logged[trial.trial_id] = runs.reopen_run(self.client, run_id)
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
        run_id = self.unmapped.pop(trial.trial_id, None) or runs.start_child_run(
            self.client,
            self.experiment_id,
            self.parent_run_id,
            trial.trial_id,
            trial_name(trial.config, self.configs),
            kernel_label(config.model.kernel, **config.model.kernel_params),
        )
        # a kernel without parameters (softmax) has none to log, not `model.kernel_params: {}`
        flat = {key: value for key, value in flatten(config.model_dump()).items() if value != {}}
        values = {**flat, **searched_values(trial.config)}
        runs.log_params(self.client, run_id, values)
        self.run_ids[trial.trial_id] = run_id
        self.folder.save_run_map(RunMap(parent=self.parent_run_id, trials=self.run_ids))
        return run_id

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        metrics = reported_metrics(result)
        step = int(metrics.get(STEP, result.get("training_iteration", 0)))
        rows = self.rows[trial.trial_id]
        run_id = self.run_ids[trial.trial_id]
        if trial.trial_id not in self.placed:
            self._place(trial.trial_id, run_id, result)
        fallback = result.get(CHECKPOINT_FALLBACK_TAG)
        if fallback:
            log.warning("trial %s: %s", trial_name(trial.config, self.configs), fallback)
            self._later(runs.tag_run, run_id, {CHECKPOINT_FALLBACK_TAG: fallback})
        self._later(runs.log_new_points, run_id, metrics, step, self.logged[trial.trial_id])
        columns = self._columns(trial)
        for key, value in metrics.items():
            if key == STEP:
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

    def _place(self, trial_id: str, run_id: str, result: dict[str, Any]) -> None:
        """Where the trial runs now (which machine, which GPU); on another machine than the driver's,
        the driver's system metrics are not the trial's, and stop."""
        self.placed.add(trial_id)
        tags = {
            f"{PLACEMENT_TAG_PREFIX}{key}": str(result[key])
            for key in _PLACEMENT_KEYS
            if result.get(key) is not None
        }
        node = result.get("node_ip")
        if node is not None and node != self.node_ip:
            self._stop_monitor(trial_id)
            tags[SYSTEM_METRICS_TAG] = (
                f"not sampled: the trial runs on {node}, the driver on {self.node_ip}"
            )
        self._later(runs.tag_run, run_id, tags)

    def _later(self, write: Callable[..., Any], *args: Any) -> None:
        """`write(client, *args)` queued behind the earlier MLflow writes, on the writer thread;
        the first that failed raises here (a full disk or a lost store stops the sweep)."""
        self._raise_failed()
        if self.writer is None:
            self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-writes")
        self.writes.append(self.writer.submit(write, self.client, *args))

    def _raise_failed(self) -> None:
        done = [write for write in self.writes if write.done()]
        self.writes = [write for write in self.writes if not write.done()]
        for write in done:
            write.result()

    def _flush(self) -> None:
        """Every queued MLflow write done (a busy store: waited for); the first that failed raises."""
        writes, self.writes = self.writes, []
        for write in writes:
            write.result()

    def _monitor(self, trial_id: str, run_id: str) -> None:
        """This machine's system metrics into the trial's run (`runs.system_metrics`)."""
        self._stop_monitor(trial_id)
        monitor = runs.system_metrics(run_id, self.folder.launch.tracking_uri)
        monitor.start()
        self.monitors[trial_id] = monitor

    def _stop_monitor(self, trial_id: str) -> None:
        monitor = self.monitors.pop(trial_id, None)
        if monitor is not None:
            monitor.finish()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial_id in list(self.monitors):
            self._stop_monitor(trial_id)
        try:
            self._flush()
        finally:
            if self.writer is not None:
                # its thread ends once idle
                self.writer.shutdown(wait=False)
                self.writer = None
        # a resume with nothing left to run takes no step
        if not self.reconciled:
            self._reconcile(trials)

    def on_trial_recover(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """Tune retries the trial from its last checkpoint: the run keeps count and the attempt's
        error; a full disk, which a retry cannot mend, stops the sweep (`DiskFullError`)."""
        error = _last_error_line(trial)
        if fills_disk(error):
            raise DiskFullError(error)
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None:
            tags = {RETRIES_TAG: str(trial.num_failures), LAST_RETRIED_ERROR_TAG: error}
            self._later(runs.tag_run, run_id, tags)

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        """TERMINATED; STOPPED where the scheduler stopped it early, its run tagged with the step."""
        step = stopped_step(trial, self.configs)
        if step is not None and trial.trial_id in self.run_ids:
            self._later(runs.tag_run, self.run_ids[trial.trial_id], {STOPPED_TAG: str(step)})
        self._end(trial, TrialStatus.TERMINATED if step is None else TrialStatus.STOPPED)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        error = _last_error_line(trial)
        if fills_disk(error):
            raise DiskFullError(error)
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        self._later(runs.fail_run, run_id, error, trial.error_file)
        self._end(trial, TrialStatus.ERROR, error=error)

    def _end(self, trial: Trial, status: TrialStatus, error: str | None = None) -> None:
        self._stop_monitor(trial.trial_id)
        if trial.trial_id not in self.run_ids:
            return
        self._later(runs.end_run, self.run_ids[trial.trial_id], RUN_STATUS[status])
        self._write_rows(trial, status, error)

    def _write_rows(
        self, trial: Trial, status: TrialStatus, error: str | None = None
    ) -> list[dict[str, Any]]:
        """All the trial's rows (returned as written); a failed trial that never reported still
        gets one row, with its error."""
        identity = {
            "trial_id": trial.trial_id,
            "status": status,
            "mlflow_run_id": self.run_ids[trial.trial_id],
            "error": error,
        }
        rows = self.rows.get(trial.trial_id) or ([self._columns(trial)] if error else [])
        written = [{**row, **identity} for row in rows]
        write_trial_rows(self.sweep_dir, trial.trial_id, written)
        return written

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
        # as suggested, even where that is invalid
        ran = flatten(trial_config(trial.config, self.configs))
        if searched and len(self.configs) > 1:
            searched = {VARIANT: trial.config[VARIANT], **searched}
        return {
            **trial_columns(self._config(trial)),
            "searched": json.dumps(searched) if searched else None,
            "config": config_json(ran, varied),
        }


def _tune_status(trial: Trial, configs: dict[str, dict[str, Any]]) -> TrialStatus:
    """The results' status of a trial from its state in Tune: one not ended is INTERRUPTED."""
    if trial.status == Trial.TERMINATED:
        step = stopped_step(trial, configs)
        return TrialStatus.TERMINATED if step is None else TrialStatus.STOPPED
    return TrialStatus.ERROR if trial.status == Trial.ERROR else TrialStatus.INTERRUPTED


def _last_error_line(trial: Trial) -> str:
    """The exception line of the trial's error file (Tune keeps the whole traceback there)."""
    if trial.error_file and Path(trial.error_file).is_file():
        lines = [
            line for line in Path(trial.error_file).read_text().strip().splitlines() if line.strip()
        ]
        if lines:
            return lines[-1][:5000]
    return "unknown error (the trial's process died)"

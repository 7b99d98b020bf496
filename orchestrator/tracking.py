"""MLflow tracking and the results store, fed from the Ray Tune driver.

One experiment per sweep name, one parent run per invocation, one child run per trial (tag
`mlflow.parentRunId`). Logging happens in the driver only, so a SQLite tracking store has a single
writer. Ray's own MLflowLoggerCallback makes flat runs and leaves them RUNNING when a trial dies;
this callback nests them and always ends them.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS

from analysis.results_store import write_trial_rows
from mosaic_core.config import TrialConfig, flatten
from mosaic_core.kernels import kernel_label
from mosaic_core.metrics import parse_metric_name

_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint"}


def default_tracking_uri(sweeps_dir: Path) -> str:
    """`--mlflow-uri`, else MLFLOW_TRACKING_URI, else a SQLite file beside the sweep folders."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{sweeps_dir.resolve() / 'mlflow.db'}"


def reported_metrics(result: dict[str, Any]) -> dict[str, float]:
    """What the trial itself reported, without the bookkeeping keys Ray Tune adds."""
    return {
        key: float(value)
        for key, value in result.items()
        if key not in _TUNE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def trial_columns(config: TrialConfig) -> dict[str, Any]:
    """The results-store columns that identify a trial's place in the grid."""
    params = config.model.kernel_params
    return {
        "task": config.task.name,
        "kernel": config.model.kernel,
        "kernel_label": kernel_label(config.model.kernel, **params),
        "alpha": params.get("alpha"),
        "k": None if params.get("k") is None else int(params["k"]),
        "b": params.get("b"),
        "n_layer": config.model.n_layer,
        "num_examples": getattr(config.task, "num_examples", None),
        "seed": config.seed,
    }


class SweepTracker(Callback):
    """Ray Tune callback: child MLflow runs and results-store rows for every trial of a sweep."""

    def __init__(
        self, client: MlflowClient, experiment_id: str, parent_run_id: str, sweep_dir: Path,
        configs: dict[str, dict[str, Any]],
    ) -> None:
        self.client = client
        self.configs = {variant: TrialConfig.model_validate(config) for variant, config in configs.items()}
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_dir = sweep_dir
        self.run_ids: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        config = self.configs[trial.config["variant"]]
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial.config["variant"],
            tags={"mlflow.parentRunId": self.parent_run_id, "ray.trial_id": trial.trial_id,
                  "kernel_label": kernel_label(config.model.kernel, **config.model.kernel_params)},
        )
        self.run_ids[trial.trial_id] = run.info.run_id
        params = [Param(key, str(value)) for key, value in flatten(config.model_dump()).items()]
        self.client.log_batch(run.info.run_id, params=params)
        self.rows[trial.trial_id] = []
        self._save_run_map()

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any) -> None:
        metrics = reported_metrics(result)
        step = int(metrics.get("step", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        logged = [Metric(key, value, now, step) for key, value in metrics.items() if key != "step" and math.isfinite(value)]
        self.client.log_batch(self.run_ids[trial.trial_id], metrics=logged)
        columns = trial_columns(self.configs[trial.config["variant"]])
        for key, value in metrics.items():
            if key == "step":
                continue
            metric, factor = parse_metric_name(key)
            self.rows[trial.trial_id].append(
                {**columns, "metric": metric, "length_factor": factor, "step": step, "value": value}
            )
        self._write_rows(trial, "RUNNING")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, "TERMINATED", RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None and trial.error_file and Path(trial.error_file).is_file():
            error = Path(trial.error_file).read_text().strip().splitlines()
            self.client.set_tag(run_id, "error", (error[-1] if error else "unknown error")[:5000])
        self._end(trial, "ERROR", RunStatus.to_string(RunStatus.FAILED))

    def _end(self, trial: Trial, status: str, mlflow_status: str) -> None:
        if trial.trial_id not in self.run_ids:
            return
        self.client.set_terminated(self.run_ids[trial.trial_id], status=mlflow_status)
        self._write_rows(trial, status)

    def _write_rows(self, trial: Trial, status: str) -> None:
        run_id = self.run_ids[trial.trial_id]
        rows = [{**row, "trial_id": trial.trial_id, "status": status, "mlflow_run_id": run_id}
                for row in self.rows[trial.trial_id]]
        write_trial_rows(self.sweep_dir, trial.trial_id, rows)

    def _save_run_map(self) -> None:
        """Trial id -> MLflow run id, kept beside the results so a later resume can find its runs."""
        path = self.sweep_dir / "mlflow_runs.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"parent": self.parent_run_id, "trials": self.run_ids}, indent=1))
        os.replace(tmp, path)

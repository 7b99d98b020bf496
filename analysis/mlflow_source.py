"""The results frame rebuilt from MLflow alone, for when the sweep folder is lost or on another machine.

Reads what `orchestrator.tracking.SweepTracker` logs: one child run per trial under the parent run
of a sweep invocation, with the flattened trial config as params, the `kernel_label` tag, and
each reported metric's history (steps included). Non-finite values are not logged to MLflow, so
they are absent here while `results.parquet` keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa
from mlflow import MlflowClient
from mlflow.entities import Run

from analysis.schema import RESULTS_SCHEMA
from mosaic_core.metrics import parse_metric_name

PARENT_TAG = "mlflow.parentRunId"
STATUS = {"FINISHED": "TERMINATED", "FAILED": "ERROR"}
"""MLflow run status -> Ray Tune trial status, as the tracker maps them the other way; other
statuses (RUNNING, KILLED) are kept as they are."""


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def _param(params: dict[str, str], key: str, cast: Callable[[str], Any]) -> Any:
    value = params.get(key)
    return None if value is None else cast(value)


def _int(text: str) -> int:
    """MLflow params are strings; kernel params are floats in the config (`k` logs as "4.0")."""
    return int(float(text))


def _trial_rows(client: MlflowClient, run: Run) -> list[dict[str, Any]]:
    params, tags, run_id = run.data.params, run.data.tags, run.info.run_id
    columns = {
        "trial_id": tags.get("ray.trial_id", run_id),
        "task": params.get("task.name"),
        "kernel": params.get("model.kernel"),
        "kernel_label": tags.get("kernel_label"),
        "alpha": _param(params, "model.kernel_params.alpha", float),
        "k": _param(params, "model.kernel_params.k", _int),
        "b": _param(params, "model.kernel_params.b", float),
        "n_layer": _param(params, "model.n_layer", _int),
        "num_examples": _param(params, "task.num_examples", _int),
        "seed": _param(params, "seed", _int),
        "status": STATUS.get(run.info.status, run.info.status),
        "mlflow_run_id": run_id,
    }
    rows = []
    for key in run.data.metrics:
        metric, factor = parse_metric_name(key)
        rows += [{**columns, "metric": metric, "length_factor": factor, "step": m.step, "value": m.value}
                 for m in client.get_metric_history(run_id, key)]
    return rows


def results_from_mlflow(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """The results frame (RESULT_COLUMNS, dtypes as `read_results`) of the experiment's latest
    sweep invocation: an experiment holds every invocation of a sweep name, a sweep folder one.

    Rows are ordered by trial id and step, so tables list kernel labels in a stable order.
    ValueError when the experiment is missing or holds no sweep.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    runs = _all_runs(client, found.experiment_id)
    parent_ids = {run.data.tags[PARENT_TAG] for run in runs if PARENT_TAG in run.data.tags}
    parents = [run for run in runs if run.info.run_id in parent_ids]
    if not parents:
        raise ValueError(f"MLflow experiment {experiment!r} holds no sweep (no parent run with child runs)")
    latest = max(parents, key=lambda run: run.info.start_time).info.run_id
    trials = [run for run in runs if run.data.tags.get(PARENT_TAG) == latest]
    rows = [row for run in trials for row in _trial_rows(client, run)]
    rows.sort(key=lambda row: (row["trial_id"], row["step"]))
    table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)

"""The results frame rebuilt from MLflow alone, for when the sweep folder is lost or on another machine.

Reads what `orchestrator.tracking` logs, by the names it writes (`orchestrator.tracking.names`): one child run per trial under the parent run
of a sweep invocation, with the flattened trial config as params, the `kernel_label` tag, and
each reported metric's history (steps included). The `config` column holds the params the
invocation's trials differ in, as the tracker's holds the keys the sweep varies. Non-finite values are not logged to MLflow, so
they are absent here while `results.parquet` keeps them; so are the per-head diagnostics
(`support_size/l0h3`), which a run keeps as a table per evaluation rather than as metrics.
"""

from __future__ import annotations

import ast
from typing import Any

import pandas as pd
import pyarrow as pa
from mlflow import MlflowClient
from mlflow.entities import Run

from analysis.schema import (
    RESULTS_SCHEMA,
    SEED_KEY,
    TYPED_CONFIG,
    TrialStatus,
    config_json,
    typed_value,
    varied_keys,
)
from mosaic_core.metrics import parse_metric_name
from orchestrator.tracking.names import (
    KERNEL_LABEL_TAG,
    PARENT_TAG,
    STOPPED_TAG,
    TRIAL_ID_TAG,
    TRIAL_STATUS,
)
from orchestrator.tracking.runs import all_runs


def _value(text: str) -> Any:
    """A param as the trial config held it (MLflow keeps `str(value)`): a number, None, a list, or the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _trial_rows(
    client: MlflowClient, run: Run, params: dict[str, Any], varied: list[str]
) -> list[dict[str, Any]]:
    tags, run_id = run.data.tags, run.info.run_id
    columns = {
        **{column: typed_value(column, params.get(key)) for column, key in TYPED_CONFIG.items()},
        "trial_id": tags.get(TRIAL_ID_TAG, run_id),
        "kernel_label": tags.get(KERNEL_LABEL_TAG),
        "seed": typed_value("seed", params.get(SEED_KEY)),
        "status": TrialStatus.STOPPED.value
        if STOPPED_TAG in tags
        else TRIAL_STATUS.get(run.info.status, run.info.status),
        "planned_steps": typed_value("planned_steps", params.get("train.max_steps")),
        "mlflow_run_id": run_id,
        "config": config_json(params, varied),
    }
    rows = []
    for key in run.data.metrics:
        metric, factor = parse_metric_name(key)
        rows += [
            {**columns, "metric": metric, "length_factor": factor, "step": m.step, "value": m.value}
            for m in client.get_metric_history(run_id, key)
        ]
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
    runs = all_runs(client, found.experiment_id)
    parent_ids = {run.data.tags[PARENT_TAG] for run in runs if PARENT_TAG in run.data.tags}
    parents = [run for run in runs if run.info.run_id in parent_ids]
    if not parents:
        raise ValueError(
            f"MLflow experiment {experiment!r} holds no sweep (no parent run with child runs)"
        )
    latest = max(parents, key=lambda run: run.info.start_time).info.run_id
    trials = [run for run in runs if run.data.tags.get(PARENT_TAG) == latest]
    params = {
        run.info.run_id: {key: _value(text) for key, text in run.data.params.items()}
        for run in trials
    }
    # as the tracker's `config`: the keys the sweep's trials differ in
    varied = varied_keys(params.values())
    rows = [
        row for run in trials for row in _trial_rows(client, run, params[run.info.run_id], varied)
    ]
    rows.sort(key=lambda row: (row["trial_id"], row["step"]))
    table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)

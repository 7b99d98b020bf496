"""The results schema: the one contract between the orchestrator that writes results and the analysis that reads them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

import pyarrow as pa


class TrialStatus(StrEnum):
    """A trial's state in the results rows, by Ray Tune's names: the one vocabulary of statuses."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"  # finished every step
    STOPPED = "STOPPED"  # stopped early by the scheduler (ASHA): fewer steps than planned, for good
    INTERRUPTED = "INTERRUPTED"  # the sweep stopped while it ran (Ctrl-C); `--resume` continues it
    ERROR = "ERROR"  # failed after its retries


RESULTS_SCHEMA = pa.schema(
    [
        pa.field("trial_id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("kernel", pa.string()),  # canonical kernel name, e.g. "entmax"
        pa.field("kernel_label", pa.string()),  # the paper's row label, e.g. "Biweight"
        pa.field("alpha", pa.float64()),  # null where the kernel has no alpha
        pa.field("k", pa.int64()),  # null where the kernel has no k
        pa.field("b", pa.float64()),  # null where the kernel has no b
        pa.field("n_layer", pa.int64()),
        pa.field("num_examples", pa.int64()),  # RegBench training DFAs; null for other tasks
        pa.field("n_embd", pa.int64()),
        pa.field("n_head", pa.int64()),
        pa.field("lr", pa.float64()),
        pa.field("weight_decay", pa.float64()),
        # the paper code's quirks the trial reproduced (model.reference_code): lm_length or
        # regbench; null when off (the paper's text)
        pa.field("reference_code", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("metric", pa.string()),  # e.g. "exact_match", "loss"
        # null for metrics not tied to an evaluation length
        pa.field("length_factor", pa.float64()),
        pa.field("step", pa.int64()),
        pa.field("value", pa.float64()),
        pa.field("status", pa.string()),  # a TrialStatus: RUNNING, TERMINATED, STOPPED, …
        # train.max_steps: a trial whose last step is below it trained less than planned
        pa.field("planned_steps", pa.int64()),
        pa.field("mlflow_run_id", pa.string()),
        # JSON of the values a search suggested; null in a grid sweep
        pa.field("searched", pa.string()),
        # JSON of every key the sweep varies but the seed (config_json)
        pa.field("config", pa.string()),
        # a failed trial's error (its last line); it gets a row even if it never reported
        pa.field("error", pa.string()),
    ]
)

RESULT_COLUMNS: list[str] = RESULTS_SCHEMA.names

TYPED_CONFIG: dict[str, str] = {
    "task": "task.name",
    "kernel": "model.kernel",
    "alpha": "model.kernel_params.alpha",
    "k": "model.kernel_params.k",
    "b": "model.kernel_params.b",
    "n_layer": "model.n_layer",
    "num_examples": "task.num_examples",
    "n_embd": "model.n_embd",
    "n_head": "model.n_head",
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "reference_code": "model.reference_code",
}
"""The typed config columns and the dotted trial-config key each one holds."""


def typed_value(column: str, value: Any) -> Any:
    """A typed config column's value as the schema types it, from a config or an MLflow param
    (`k` logs as "4.0"; a flag that is off, False or "False", is null)."""
    kind = RESULTS_SCHEMA.field(column).type
    if value is None or value is False or value == "False":
        return None
    return (
        int(float(value))
        if kind == pa.int64()
        else float(value)
        if kind == pa.float64()
        else str(value)
    )


SEED_KEY = (
    "seed"  # the one varied key a table aggregates over: it has its own column, never in `config`
)


def varied_keys(flat_configs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The dotted keys whose value is not the same in every one of these flattened trial configs
    (a key missing from some, or an empty mapping, counts as None there), seed included; sorted."""
    configs = list(flat_configs)
    keys = {key for config in configs for key in config}
    return sorted(
        key
        for key in keys
        if len({json.dumps(_nothing(config.get(key)), sort_keys=True) for config in configs}) > 1
    )


def _nothing(value: Any) -> Any:
    """An empty mapping (`model.kernel_params` of softmax, as flattened) is no value at all."""
    return None if value == {} else value


def config_json(flat_config: Mapping[str, Any], keys: Iterable[str]) -> str:
    """The `config` column of a trial: its values of the varied `keys` but the seed, as canonical
    JSON, so two trials have the same configuration exactly when the strings are equal."""
    return json.dumps(
        {key: flat_config.get(key) for key in sorted(set(keys) - {SEED_KEY})}, sort_keys=True
    )

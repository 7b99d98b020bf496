"""The results schema: the one contract between the orchestrator that writes results and the analysis that reads them."""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa


class TrialStatus(StrEnum):
    """A trial's state in the results rows, by Ray Tune's names: the one vocabulary of statuses."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"  # finished every step
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
        pa.field("seed", pa.int64()),
        pa.field("metric", pa.string()),  # e.g. "exact_match", "loss"
        pa.field("length_factor", pa.float64()),  # null for metrics not tied to an evaluation length
        pa.field("step", pa.int64()),
        pa.field("value", pa.float64()),
        pa.field("status", pa.string()),  # Ray Tune trial status: RUNNING, TERMINATED, ERROR
        pa.field("mlflow_run_id", pa.string()),
        pa.field("searched", pa.string()),  # JSON of the values a search suggested; null in a grid sweep
        pa.field("error", pa.string()),  # a failed trial's error (its last line); it gets a row even if it never reported
    ]
)

RESULT_COLUMNS: list[str] = RESULTS_SCHEMA.names

"""Every name a sweep writes into MLflow, and how a trial's status maps to its run's status: one
place for the writer (`orchestrator.tracking`) and the reader (`analysis.mlflow_source`)."""

from __future__ import annotations

from pathlib import Path

from analysis.schema import TrialStatus

# tags of a trial's child run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests the trial's run under the sweep's
TRIAL_ID_TAG = "ray.trial_id"
KERNEL_LABEL_TAG = "kernel_label"
ERROR_TAG = "error"
RETRIES_TAG = "ray.retries"
LAST_RETRIED_ERROR_TAG = "ray.last_retried_error"
PLACEMENT_TAG_PREFIX = "ray."  # ray.hostname, ray.node_ip, ray.pid, ray.cuda_visible_devices
SYSTEM_METRICS_TAG = "system_metrics"
# on the run of a trial whose latest checkpoint could not be read: what it continued from instead
# (also the key the trial reports it by)
CHECKPOINT_FALLBACK_TAG = "checkpoint_fallback"
STOPPED_TAG = "stopped_early"  # on the run of a trial ASHA stopped: the step it stopped at
# a child run's artifact folder of per-head diagnostics, a table per evaluation
DIAGNOSTICS_DIR = "diagnostics"
_DIAGNOSTICS_PREFIX = "step_"  # a table's name in DIAGNOSTICS_DIR: its step after it


def diagnostics_table(step: int) -> str:
    """The artifact path of an evaluation's diagnostics table: `diagnostics/step_000010.json`."""
    return f"{DIAGNOSTICS_DIR}/{_DIAGNOSTICS_PREFIX}{step:06d}.json"


def diagnostics_step(path: str) -> int:
    """The step of a diagnostics table, from its artifact path (`diagnostics_table`'s inverse)."""
    return int(Path(path).stem.removeprefix(_DIAGNOSTICS_PREFIX))


SYSTEM_METRIC_PREFIX = "system/"  # MLflow's system metrics: `system/cpu_utilization_percentage`

# tags of a sweep's parent run and of its experiment
SWEEP_DIR_TAG = "sweep_dir"
NOTE_TAG = "mlflow.note.content"  # a run's description in MLflow's UI (Markdown)
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own name: the run page shows it
GIT_DIRTY_TAG = "git.dirty"
VERSION_TAG_PREFIX = "version."  # version.torch, version.ray, …
RESOURCE_PLAN_TAG = "resource_plan"
OVERRIDES_TAG = (
    "command_line_overrides"  # the sweep file's keys changed on the command line: train.lr=1e-3 …
)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow's own: a saved runs-page view (filter, order, columns) its URL opens by
# `viewStateShareKey=<suffix>`; `mosaic-sweep ui` saves one per sweep
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# the experiment is model training, not GenAI: MLflow's experiment-kind tag, which 3.17's UI reads
# only with its workflow switch off; `mosaic-sweep ui` links past the switch (orchestrator/mlflow_ui)
MODEL_TRAINING = "custom_model_development"

# MLflow's run statuses (`mlflow.entities.RunStatus` by name, without importing MLflow)
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
RUN_STATUS = {
    TrialStatus.RUNNING: RUNNING,
    TrialStatus.TERMINATED: FINISHED,
    TrialStatus.STOPPED: FINISHED,  # tagged STOPPED_TAG
    TrialStatus.INTERRUPTED: KILLED,
    TrialStatus.ERROR: FAILED,
}
"""The results' trial status -> MLflow run status, as the tracker ends a trial's run."""
TRIAL_STATUS = {
    RUNNING: TrialStatus.RUNNING,
    FINISHED: TrialStatus.TERMINATED,  # STOPPED where the run has STOPPED_TAG
    KILLED: TrialStatus.INTERRUPTED,
    FAILED: TrialStatus.ERROR,
}
"""MLflow run status -> the results' trial status, as the reader maps them back."""

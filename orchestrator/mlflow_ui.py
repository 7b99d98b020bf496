"""MLflow's UI for the sweeps: the command that serves it, and a link per sweep that opens on its
trials.

MLflow 3.17's UI decides between its GenAI pages and its model-training pages by a switch kept in
the browser (`workflowType`, GenAI unless changed), not by the experiment's `mlflow.experimentKind`
tag: opened at its root, a sweep's experiment lands on the GenAI "Overview" (traces, token usage).
A link that names the runs page, the model-training workflow, the sweep's latest parent run as the
filter and its headline metric as the order lands on its trials, one row per trial named by what
differs, best first (seen in headless Chromium, README "Tracking").
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote, urlencode

from mlflow.exceptions import MlflowException

from analysis.results_store import ResultsStoreError, read_results
from analysis.tables import family_layout
from mosaic_core.metrics import length_metric_name, lower_is_better
from orchestrator.sweep_folder import LAUNCH, SweepFolder, SweepFolderError
from orchestrator.tracking.names import PARENT_TAG
from orchestrator.tracking.runs import experiment_of

MODEL_TRAINING_WORKFLOW = "machine_learning"  # the UI's switch: "genai" or "machine_learning"


def ui_command(tracking_uri: str, port: int) -> list[str]:
    """`mlflow ui` on the store, listening on 127.0.0.1 only."""
    return [
        *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


def trials_link(
    base_url: str, experiment_id: str, parent_run_id: str, order_by: tuple[str, bool] | None
) -> str:
    """The runs page of one sweep's trials (children of its parent run), ordered by
    (metric, ascending) when given."""
    query = {
        "workflowType": MODEL_TRAINING_WORKFLOW,
        "searchFilter": f"tags.{PARENT_TAG} = '{parent_run_id}'",
    }
    if order_by is not None:
        metric, ascending = order_by
        query |= {"orderByKey": f"metrics.`{metric}`", "orderByAsc": str(ascending).lower()}
    return f"{base_url}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def headline_metric(sweep_dir: Path) -> tuple[str, bool] | None:
    """(MLflow metric name, ascending) the sweep's table leads with: exact match at the shortest
    length, accuracy, or validation loss; None before any result."""
    try:
        results = read_results(sweep_dir, skip_bad=True)
        metric = family_layout(results).metrics[0]
    except (ResultsStoreError, ValueError):
        return None
    rows = results[results["metric"] == metric]
    factors = rows["length_factor"].dropna()
    name = metric if factors.empty else length_metric_name(metric, factors.min())
    return name, lower_is_better(metric)


def sweep_links(folder_or_sweeps: Path, tracking_uri: str, base_url: str) -> dict[str, str]:
    """Sweep name -> link to its trials, for the sweep folder given or each one inside the folder
    of sweeps that logs to `tracking_uri`; sweeps without a parent run yet are left out."""
    folders = (
        [folder_or_sweeps]
        if (folder_or_sweeps / LAUNCH).is_file()
        else sorted(path.parent for path in folder_or_sweeps.glob(f"*/{LAUNCH}"))
    )
    links = {}
    for path in folders:
        try:
            folder = SweepFolder.open(path)
            run_map = folder.run_map()
            if run_map is None or folder.launch.tracking_uri != tracking_uri:
                continue
            experiment_id = experiment_of(tracking_uri, run_map.parent)
        except (SweepFolderError, MlflowException):
            continue
        links[path.name] = trials_link(
            base_url, experiment_id, run_map.parent, headline_metric(path)
        )
    return links

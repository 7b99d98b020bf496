"""MLflow's UI for the sweeps: the command that serves it, and a link per sweep that opens on its
trials.

MLflow 3.17's UI decides between its GenAI pages and its model-training pages by a switch kept in
the browser (`workflowType`, GenAI unless changed), not by the experiment's `mlflow.experimentKind`
tag: opened at its root, a sweep's experiment lands on the GenAI "Overview" (traces, token usage).
A link that names the runs page and the model-training workflow lands on a sweep's trials. Which
columns the runs table shows is not URL state in 3.17: a link opens a *shared view* instead, an
experiment tag (`mlflow.sharedViewState.<key>`, JSON) holding the filter (the sweep's latest parent
run), the order (its headline metric, best first) and the columns: the kernel's label, every param
the trials differ in (kernel parameters, seed, searched keys), the headline metrics at each length
and train_loss (seen in headless Chromium: docs/mlflow-trials-link.png). A second view opens the
same trials as charts (`compareRunsMode=CHART`), the seeds of a configuration grouped into one
line (docs/mlflow-charts.png); the compare page's own parallel coordinates are browser state only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, urlencode

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from analysis.results_store import ResultsStoreError, read_results
from analysis.schema import SEED_KEY
from analysis.tables import headlines
from mosaic_core.metrics import TRAIN_LOSS, length_metric_name
from orchestrator.sweep_folder import LAUNCH, SweepFolder, SweepFolderError
from orchestrator.tracking.names import KERNEL_LABEL_TAG, PARENT_TAG, SHARED_VIEW_TAG_PREFIX
from orchestrator.tracking.runs import all_runs, experiment_of

MODEL_TRAINING_WORKFLOW = "machine_learning"  # the UI's switch: "genai" or "machine_learning"
# the share key of a sweep's chart view: its parent run id and this
CHARTS_KEY_SUFFIX = "-charts"
# the kernel's registry name: its label (a tag) shows it
KERNEL_PARAM = "model.kernel"


def ui_command(tracking_uri: str, port: int) -> list[str]:
    """`mlflow ui` on the store, listening on 127.0.0.1 only."""
    return [
        *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


def trials_view(
    parent_run_id: str, metrics: list[str], ascending: bool, params: list[str]
) -> dict[str, object]:
    """The runs page of one sweep's trials (children of its parent run), ordered by the first of
    `metrics` (best first) and showing the kernel, `params` and `metrics` as columns."""
    view: dict[str, object] = {"searchFilter": f"tags.{PARENT_TAG} = '{parent_run_id}'"}
    if metrics:
        view |= {"orderByKey": f"metrics.`{metrics[0]}`", "orderByAsc": ascending}
    view["selectedColumns"] = [
        f"tags.`{KERNEL_LABEL_TAG}`",
        *(f"params.`{name}`" for name in params),
        *(f"metrics.`{name}`" for name in [*metrics, TRAIN_LOSS]),
        "attributes.`Duration`",
    ]
    return view


def charts_view(
    trials: dict[str, object], metrics: list[str], configuration: dict[str, bool]
) -> dict[str, object]:
    """`trials` as MLflow's chart view (`compareRunsMode=CHART`), the seeds of each configuration
    (kernel label and the `configuration` params, True where numeric) grouped into one line in a
    colour of its own: first a parallel-coordinates chart over the numeric params, train_loss and
    the headline metrics (MLflow draws no aggregated text), then each of those against the step."""
    curves = [TRAIN_LOSS, *metrics]
    parallel = {
        **_chart("parallel", "PARALLEL"),
        "selectedParams": [name for name, numeric in configuration.items() if numeric],
        "selectedMetrics": curves,
    }
    lines = [
        {**_chart(f"curve-{name}", "LINE"), "metricKey": name, "selectedMetricKeys": [name]}
        for name in curves
    ]
    keys = [{"mode": "tag", "groupByData": KERNEL_LABEL_TAG}]
    keys += [{"mode": "param", "groupByData": name} for name in configuration]
    return {
        **trials,
        "compareRunCharts": [parallel, *lines],
        "compareRunSections": [{"uuid": "sweep", "name": "Sweep", "display": True}],
        "isAccordionReordered": True,
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average", "groupByKeys": keys},
    }


def _chart(uuid: str, kind: str) -> dict[str, object]:
    """What every chart card of MLflow's chart view holds, in the sweep's section."""
    return {"uuid": uuid, "type": kind, "metricSectionId": "sweep", "deleted": False}


def trials_link(base_url: str, experiment_id: str, share_key: str, charts: bool = False) -> str:
    """The model-training runs page, opening the view saved under `share_key` (as charts)."""
    query = {"workflowType": MODEL_TRAINING_WORKFLOW, "viewStateShareKey": share_key}
    query |= {"compareRunsMode": "CHART"} if charts else {}
    return f"{base_url}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def save_view(client: MlflowClient, experiment_id: str, key: str, view: dict[str, object]) -> None:
    """The view as the experiment's shared-view tag that `viewStateShareKey=key` opens."""
    client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG_PREFIX}{key}", json.dumps(view))


def varying_params(
    client: MlflowClient, experiment_id: str, parent_run_id: str
) -> tuple[list[str], dict[str, bool]]:
    """The params the sweep's trials differ in (`model.kernel_params.alpha`, `seed`, `train.lr`),
    and, of those every trial has but the seed, whether each is numeric: with the kernel, what
    tells a configuration apart (MLflow groups by it; a param some lack would split a group)."""
    trials = all_runs(client, experiment_id, f"tags.{PARENT_TAG} = '{parent_run_id}'")
    values: dict[str, list[str]] = {}
    for run in trials:
        for name, value in run.data.params.items():
            values.setdefault(name, []).append(value)
    # a param some trials lack (α, of the α-entmax trials alone) tells them apart too; an empty
    # mapping (`model.kernel_params: {}`, logged by sweeps before it was left out) tells nothing
    differing = sorted(
        name
        for name, seen in values.items()
        if (len(set(seen)) > 1 or len(seen) < len(trials))
        and name != KERNEL_PARAM
        and set(seen) != {"{}"}
    )
    shared = [n for n in differing if len(values[n]) == len(trials) and n != SEED_KEY]
    return differing, {name: all(map(_numeric, values[name])) for name in shared}


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def headline_metrics(sweep_dir: Path) -> tuple[list[str], bool]:
    """(MLflow metric names, ascending) the sweep's table leads with: exact match at each evaluated
    length, accuracy, or validation loss; none before any result."""
    try:
        found = headlines(read_results(sweep_dir, skip_bad=True))
    except ResultsStoreError:
        return [], False
    if not found:
        return [], False
    metric, factors, ascending = found[0].metric, found[0].factors, found[0].lower_is_better
    return [length_metric_name(metric, factor) for factor in factors] or [metric], ascending


def server_links(sweep_dir: Path, tracking_uri: str) -> list[SweepLinks]:
    """The links to a sweep's trials on the tracking server it logs to (none for a local store,
    which `mosaic-sweep ui` serves)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return []
    return list(sweep_links(sweep_dir, tracking_uri, tracking_uri.rstrip("/")).values())


class SweepLinks(NamedTuple):
    """A sweep's trials as a table (what tells them apart, best first) and as charts."""

    trials: str
    charts: str


def sweep_links(folder_or_sweeps: Path, tracking_uri: str, base_url: str) -> dict[str, SweepLinks]:
    """Sweep name -> links to its trials, for the sweep folder given or each one inside the folder
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
            charts_key = save_views(MlflowClient(tracking_uri), experiment_id, run_map.parent, path)
        except (SweepFolderError, MlflowException):
            continue
        links[path.name] = SweepLinks(
            trials_link(base_url, experiment_id, run_map.parent),
            trials_link(base_url, experiment_id, charts_key, charts=True),
        )
    return links


def save_views(client: MlflowClient, experiment_id: str, parent: str, sweep_dir: Path) -> str:
    """The sweep's trials view under its parent run's id and its charts view under the key
    returned, from what its trials logged and its results store."""
    params, configuration = varying_params(client, experiment_id, parent)
    metrics, ascending = headline_metrics(sweep_dir)
    view = trials_view(parent, metrics, ascending, params)
    save_view(client, experiment_id, parent, view)
    charts_key = f"{parent}{CHARTS_KEY_SUFFIX}"
    save_view(client, experiment_id, charts_key, charts_view(view, metrics, configuration))
    return charts_key

"""`run_sweep`: a validated sweep through Ray Tune, tracked in MLflow, ending with its tables and
plots: connect, open the parent run, fit, write the tables and plots, finish the runs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

from analysis.plots import make_plots
from analysis.results_store import mark_interrupted, read_results, trial_states
from analysis.schema import TrialStatus
from analysis.tables import (
    LAYOUTS,
    caption,
    markdown_cells,
    search_ranking,
    table_stats,
    to_csv,
    to_latex,
    to_markdown,
)
from mosaic_core.files import own_folder, write_file
from orchestrator.faults import Stop, stop_for
from orchestrator.resources import connect, resource_plan
from orchestrator.sweep_folder import PLOTS, SEARCH_TABLE, TABLE, SweepFolder, layout_table
from orchestrator.tracking import runs
from orchestrator.tracking.names import FAILED, FINISHED, KILLED
from orchestrator.tuner import tuner
from search_spaces.schema import Sweep


@dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: Path
    table_markdown: str
    parent_run_id: str
    tracking_uri: str
    trials_by_status: dict[TrialStatus, int]  # the trials that ended: TERMINATED, STOPPED, ERROR
    unfinished: int = 0  # planned trials that have not ended (interrupted, or never started)
    stopped: Stop | None = None  # the fault that stopped the sweep (a full disk, a failed store)


def run_sweep(
    sweep: Sweep,
    folder: SweepFolder,
    *,
    address: str | None = None,
    verbose: bool = False,
    max_concurrent: int | None = None,
    sweep_file: Path | None = None,
) -> SweepOutcome:
    """Run the trials of the sweep in `folder` on Ray (this machine, or the cluster at `address`,
    already joined); return the summary table.

    A folder that holds Tune state is resumed through `Tuner.restore`: finished trials are not run
    again, interrupted ones continue from their last checkpoint, errored ones retry; the MLflow
    parent and child runs, the Tune storage and the Optuna study of the first invocation are reused.
    `sweep_file` goes with the parent run, as an artifact. A full disk or a failed MLflow store
    stops the sweep (`faults.stop_for`): its trials stopped, their runs FAILED with the reason,
    and the outcome holds the table so far.
    """
    # Ray starts on this machine only now: everything before was checked without it
    cluster = connect(address, verbose)
    _quiet_logs(verbose)
    client = MlflowClient(tracking_uri=folder.launch.tracking_uri)
    _quiet_store_errors(verbose)
    plan = resource_plan(sweep, cluster, max_concurrent)
    experiment_id, parent_id = runs.open_parent_run(
        client, folder, sweep.name, sweep.description, sweep_file, plan
    )
    status, stop = FAILED, None
    try:
        # returns early, state saved, after Ctrl-C
        tuner(sweep, folder, client, experiment_id, parent_id, max_concurrent, verbose).fit()
        outcome = _summary(sweep, folder, client, parent_id)
        failed = TrialStatus.ERROR in outcome.trials_by_status
        status = KILLED if outcome.unfinished else FAILED if failed else FINISHED
        return outcome
    except KeyboardInterrupt:
        status = KILLED
        raise
    except Exception as error:
        stop = stop_for(error)
        if stop is None:
            raise
        return _stopped_summary(sweep, folder, parent_id, stop)
    # the runs of trials still RUNNING: their processes are gone (or were stopped, when KILLED)
    finally:
        _end_runs(client, folder, parent_id, status, stop)


def _end_runs(
    client: MlflowClient, folder: SweepFolder, parent_id: str, status: str, stop: Stop | None
) -> None:
    """The parent run ends with `status`, the runs of trials still RUNNING too (FAILED, with the
    error line of the fault that stopped the sweep); where that fault keeps the MLflow store from
    taking it (the store is on the full disk, or lost), they stay RUNNING and `--resume` ends
    them."""
    reason = None if stop is None else stop.line
    try:
        runs.end_unfinished_runs(client, folder, KILLED if status == KILLED else FAILED, reason)
        runs.end_run(client, parent_id, status)
    except Exception as error:
        failed = stop_for(error)
        if stop is None or failed is None:
            raise
        log.warning("the MLflow runs could not be ended (%s): --resume ends them", failed.line)


def _quiet_store_errors(verbose: bool) -> None:
    """MLflow logs the traceback of every failed SQLite write (a busy or full store) before it
    raises: the retry (`runs.retried`) or the sweep's stop says it in a line instead, without -v."""
    logging.getLogger(_MLFLOW_DB_LOG).setLevel(logging.NOTSET if verbose else logging.CRITICAL)


class _ExpectedTrialFailure(logging.Filter):
    """Tune logs the traceback of every failing trial: without -v, the progress line, the MLflow run
    (tag `error`, artifact `error.txt`) and results.parquet tell it instead; and of a fault that
    stops the sweep (a full disk, a failed store), which the sweep's closing paragraph tells."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Trial task failed"):
            return False
        return not (record.exc_info and stop_for(record.exc_info[1]) is not None)


log = logging.getLogger(__name__)
_ENDED = (TrialStatus.TERMINATED, TrialStatus.STOPPED, TrialStatus.ERROR)
_TUNE_CONTROLLER_LOG = "ray.tune.execution.tune_controller"
_MLFLOW_DB_LOG = "mlflow.store.db.utils"
# after Ctrl-C it advises `Tuner.restore(...)`; the command line prints its own --resume command
_TUNE_RUN_LOG = "ray.tune.tune"
# a restored sweep's trials that had not started have no results: Tune warns that it read none
_TUNE_ANALYSIS_LOG = "ray.tune.analysis.experiment_analysis"


def _quiet_logs(verbose: bool) -> None:
    """MLflow's and Tune's chatter only with -v."""
    # progress reports between evaluations (train.log_interval) carry no evaluation metric: ASHA and
    # the search skip results without theirs, and Tune's check that every result has it must too
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # importing mlflow reset it
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
    # MLflow prints a link to each run it ends on a tracking server, which opens its UI's GenAI
    # pages; the command line prints one that opens the sweep's trials in model-training mode
    os.environ[MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name] = "true"
    controller = logging.getLogger(_TUNE_CONTROLLER_LOG)
    for old in [f for f in controller.filters if isinstance(f, _ExpectedTrialFailure)]:
        controller.removeFilter(old)
    logging.getLogger(_TUNE_RUN_LOG).setLevel(logging.NOTSET if verbose else logging.ERROR)
    logging.getLogger(_TUNE_ANALYSIS_LOG).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        controller.addFilter(_ExpectedTrialFailure())
        # Tune's new output engine prints its set-up box at any verbosity; the classic one obeys 0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # short trials checkpoint often: Tune's advice to checkpoint less is noise here
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _sweep_tables(sweep: Sweep, results: Any) -> list[tuple[str, str, Any]]:
    """(layout, title, table numbers) for each task family in the sweep that has results: the
    paper's table for it (Table 2, Table 1, losses per depth), each trial at the paper's model
    selection, which the title names."""
    families = {trial.config.task.name for trial in sweep.trials}
    tables = []
    for layout in LAYOUTS.values():
        if families & layout.tasks:
            try:
                stats = table_stats(
                    results,
                    by=layout.by,
                    planned_seeds=sweep.planned_seeds,
                    row_order=sweep.kernel_labels,
                )
            except ValueError:  # nothing reported for this layout (every trial failed early)
                continue
            tables.append((layout.by, f"{sweep.name}: {caption(layout, stats.select)}", stats))
    return tables


def tables_markdown(sweep: Sweep, results: Any) -> str:
    """The table a run ends with (table.md): the paper's tables of the sweep's task families; for
    a search, the suggestions ranked by the search's metric."""
    if sweep.search is not None:
        metric, mode = sweep.metric
        return to_markdown(
            search_ranking(results, metric, mode),
            title=f"{sweep.name}: suggestions by {metric} ({mode}), mean over seeds",
            index_header="Suggestion",
        )
    tables = _sweep_tables(sweep, results)
    return "\n".join(to_markdown(markdown_cells(stats), title=title) for _, title, stats in tables)


def write_tables(sweep: Sweep, results: Any, sweep_dir: Path) -> tuple[str, list[Path]]:
    """table.md (printed at the end of a run), and table-<layout>.tex / .csv beside it; for a
    search, the ranking as CSV."""
    markdown = tables_markdown(sweep, results)
    written = [sweep_dir / TABLE]
    write_file(written[0], markdown + "\n")
    if sweep.search is not None:
        metric, mode = sweep.metric
        written.append(sweep_dir / SEARCH_TABLE)
        write_file(written[1], search_ranking(results, metric, mode).to_csv())
        return markdown, written
    for by, _, stats in _sweep_tables(sweep, results):
        for suffix, render in ((".tex", to_latex), (".csv", to_csv)):
            path = sweep_dir / layout_table(by, suffix)
            write_file(path, render(stats))
            written.append(path)
    return markdown, written


def _summary(
    sweep: Sweep, folder: SweepFolder, client: MlflowClient, parent_id: str
) -> SweepOutcome:
    """Trials by state, from what the tracker recorded, where a trial still RUNNING when Tune
    returns was stopped by Ctrl-C: INTERRUPTED, so that the tables made now mark it; the tables and
    plots, also as artifacts of the parent run."""
    mark_interrupted(folder.path)
    results = read_results(folder.path)
    states = trial_states(results)
    ended = {state: states[state] for state in _ENDED if states.get(state)}
    markdown, table_files = write_tables(sweep, results, folder.path)
    plots = own_folder(folder.path / PLOTS)
    note = f"{sweep.description}\n\n{markdown}".strip()  # the run's description
    runs.log_sweep_outputs(
        client, parent_id, table_files, note, plots if make_plots(results, plots) else None
    )
    return SweepOutcome(
        folder.path,
        markdown,
        parent_id,
        folder.launch.tracking_uri,
        ended,
        unfinished=folder.launch.trials - sum(ended.values()),
    )


def _stopped_summary(sweep: Sweep, folder: SweepFolder, parent_id: str, stop: Stop) -> SweepOutcome:
    """The outcome of a sweep a fault stopped: the table so far, made in memory (a full disk takes
    nothing more), and the trials that had ended."""
    results = read_results(folder.path)
    states = trial_states(results)
    ended = {state: states[state] for state in _ENDED if states.get(state)}
    return SweepOutcome(
        folder.path,
        tables_markdown(sweep, results),
        parent_id,
        folder.launch.tracking_uri,
        ended,
        unfinished=folder.launch.trials - sum(ended.values()),
        stopped=stop,
    )

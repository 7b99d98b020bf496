"""One budget per cell: a cell never averages a seed stopped early with seeds that trained longer.

A trial's budget is the steps it trained: its last step, at most its planned steps (the results'
`planned_steps`). ASHA stops seeds one at a time, a Ctrl-C interrupts the running ones, a live
sweep has seeds half way: a cell (or a plotted point) shows only the seeds of its highest budget,
and a note names the others and why they are short (`1 stopped by ASHA at step 250`). A cell
whose seeds all stopped early shows them at their budget and says so (`shown at step 250 of
1000`); such a cell is not the planned experiment, and tables mark no best among them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from analysis.schema import TrialStatus

NOTE = "note"  # the column of a cell's note ("" when every seed trained its full budget)
FULL = "full_budget"  # the column saying whether a cell's seeds trained every planned step

REASONS = {
    TrialStatus.STOPPED: "stopped by ASHA",
    TrialStatus.INTERRUPTED: "interrupted",
    TrialStatus.RUNNING: "still running",
    TrialStatus.PENDING: "pending",
    TrialStatus.TERMINATED: "finished",
    TrialStatus.ERROR: "failed",
}


def trial_budgets(results: pd.DataFrame) -> pd.DataFrame:
    """Per trial id: its last status, the step it reached, the steps it planned (NaN where the
    store does not say) and its budget, the reached steps at most the planned ones."""
    # a store of another tool may say nothing of statuses or plans
    missing = {column: None for column in ("status", "planned_steps") if column not in results}
    by_trial = results.assign(**missing).groupby("trial_id", sort=False)
    frame = pd.DataFrame(
        {
            "status": by_trial["status"].last().fillna(""),
            "reached": by_trial["step"].max().astype(float).fillna(0.0),
            "planned": by_trial["planned_steps"].max().astype(float),
        }
    )
    return frame.assign(budget=frame[["reached", "planned"]].min(axis=1))


def cell_note(seeds: pd.DataFrame) -> tuple[str, bool]:
    """(note, full budget) of a cell from its seeds' `trial_budgets`: the seeds below the plan
    (below the cell's highest budget where the plan is unknown), counted by why and where they
    stopped, after where the cell's values come from when that is not the plan's end."""
    best, planned = seeds["budget"].max(), seeds["planned"].max()
    full = math.isnan(planned) or best >= planned
    below = seeds[seeds["budget"] < (best if math.isnan(planned) else planned)]
    counts = below.groupby(["budget", "status"]).size()
    parts = [] if full else [f"shown at step {best:g} of {planned:g}"]
    parts += [
        f"{n} {REASONS.get(status, 'trained')} at step {budget:g}"
        for (budget, status), n in counts.items()
    ]
    return "; ".join(parts), bool(full)


def at_one_budget(rows: pd.DataFrame, budgets: pd.DataFrame, cells: Sequence[str]) -> pd.DataFrame:
    """The rows of each cell (rows sharing the `cells` columns) from its seeds of the highest
    budget, with the cell's NOTE and FULL in every row; `budgets` as `trial_budgets` gives."""
    cell = rows.groupby(list(cells), dropna=False, sort=False).ngroup()
    budget = rows["trial_id"].map(budgets["budget"])
    seeds = pd.DataFrame({"cell": cell, "trial_id": rows["trial_id"]}).drop_duplicates()
    seeds = seeds.join(budgets, on="trial_id")
    notes = {number: cell_note(group) for number, group in seeds.groupby("cell")}
    kept = budget == budget.groupby(cell).transform("max")
    return rows[kept].assign(
        **{
            NOTE: cell[kept].map(lambda number: notes[number][0]),
            FULL: cell[kept].map(lambda number: notes[number][1]),
        }
    )

"""Tables in the paper's formats, built from the results store's DataFrame.

A cell is one configuration (`analysis.configurations`) in one column, aggregated over seeds
only: each trial contributes the evaluation the model selection picks (its last, or its best by a
metric), and a seed whose trial failed or whose value is not finite is missing from the cell. A
cell holds one budget (`analysis.budgets`): a seed stopped early is left out where others trained
longer, and the cell's note says so. Each table is computed once as numbers (`TableStats`: mean,
max, min, seed count, 95 % interval and note per cell) and then rendered as Markdown, LaTeX or
CSV, so the three formats can never disagree.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.budgets import FULL, NOTE, REASONS, at_one_budget, trial_budgets
from analysis.configurations import (
    KERNEL_LABEL,
    LENGTH,
    ROW,
    SEPARATOR,
    config_frame,
    display_names,
    key_value,
    labelled,
    ordered_rows,
    planned_seed_count,
    resolve_key,
    row_keys,
    show,
    sort_key,
    where,
)
from analysis.noise import METHOD, t_interval
from analysis.schema import SEED_KEY, TrialStatus
from mosaic_core.metrics import (
    ACCURACY,
    EXACT_MATCH,
    MODEL_SELECTION,
    OOD_LOSS,
    TVD,
    VAL_LOSS,
    lower_is_better,
    parse_metric_name,
)

MISSING = "—"
LAST = "last"
BEST = "best:"


@dataclass(frozen=True)
class Layout:
    """A paper table's shape: what its columns are, its default metrics, the task family it is
    the paper's table for, and the paper's model selection for that family."""

    by: str
    metrics: tuple[str, ...]
    tasks: frozenset[str]
    select: str
    title: str


LAYOUTS: dict[str, Layout] = {
    layout.by: layout
    for layout in (
        Layout(
            "length_factor",
            (EXACT_MATCH,),
            frozenset({"sort", "reverse", "copy", "mqmtar"}),
            LAST,
            "exact match",
        ),  # Table 2
        Layout(
            "num_examples",
            (ACCURACY, TVD),
            frozenset({"regbench"}),
            BEST + MODEL_SELECTION["regbench"],
            "accuracy and TVD (%)",
        ),  # Table 1; Table 5's caption: the epoch with the lowest validation loss
        Layout(
            "n_layer", (VAL_LOSS, OOD_LOSS), frozenset({"lm"}), LAST, "losses"
        ),  # per depth, Figure 2
    )
}
"""The columns a table can be laid out by (`by`), and what each layout shows by default."""


def family_layout(results: pd.DataFrame) -> Layout:
    """The layout of the paper's table for the results' task family; ValueError when none fits."""
    tasks = set(results["task"].dropna())
    for layout in LAYOUTS.values():
        if tasks & layout.tasks:
            return layout
    raise ValueError(
        f"no paper table for tasks {', '.join(sorted(tasks)) or 'none'}; pass --by {' or '.join(LAYOUTS)}"
    )


@dataclass(frozen=True)
class Headline:
    """A task family's headline metric in a sweep's results: its paper table's first (exact
    match, accuracy, validation loss), the lengths it was evaluated at (shortest first) and its
    direction, from `mosaic_core.metrics`."""

    metric: str
    factors: list[float]
    lower_is_better: bool


def headlines(results: pd.DataFrame) -> list[Headline]:
    """The headline metric of each task family that reported it: what `status` calls the best
    so far and the MLflow link orders the trials by."""
    found = []
    for metric in (layout.metrics[0] for layout in LAYOUTS.values()):
        factors = results.loc[results["metric"] == metric, "length_factor"]
        if len(factors):
            found.append(
                Headline(metric, sorted(factors.dropna().unique()), lower_is_better(metric))
            )
    return found


def check_select(select: str) -> str:
    """`last` or `best:METRIC`; ValueError otherwise."""
    if select != LAST and not (select.startswith(BEST) and select.removeprefix(BEST)):
        raise ValueError(
            f"unknown --select {select!r}; choose last or best:METRIC (e.g. best:val_loss)"
        )
    return select


def describe_select(select: str) -> str:
    """For captions: `each trial's last evaluation`, `the evaluation with the lowest val_loss`."""
    if select == LAST:
        return "each trial's last evaluation"
    metric = select.removeprefix(BEST)
    return f"the evaluation with the {'lowest' if lower_is_better(metric) else 'highest'} {metric}"


def caption(layout: Layout, select: str) -> str:
    """`exact match at each trial's last evaluation, mean^(max) over seeds`."""
    top = "best" if any(map(lower_is_better, layout.metrics)) else "max"
    return f"{layout.title} at {describe_select(select)}, mean^({top}) over seeds"


@dataclass(frozen=True)
class Column:
    """One table column before markup."""

    key: str  # machine-readable, for CSV headers: `sort_2x`, `tvd_num_examples=1000`
    header: str  # as shown: `sort 2×`, `tvd ↓ num_examples=1000`
    lower_is_better: bool
    stats: pd.DataFrame  # by row label: mean, max, min, seeds, ci_low, ci_high, note, full_budget


@dataclass(frozen=True)
class TableStats:
    """A table's numbers: one row per configuration, in display order."""

    labels: list[str]
    columns: list[Column]
    planned_seeds: int | None
    # by label: kernel_label and the keys naming rows
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    select: str = LAST


@dataclass(frozen=True)
class _Markup:
    bold: Callable[[str], str]
    underline: Callable[[str], str]
    cell: str  # format string with {mean} and {top}
    missing: str
    plus_minus: str  # between a mean and its interval's half width


_MARKDOWN = _Markup(lambda s: f"**{s}**", lambda s: f"<u>{s}</u>", "{mean}^({top})", MISSING, " ± ")
_LATEX = _Markup(
    lambda s: rf"\textbf{{{s}}}",
    lambda s: rf"\underline{{{s}}}",
    "${mean}^{{({top})}}$",
    "---",
    r" \pm ",
)


def last_evaluation(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of each trial's last evaluation step, so a running sweep shows current values."""
    return rows[rows["step"] == rows.groupby("trial_id")["step"].transform("max")]


def _metric_rows(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of a reported metric name: `val_loss`, or `exact_match_2x` (exact_match at 2×)."""
    name, factor = parse_metric_name(metric)
    length = results["length_factor"]
    return results[
        (results["metric"] == name) & (length.isna() if factor is None else length == factor)
    ]


def best_steps(results: pd.DataFrame, metric: str) -> pd.Series:
    """Each trial's step whose `metric` is best (lowest for losses and TVD; the earliest on a tie),
    among its finite values; ValueError when no trial reports it."""
    rows = _metric_rows(results, metric)
    rows = rows[np.isfinite(rows["value"].astype(float))].sort_values("step", kind="stable")
    if rows.empty:
        present = sorted(results["metric"].dropna().unique())
        raise ValueError(
            f"--select best:{metric}: no trial reports {metric}; metrics present: {', '.join(present) or 'none'}"
        )
    values = rows.groupby("trial_id")["value"]
    best = values.idxmin() if lower_is_better(metric) else values.idxmax()
    return rows.loc[best].set_index("trial_id")["step"]


def succeeded(rows: pd.DataFrame) -> pd.Series:
    """Rows of trials that did not fail: a failed trial's seed is missing, whatever it reported."""
    status = rows["status"] if "status" in rows else pd.Series(None, index=rows.index, dtype=object)
    return status.astype(object) != TrialStatus.ERROR.value


def selected(
    rows: pd.DataFrame, select: str = LAST, results: pd.DataFrame | None = None
) -> pd.DataFrame:
    """`rows` at the evaluation `select` picks in each trial: its last, or with `best:METRIC` its
    best METRIC, looked up in `results` (default: `rows`).

    A seed whose trial failed, or whose value there is not finite, is left out: it is missing
    from its cell, never a value in it.
    """
    usable = rows[succeeded(rows)]
    if select == LAST:
        usable = last_evaluation(usable)
    else:
        source = rows if results is None else results
        steps = best_steps(source[succeeded(source)], check_select(select).removeprefix(BEST))
        usable = usable[usable["step"] == usable["trial_id"].map(steps)]
    return usable[np.isfinite(usable["value"].astype(float))]


def _cell_stats(rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return rows.groupby([*columns, ROW], dropna=False, sort=False).agg(
        mean=("value", "mean"),
        max=("value", "max"),
        min=("value", "min"),
        seeds=("seed", "nunique"),
        ci_low=("value", lambda values: t_interval(values)[0]),
        ci_high=("value", lambda values: t_interval(values)[1]),
        note=(NOTE, "first"),
        full_budget=(FULL, "first"),
    )


def column_header(layout: Layout, values: dict, names: dict[str, str]) -> tuple[str, str]:
    """(CSV key, shown header) of a column: the layout's part (`sort 2×`, `tvd ↓ num_examples=1000`),
    then any other keys it is split by (` · lr 1e-4`)."""
    if layout.by == LENGTH:
        key, header = (
            f"{values['task']}_{values[LENGTH]:g}x",
            f"{values['task']} {values[LENGTH]:g}×",
        )
    else:
        metric, value = values["metric"], show(values[layout.by])
        arrow = "↓" if lower_is_better(metric) else "↑"
        key, header = f"{metric}_{layout.by}={value}", f"{metric} {arrow} {layout.by}={value}"
    for name in names:
        key += f"_{names[name]}={show(values[name])}"
        header += f"{SEPARATOR}{names[name]} {show(values[name])}"
    return key, header


def _table_columns(
    stats: pd.DataFrame, layout: Layout, metrics: list[str], columns: list[str], extra: list[str]
) -> list[Column]:
    """The cells grouped into columns: metrics in the order asked, then by value."""

    def order(group: tuple) -> tuple:
        named = dict(zip(columns, group[0]))
        return (
            metrics.index(named.get("metric", metrics[0])),
            *(sort_key(named[c]) for c in columns if c != "metric"),
        )

    names = display_names(extra)
    table_columns = []
    for values, cells in sorted(stats.groupby(level=columns, dropna=False, sort=False), key=order):
        named = dict(zip(columns, values))
        key, header = column_header(layout, named, names)
        table_columns.append(
            Column(
                key,
                header,
                lower_is_better(named.get("metric", metrics[0])),
                cells.droplevel(columns),
            )
        )
    return table_columns


def table_stats(
    results: pd.DataFrame,
    *,
    by: str | None = None,
    metric: str | None = None,
    select: str | None = None,
    columns_by: Sequence[str] = (),
    conditions: Sequence[str] = (),
    planned_seeds: int | None = None,
    row_order: list[str] | None = None,
) -> TableStats:
    """The paper's table laid out by `by` (a key of LAYOUTS; default: the results' task family),
    for `metric` or the layout's metrics, each trial at the evaluation `select` picks (default:
    the layout's, the paper's). One row per configuration: a cell aggregates over seeds only, and
    every key that varies within a column names its row (`Gaussian · lr 1e-4`), unless
    `columns_by` makes it a column. `conditions` (`KEY=VALUE`) filters first; `planned_seeds` is what
    the sweep planned (else the most any configuration has). ValueError, naming what is allowed,
    when there is nothing to show."""
    layout = LAYOUTS[by] if by else family_layout(results)
    select = check_select(select or layout.select)
    metrics = [metric] if metric else list(layout.metrics)
    frame, keys = config_frame(results)
    frame = where(frame, keys, conditions)
    present = sorted(frame.loc[frame[layout.by].notna(), "metric"].dropna().unique())
    if not set(metrics) & set(present):
        wanted = " or ".join(map(repr, metrics))
        raise ValueError(
            f"no results for metric {wanted} by {layout.by}; metrics present: {', '.join(present) or 'none'}"
        )
    extra = [resolve_key(name, frame, keys, "--by", also=list(LAYOUTS)) for name in columns_by]
    columns = [*(["task", LENGTH] if layout.by == LENGTH else ["metric", layout.by]), *extra]
    rows = selected(frame[frame["metric"].isin(metrics) & frame[layout.by].notna()], select, frame)
    splits = row_keys(rows, keys, columns)
    rows = at_one_budget(labelled(rows, splits), trial_budgets(frame), [*columns, ROW])
    table_columns = _table_columns(_cell_stats(rows, columns), layout, metrics, columns, extra)
    order = ordered_rows(rows, splits, row_order)
    # a view of single seeds (--by seed, --where seed=N) plans one seed per cell
    one_seed = SEED_KEY in extra or any(c.partition("=")[0].strip() == SEED_KEY for c in conditions)
    return TableStats(
        list(order.index),
        table_columns,
        1 if one_seed else planned_seed_count(frame, keys, planned_seeds),
        order,
        select,
    )


def _column_cells(
    column: Column, planned_seeds: int | None, markup: _Markup, ci: bool, notes: list[str]
) -> dict[str, str]:
    """`mean^(best seed)` per row (`mean ± half width^(best seed)` with `ci`); marks are decided
    on the shown (2-decimal) numbers, among the cells that trained their full budget.

    The best seed is the max (the min for a lower-is-better metric such as a loss or a TVD). A
    cell's note is added to `notes` (once) and the cell names its number.
    """
    pick = min if column.lower_is_better else max
    mean = column.stats["mean"].map("{:.2f}".format)
    top = column.stats["min" if column.lower_is_better else "max"].map("{:.2f}".format)
    full = column.stats["full_budget"].astype(bool)
    best_mean, best_top = (pick(values[full].astype(float), default=None) for values in (mean, top))
    cells = {}
    for label in column.stats.index:
        m, x, n = mean[label], top[label], column.stats.at[label, "seeds"]
        m = markup.bold(m) if full[label] and float(m) == best_mean else m
        x = markup.underline(x) if full[label] and float(x) == best_top else x
        if ci:
            m += markup.plus_minus + _half_width(column.stats.loc[label])
        marks = [f"{n}/{planned_seeds}"] if planned_seeds and n < planned_seeds else []
        note = column.stats.at[label, "note"]
        if note:
            if note not in notes:
                notes.append(note)
            marks.append(f"note {notes.index(note) + 1}")
        cells[label] = markup.cell.format(mean=m, top=x) + (
            f" [{', '.join(marks)}]" if marks else ""
        )
    return cells


def _half_width(cell: pd.Series) -> str:
    """Half the width of a cell's interval at 2 decimals; `?` for one seed, which has none."""
    half = (cell["ci_high"] - cell["ci_low"]) / 2
    return "?" if np.isnan(half) else f"{half:.2f}"


def _render(table: TableStats, markup: _Markup, ci: bool = False) -> pd.DataFrame:
    """The cells as text, with attrs["notes"]: the lines to print under the table."""
    frame = pd.DataFrame(index=pd.Index(table.labels, name="Kernel"))
    notes: list[str] = []
    for column in table.columns:
        cells = _column_cells(column, table.planned_seeds, markup, ci, notes)
        frame[column.header] = [cells.get(label, markup.missing) for label in table.labels]
    frame.attrs["notes"] = [f"note {number}: {note}" for number, note in enumerate(notes, 1)]
    if ci:
        frame.attrs["notes"].append(f"±: half width of the {METHOD}; ? where one seed")
    return frame


def markdown_cells(table: TableStats, ci: bool = False) -> pd.DataFrame:
    """The table as Markdown cells (`**0.95**^(<u>0.99</u>) [2/3]`, with `ci` `0.95 ± 0.04^(0.99)`),
    for `to_markdown`, which prints the cells' notes under the table."""
    return _render(table, _MARKDOWN, ci)


def rendered_markdown(markdown: str) -> str:
    """Our Markdown as common renderers (MLflow's description, rich in a terminal) show it: they
    print `^(…)` and `<u>` as typed, so `mean^(max)` becomes `mean (max)`, the underlined best
    max italic. Files keep the paper's notation."""
    markdown = re.sub(r"<u>(.*?)</u>", r"_\1_", markdown)
    return re.sub(r"\^\(([^()]*)\)", r" (\1)", markdown)


def to_markdown(
    table: pd.DataFrame, *, title: str | None = None, index_header: str = "Kernel"
) -> str:
    """A GitHub Markdown table with the index as the first column, headed `Kernel`, and the lines
    of `table.attrs["notes"]` (the cells' notes, what a ranking compares) under it."""

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line([index_header, *table.columns]), "|" + "---|" * (len(table.columns) + 1)]
    lines += [
        line([label, *values]) for label, values in zip(table.index, table.itertuples(index=False))
    ]
    text = "\n".join(lines) + "\n"
    if table.attrs.get("notes"):
        text += "\n" + "\n".join(table.attrs["notes"]) + "\n"
    return f"**{title}**\n\n{text}" if title else text


_LATEX_TEXT = str.maketrans(
    {
        "_": r"\_",
        "%": r"\%",
        "&": r"\&",
        "#": r"\#",
        "×": r"$\times$",
        "↑": r"$\uparrow$",
        "↓": r"$\downarrow$",
        "·": r"$\cdot$",
        "±": r"$\pm$",
        "√": r"$\surd$",
        "−": "-",
    }
)


def to_latex(table: TableStats, ci: bool = False) -> str:
    """A booktabs tabular for the paper: `$\\textbf{0.95}^{(\\underline{0.99})}$ [2/3]` cells
    (`$0.95 \\pm 0.04^{(0.99)}$` with `ci`), the cells' notes in rows under the rule."""
    cells = _render(table, _LATEX, ci)

    def line(values: list[str]) -> str:
        return " & ".join(values) + r" \\"

    lines = [
        rf"\begin{{tabular}}{{l{'c' * len(cells.columns)}}}",
        r"\toprule",
        line(["Kernel", *(str(h).translate(_LATEX_TEXT) for h in cells.columns)]),
        r"\midrule",
    ]
    lines += [
        line([label.translate(_LATEX_TEXT), *values])
        for label, values in zip(cells.index, cells.itertuples(index=False))
    ]
    lines.append(r"\bottomrule")
    lines += [
        rf"\multicolumn{{{len(cells.columns) + 1}}}{{l}}{{\footnotesize {note.translate(_LATEX_TEXT)}}} \\"
        for note in cells.attrs["notes"]
    ]
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def to_csv(table: TableStats) -> str:
    """One line per row: its label, kernel label and the values of the keys that name rows, then
    `<column>_mean`, `_max` (`_min` where lower is better), `_seeds`, `_ci_low` and `_ci_high`
    (the 95 % t interval; empty for one seed) and `_note` per column: plain numbers for other
    tools; 10 significant digits, free of float noise."""
    frame = table.rows.reindex(table.labels).rename(columns=display_names(table.rows.columns[1:]))
    frame.index.name = ROW
    for column in table.columns:
        top = "min" if column.lower_is_better else "max"
        stats = column.stats.reindex(table.labels)
        frame[f"{column.key}_mean"] = stats["mean"]
        frame[f"{column.key}_{top}"] = stats[top]
        frame[f"{column.key}_seeds"] = stats["seeds"].astype("Int64")
        frame[f"{column.key}_ci_low"] = stats["ci_low"]
        frame[f"{column.key}_ci_high"] = stats["ci_high"]
        frame[f"{column.key}_note"] = stats["note"]
    buffer = io.StringIO()
    frame.to_csv(buffer, float_format="%.10g", lineterminator="\n")
    return buffer.getvalue()


def search_ranking(results: pd.DataFrame, metric: str, mode: str, top: int = 10) -> pd.DataFrame:
    """An Optuna search's suggestions, best first, compared at one budget: the highest step every
    seed of every suggestion reached (as ASHA compares trials at a rung), each seed at its last
    evaluation up to it, as mean and best over the suggestion's seeds (failed seeds left out); then,
    for each, the highest step all its own seeds reached and their mean there. `metric` is a
    reported name (`exact_match_2x`). attrs["notes"] says at which step and why."""
    rows = _metric_rows(results, metric)
    rows = rows[succeeded(rows) & np.isfinite(rows["value"].astype(float))]
    rows = rows.assign(
        suggestion=rows[KERNEL_LABEL].astype(str) + "\0" + rows["searched"].fillna("")
    )
    reached = rows.groupby("trial_id")["step"].max()
    common = reached.min() if len(reached) else 0
    stats = _at_steps(rows, reached.map(lambda _: common))
    own = reached.groupby(rows.groupby("trial_id")["suggestion"].first()).min()
    furthest = _at_steps(rows, rows.groupby("trial_id")["suggestion"].first().map(own))
    stats = stats.sort_values("mean", ascending=mode == "min").head(top)
    best = stats["min"] if mode == "min" else stats["max"]
    ranking = pd.DataFrame(
        {
            f"{metric} mean at step {common}": stats["mean"].map("{:.4g}".format).values,
            "best seed": best.map("{:.4g}".format).values,
            "seeds": stats["count"].values,
            "furthest step": own.reindex(stats.index).values,
            "mean there": furthest["mean"].reindex(stats.index).map("{:.4g}".format).values,
        },
        index=pd.Index([_suggestion(*key.split("\0")) for key in stats.index], name="suggestion"),
    )
    ranking.attrs["notes"] = [
        f"compared at step {common}: the highest step every seed of every suggestion reached "
        "(a seed stopped early, by ASHA or otherwise, bounds it, as ASHA compares trials at a rung); "
        "furthest step: the highest step all of a suggestion's own seeds reached",
        *_short_seeds(results[results["trial_id"].isin(reached.index)]),
    ]
    return ranking


def _short_seeds(results: pd.DataFrame) -> list[str]:
    """`seeds short of their planned steps: 2 stopped by ASHA, 1 interrupted`, or nothing."""
    budgets = trial_budgets(results)
    short = budgets[budgets["budget"] < budgets["planned"]]["status"].value_counts()
    if short.empty:
        return []
    counts = [f"{n} {REASONS.get(status, status)}" for status, n in short.sort_index().items()]
    return ["seeds short of their planned steps: " + ", ".join(counts)]


def _at_steps(rows: pd.DataFrame, steps: pd.Series) -> pd.DataFrame:
    """Per suggestion, mean, min, max and count over its seeds of each seed's last value at or
    before its step in `steps` (by trial id)."""
    upto = rows[rows["step"] <= rows["trial_id"].map(steps)]
    last = last_evaluation(upto)
    return last.groupby("suggestion")["value"].agg(["mean", "min", "max", "count"])


def _suggestion(kernel_label: str, searched: str) -> str:
    """`Biweight train.lr=0.002739`; where the search also chose among variants, the variant's name
    (`entmax(α=1.5) model.n_layer=2 train.lr=0.002739`) instead of the kernel's label."""
    values = json.loads(searched) if searched else {}
    shown = [values.pop("variant", kernel_label)]
    shown += [key_value(key, value) for key, value in values.items()]
    return " ".join(shown)

"""Tables in the paper's formats, built from the results store's DataFrame.

Each table is computed once as numbers (`TableStats`: mean, max, min and seed count per cell) and
then rendered as Markdown, LaTeX or CSV, so the three formats can never disagree.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

MISSING = "—"

TABLE_METRICS: dict[str, tuple[str, ...]] = {
    "length_factor": ("exact_match",),  # Table 2
    "num_examples": ("accuracy", "tvd"),  # RegBench, Table 1
    "n_layer": ("val_loss", "ood_loss"),  # language modelling per depth
}
"""The columns a table can be laid out by, and the metrics it shows by default."""


def lower_is_better(metric: str) -> bool:
    """Losses and total variation distances improve downwards; accuracies and support sizes are
    reported as they are (the best is the largest)."""
    return "loss" in metric or "tvd" in metric


@dataclass(frozen=True)
class Column:
    """One table column before markup."""

    key: str  # machine-readable, for CSV headers: `sort_2x`, `tvd_num_examples=1000`
    header: str  # as shown: `sort 2×`, `tvd ↓ num_examples=1000`
    lower_is_better: bool
    stats: pd.DataFrame  # indexed by kernel label: mean, max, min, seeds


@dataclass(frozen=True)
class TableStats:
    """A table's numbers: rows are kernel labels in display order."""

    labels: list[str]
    columns: list[Column]
    planned_seeds: int | None


@dataclass(frozen=True)
class _Markup:
    bold: Callable[[str], str]
    underline: Callable[[str], str]
    cell: str  # format string with {mean} and {top}
    missing: str


_MARKDOWN = _Markup(lambda s: f"**{s}**", lambda s: f"<u>{s}</u>", "{mean}^({top})", MISSING)
_LATEX = _Markup(lambda s: rf"\textbf{{{s}}}", lambda s: rf"\underline{{{s}}}", "${mean}^{{({top})}}$", "---")


def last_evaluation(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of each trial's last evaluation step, so a running sweep shows current values and
    a failed trial counts with what it last reported."""
    return rows[rows["step"] == rows.groupby("trial_id")["step"].transform("max")]


def _cell_stats(last: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return last.groupby([*keys, "kernel_label"]).agg(
        mean=("value", "mean"), max=("value", "max"), min=("value", "min"), seeds=("seed", "nunique")
    )


def _row_labels(last: pd.DataFrame, row_order: list[str] | None) -> list[str]:
    """`row_order` first (where present), then the others in order of first appearance."""
    seen = list(dict.fromkeys(last["kernel_label"].dropna()))
    order = row_order or []
    return [label for label in order if label in seen] + [label for label in seen if label not in order]


def length_generalization_stats(
    results: pd.DataFrame,
    *,
    metric: str = "exact_match",
    row_order: list[str] | None = None,
    planned_seeds: int | None = None,
    lower_is_better: bool = False,
) -> TableStats:
    """Numbers of Table 2: kernel labels × (task, length factor), from each trial's last evaluation."""
    last = last_evaluation(results[(results["metric"] == metric) & results["length_factor"].notna()])
    stats = _cell_stats(last, ["task", "length_factor"])
    columns = [
        Column(f"{task}_{factor:g}x", f"{task} {factor:g}×", lower_is_better, col.droplevel(["task", "length_factor"]))
        for (task, factor), col in stats.groupby(level=["task", "length_factor"])
    ]
    return TableStats(_row_labels(last, row_order), columns, planned_seeds)


def summary_stats(
    results: pd.DataFrame,
    *,
    metrics: list[str],
    by: str,
    lower_is_better: frozenset[str] = frozenset(),
    row_order: list[str] | None = None,
    planned_seeds: int | None = None,
) -> TableStats:
    """Numbers of a kernel labels × (metric, value of `by`) table, from each trial's last evaluation."""
    last = last_evaluation(results[results["metric"].isin(metrics)])
    stats = _cell_stats(last, ["metric", by])
    columns = []
    for metric in metrics:
        if metric not in stats.index.get_level_values("metric"):
            continue
        lower = metric in lower_is_better
        arrow = "↓" if lower else "↑"
        columns += [
            Column(f"{metric}_{by}={value}", f"{metric} {arrow} {by}={value}", lower, col.droplevel(by))
            for value, col in stats.loc[metric].groupby(level=by)
        ]
    return TableStats(_row_labels(last, row_order), columns, planned_seeds)


def table_stats(
    results: pd.DataFrame,
    *,
    by: str = "length_factor",
    metric: str | None = None,
    planned_seeds: int | None = None,
    row_order: list[str] | None = None,
) -> TableStats:
    """The paper's table laid out by `by` (a key of TABLE_METRICS), for `metric` or the layout's
    default metrics; ValueError, naming the metrics present, when there is nothing to show."""
    metrics = [metric] if metric else list(TABLE_METRICS[by])
    present = sorted(results.loc[results[by].notna(), "metric"].dropna().unique())
    if not set(metrics) & set(present):
        wanted = " or ".join(map(repr, metrics))
        raise ValueError(f"no results for metric {wanted} by {by}; metrics present: {', '.join(present) or 'none'}")
    if by == "length_factor":
        return length_generalization_stats(results, metric=metrics[0], planned_seeds=planned_seeds,
                                           lower_is_better=lower_is_better(metrics[0]), row_order=row_order)
    lower = frozenset(m for m in metrics if lower_is_better(m))
    return summary_stats(results, metrics=metrics, by=by, lower_is_better=lower, planned_seeds=planned_seeds,
                         row_order=row_order)


def _column_cells(column: Column, planned_seeds: int | None, markup: _Markup) -> dict[str, str]:
    """`mean^(best seed)` per kernel label; marks are decided on the shown (2-decimal) numbers.

    The best seed is the max (the min for a lower-is-better metric such as a loss or a TVD).
    """
    pick = min if column.lower_is_better else max
    mean = column.stats["mean"].map("{:.2f}".format)
    top = column.stats["min" if column.lower_is_better else "max"].map("{:.2f}".format)
    best_mean, best_top = pick(mean.astype(float)), pick(top.astype(float))
    cells = {}
    for label in column.stats.index:
        m, x, n = mean[label], top[label], column.stats.at[label, "seeds"]
        m = markup.bold(m) if float(m) == best_mean else m
        x = markup.underline(x) if float(x) == best_top else x
        short = f" [{n}/{planned_seeds}]" if planned_seeds and n < planned_seeds else ""
        cells[label] = markup.cell.format(mean=m, top=x) + short
    return cells


def _render(table: TableStats, markup: _Markup) -> pd.DataFrame:
    frame = pd.DataFrame(index=pd.Index(table.labels, name="Kernel"))
    for column in table.columns:
        cells = _column_cells(column, table.planned_seeds, markup)
        frame[column.header] = [cells.get(label, markup.missing) for label in table.labels]
    return frame


def markdown_cells(table: TableStats) -> pd.DataFrame:
    """The table as Markdown cells (`**0.95**^(<u>0.99</u>) [2/3]`), for `to_markdown`."""
    return _render(table, _MARKDOWN)


def length_generalization_table(
    results: pd.DataFrame,
    *,
    metric: str = "exact_match",
    row_order: list[str] | None = None,
    planned_seeds: int | None = None,
) -> pd.DataFrame:
    """Table 2: kernel labels × (task, length factor), each cell `mean^(max)` over seeds.

    Only each trial's last evaluation counts, so a table of a running sweep shows current values.
    Best mean per column is bold, the column's overall max underlined; a cell with fewer seeds
    than planned says `[n/N]`.
    """
    return markdown_cells(length_generalization_stats(results, metric=metric, row_order=row_order,
                                                      planned_seeds=planned_seeds))


def summary_table(
    results: pd.DataFrame,
    *,
    metrics: list[str],
    by: str,
    lower_is_better: frozenset[str] = frozenset(),
    row_order: list[str] | None = None,
    planned_seeds: int | None = None,
) -> pd.DataFrame:
    """Kernel labels × (metric, value of `by`), e.g. RegBench's accuracy and TVD per training-set
    size (`by="num_examples"`), or the language model's losses per depth (`by="n_layer"`); cells as
    in `length_generalization_table`, from each trial's last evaluation."""
    return markdown_cells(summary_stats(results, metrics=metrics, by=by, lower_is_better=lower_is_better,
                                        row_order=row_order, planned_seeds=planned_seeds))


def to_markdown(table: pd.DataFrame, *, title: str | None = None, index_header: str = "Kernel") -> str:
    """A GitHub Markdown table with the index as the first column, headed `Kernel`."""

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line([index_header, *table.columns]), "|" + "---|" * (len(table.columns) + 1)]
    lines += [line([label, *values]) for label, values in zip(table.index, table.itertuples(index=False))]
    text = "\n".join(lines) + "\n"
    return f"**{title}**\n\n{text}" if title else text


_LATEX_TEXT = str.maketrans({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                             "×": r"$\times$", "↑": r"$\uparrow$", "↓": r"$\downarrow$"})


def to_latex(table: TableStats) -> str:
    """A booktabs tabular for the paper: `$\\textbf{0.95}^{(\\underline{0.99})}$ [2/3]` cells."""
    cells = _render(table, _LATEX)

    def line(values: list[str]) -> str:
        return " & ".join(values) + r" \\"

    lines = [rf"\begin{{tabular}}{{l{'c' * len(cells.columns)}}}", r"\toprule",
             line(["Kernel", *(str(h).translate(_LATEX_TEXT) for h in cells.columns)]), r"\midrule"]
    lines += [line([label.translate(_LATEX_TEXT), *values]) for label, values in zip(cells.index, cells.itertuples(index=False))]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: TableStats) -> str:
    """One row per kernel label, `<column>_mean`, `_max` (`_min` where lower is better) and
    `_seeds` per column: plain numbers for other tools; 10 significant digits, free of float noise."""
    frame = pd.DataFrame(index=pd.Index(table.labels, name="kernel_label"))
    for column in table.columns:
        top = "min" if column.lower_is_better else "max"
        stats = column.stats.reindex(table.labels)
        frame[f"{column.key}_mean"] = stats["mean"]
        frame[f"{column.key}_{top}"] = stats[top]
        frame[f"{column.key}_seeds"] = stats["seeds"].astype("Int64")
    buffer = io.StringIO()
    frame.to_csv(buffer, float_format="%.10g", lineterminator="\n")
    return buffer.getvalue()


def search_ranking(results: pd.DataFrame, metric: str, mode: str, top: int = 10) -> pd.DataFrame:
    """An Optuna search's suggestions, best first: each suggestion's metric at its trials' last
    evaluation, as mean and best over its seeds. `metric` is a reported name (`exact_match_2x`)."""
    from mosaic_core.metrics import parse_metric_name

    name, factor = parse_metric_name(metric)
    rows = results[(results["metric"] == name)
                   & (results["length_factor"].isna() if factor is None else results["length_factor"] == factor)]
    last = last_evaluation(rows)
    last = last.assign(suggestion=[_suggestion(label, values) for label, values
                                   in zip(last["kernel_label"], last["searched"])])
    stats = last.groupby("suggestion")["value"].agg(["mean", "min", "max", "count"])
    stats = stats.sort_values("mean", ascending=mode == "min").head(top)
    best = stats["min"] if mode == "min" else stats["max"]
    return pd.DataFrame({f"{metric} mean": stats["mean"].map("{:.4g}".format),
                         "best seed": best.map("{:.4g}".format), "seeds": stats["count"]})


def _suggestion(kernel_label: str, searched: str | None) -> str:
    """`Biweight train.lr=0.002739`; where the search also chose among variants, the variant's name
    (`entmax(alpha=1.5) model.n_layer=2 train.lr=0.002739`) instead of the kernel's label."""
    values = json.loads(searched) if isinstance(searched, str) else {}
    shown = [values.pop("variant", kernel_label)]
    shown += [f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()]
    return " ".join(shown)

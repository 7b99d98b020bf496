"""Our table beside the paper's: per cell ours, the paper's and the difference, and whether the
ranking of kernels in a column is the paper's.

The paper's Tables 1, 2 and 7 ship as data files in `analysis/paper_tables/` (transcribed from
the paper's text; each file names its source). Our numbers are rounded to the paper's decimals
before they are compared, so a cell that would print the same as the paper's differs by zero.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.configurations import KERNEL_LABEL
from analysis.paper_tables import PAPER_DIR, PAPER_TABLES
from analysis.tables import LAYOUTS, TableStats, column_header, table_stats
from mosaic_core.metrics import lower_is_better


def paper_for(results: pd.DataFrame) -> str:
    """The paper's table for the results' task family: table1 for RegBench, else table2."""
    return "table1" if "regbench" in set(results["task"].dropna()) else "table2"


def paper_cells(name: str) -> pd.DataFrame:
    """The paper's table as cells: kernel_label, key and header (as our columns name them), lower
    (is better), mean, top (the max over seeds, or the min where lower is better; NaN where the paper gives one number)."""
    table = PAPER_TABLES[name]
    raw = pd.read_csv(PAPER_DIR / table.file, comment="#")
    layout = LAYOUTS[table.by]
    if table.by == "num_examples":
        raw = raw[raw["model"] == "Memory Mosaics"].melt(
            id_vars=[KERNEL_LABEL, "num_examples"],
            value_vars=["accuracy", "tvd"],
            var_name="metric",
            value_name="mean",
        )
        raw["top"] = np.nan
    else:
        raw = raw.rename(columns={"max": "top"})
    names = [column_header(layout, values, {}) for values in raw.to_dict("records")]
    lower = (
        raw["metric"].map(lower_is_better)
        if "metric" in raw
        else lower_is_better(layout.metrics[0])
    )
    return raw.assign(
        key=[key for key, _ in names], header=[header for _, header in names], lower=lower
    )[[KERNEL_LABEL, "key", "header", "lower", "mean", "top"]]


def _ours(stats: TableStats) -> pd.DataFrame:
    """Our cells, one configuration per kernel label; ValueError where a kernel has several."""
    several = stats.rows[KERNEL_LABEL].value_counts()
    several = several[several > 1]
    if len(several):
        keys = ", ".join(str(key) for key in stats.rows.columns[1:])
        raise ValueError(
            f"{several.index[0]} has {several.iloc[0]} configurations (they differ in {keys}); "
            "pick one per kernel with --where KEY=VALUE"
        )
    cells = []
    for column in stats.columns:
        top = "min" if column.lower_is_better else "max"
        for label, cell in column.stats.iterrows():
            cells.append(
                {
                    KERNEL_LABEL: stats.rows.at[label, KERNEL_LABEL],
                    "key": column.key,
                    "ours_mean": cell["mean"],
                    "ours_top": cell[top],
                    "seeds": cell["seeds"],
                }
            )
    return pd.DataFrame(cells, columns=[KERNEL_LABEL, "key", "ours_mean", "ours_top", "seeds"])


def _ranks(cells: pd.DataFrame, value: str) -> pd.Series:
    """Each kernel's rank in its column (1 is best; equal shown values share a rank), among the
    kernels both tables have."""
    both = cells["ours_mean"].notna()
    signed = cells[value].where(cells["lower"].astype(bool), -cells[value])
    return signed[both].groupby(cells.loc[both, "key"]).rank(method="min")


def compare(
    results: pd.DataFrame,
    paper: str,
    *,
    select: str | None = None,
    conditions: Sequence[str] = (),
    tolerance: float = 0.0,
    planned_seeds: int | None = None,
) -> pd.DataFrame:
    """One line per cell of the paper's table: ours (mean, top, seeds), the paper's, the
    differences at the paper's decimals, both ranks, and whether the cell differs by more than
    `tolerance` or ranks otherwise. ValueError when our results cannot be laid out as that table."""
    table = PAPER_TABLES[paper]
    stats = table_stats(
        results, by=table.by, select=select, conditions=conditions, planned_seeds=planned_seeds
    )
    cells = paper_cells(paper).merge(_ours(stats), on=[KERNEL_LABEL, "key"], how="left")
    for value in ("ours_mean", "ours_top"):
        cells[value] = cells[value].astype(float).round(table.decimals)
    cells["diff_mean"] = (cells["ours_mean"] - cells["mean"]).round(table.decimals)
    cells["diff_top"] = (cells["ours_top"] - cells["top"]).round(table.decimals)
    cells["rank_ours"], cells["rank_paper"] = _ranks(cells, "ours_mean"), _ranks(cells, "mean")
    slack = tolerance + 10.0 ** -(table.decimals + 3)  # rounding noise of the differences
    cells["differs"] = (cells["diff_mean"].abs() > slack) | (cells["diff_top"].abs() > slack)
    cells["rank_differs"] = cells["rank_ours"].notna() & (cells["rank_ours"] != cells["rank_paper"])
    cells.attrs.update(
        planned=stats.planned_seeds,
        select=stats.select,
        decimals=table.decimals,
        not_in_paper=sorted(set(stats.rows[KERNEL_LABEL]) - set(cells[KERNEL_LABEL])),
    )
    return cells


def _shown(mean: float, top: float, decimals: int) -> str:
    if np.isnan(mean):
        return "—"
    return f"{mean:.{decimals}f}" + ("" if np.isnan(top) else f"^({top:.{decimals}f})")


def _signed(value: float, decimals: int) -> str:
    return "" if np.isnan(value) else f"{value:+.{decimals}f}"


def comparison_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The comparison as shown: Kernel, Column, Ours (`[n/N]` where seeds are missing), Paper,
    Δ mean, Δ max, ranks, and a flag where the cell differs or ranks otherwise."""
    d, planned = cells.attrs["decimals"], cells.attrs["planned"]

    def ours(row: pd.Series) -> str:
        short = planned and not np.isnan(row["ours_mean"]) and row["seeds"] < planned
        return _shown(row["ours_mean"], row["ours_top"], d) + (
            f" [{int(row['seeds'])}/{planned}]" if short else ""
        )

    flags = [
        ", ".join(flag for flag, on in (("differs", differs), ("rank differs", ranked)) if on)
        or ("missing" if np.isnan(mean) else "")
        for differs, ranked, mean in zip(
            cells["differs"], cells["rank_differs"], cells["ours_mean"]
        )
    ]
    return pd.DataFrame(
        {
            "Column": list(cells["header"]),
            "Ours": [ours(row) for _, row in cells.iterrows()],
            "Paper": [_shown(m, t, d) for m, t in zip(cells["mean"], cells["top"])],
            "Δ mean": [_signed(v, d) for v in cells["diff_mean"]],
            "Δ max": [_signed(v, d) for v in cells["diff_top"]],
            "Rank ours/paper": [
                "" if np.isnan(o) else f"{o:.0f}/{p:.0f}"
                for o, p in zip(cells["rank_ours"], cells["rank_paper"])
            ],
            "Flag": flags,
        },
        index=pd.Index(cells[KERNEL_LABEL], name="Kernel"),
    )


def summary(cells: pd.DataFrame, tolerance: float) -> list[str]:
    """What a reader checks first: how many cells differ, the columns whose ranking is not the paper's."""
    present = cells["ours_mean"].notna()
    reranked = list(dict.fromkeys(cells.loc[cells["rank_differs"], "header"]))
    lines = [
        f"{int(cells['differs'].sum())} of {int(present.sum())} cells differ from the paper by more than "
        f"{tolerance:g} (at the paper's {cells.attrs['decimals']} decimals); {int((~present).sum())} missing here",
        "ranking of kernels differs from the paper's in: " + ", ".join(reranked)
        if reranked
        else "ranking of kernels: as the paper's in every column",
    ]
    if cells.attrs["not_in_paper"]:
        lines.append("not in the paper's table: " + ", ".join(cells.attrs["not_in_paper"]))
    return lines


def to_csv(cells: pd.DataFrame) -> str:
    """The comparison's numbers, one line per cell."""
    columns = [
        KERNEL_LABEL,
        "key",
        "ours_mean",
        "ours_top",
        "seeds",
        "mean",
        "top",
        "diff_mean",
        "diff_top",
        "rank_ours",
        "rank_paper",
        "differs",
        "rank_differs",
    ]
    frame = cells[columns].rename(
        columns={"key": "column", "mean": "paper_mean", "top": "paper_top"}
    )
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.10g", lineterminator="\n")
    return buffer.getvalue()

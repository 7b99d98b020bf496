"""Our table beside the paper's: what in our setup is not the paper's, per cell ours, the paper's
and the difference, and whether the ranking of kernels in a column is the paper's, judged against
the seed noise of both.

The paper's Tables 1, 2 and 7 ship as data files in `analysis/paper_tables/` (transcribed from
the paper's text; each file names its source), with the setup of the experiments behind them
(`setup.csv`: Tables 5 and 6, the captions). Our numbers are rounded to the paper's decimals
before they are compared, so a cell that would print the same as the paper's differs by zero. A
difference counts only outside both the paper's max–mean spread and our 95 % t interval
(`analysis.noise`); the rest is "within seed noise".
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.configurations import KERNEL_LABEL, show
from analysis.noise import METHOD, overlaps
from analysis.paper_tables import PAPER_DIR, PAPER_TABLES, SETUP_FILE
from analysis.schema import TYPED_CONFIG
from analysis.tables import LAYOUTS, TableStats, column_header, table_stats
from mosaic_core.config import TrialConfig, flatten
from mosaic_core.kernel_specs import resolve_kernel
from mosaic_core.metrics import lower_is_better
from mosaic_core.reference_code import CHANGED_KERNELS, QUIRKS

DIFFERS, NOISE = "differs", "within seed noise"
RANK_DIFFERS, RANK_NOISE = "rank differs", "rank within seed noise"
# settings of setup.csv that are no config key: training sequences (steps × batch × accumulation),
# and seeds per configuration
EXAMPLES, SEEDS = "train.examples", "seeds"
_SETTING_NAMES = {
    EXAMPLES: "training sequences (steps × batch)",
    SEEDS: "seeds per configuration",
    "model.kernel_params.b": "ReLUmax b",
}


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


def paper_setup(name: str) -> pd.DataFrame:
    """The rows of `setup.csv` for the experiment behind the paper's table `name`: task and kernel
    ("" for all), setting, the paper's value(s) (`2|4|8` where it searched) and source."""
    setup = pd.read_csv(PAPER_DIR / SETUP_FILE, comment="#", dtype=str, keep_default_na=False)
    return setup[setup["experiment"] == PAPER_TABLES[name].experiment]


def our_settings(
    results: pd.DataFrame, configs: Sequence[Mapping[str, Any]] | None
) -> pd.DataFrame:
    """One line per trial: its task, canonical kernel and settings by dotted key (and
    `train.examples`), from the sweep's trial configs where given, else from the results' typed
    columns (which hold no batch, lengths or steps)."""
    if configs is None:
        typed = results.drop_duplicates("trial_id").reindex(columns=[*TYPED_CONFIG])
        typed = typed.rename(columns=TYPED_CONFIG)
        return typed.assign(task=typed["task.name"], kernel=typed["model.kernel"])
    lines = []
    for config in configs:
        trial = TrialConfig.model_validate(config)
        train = trial.train
        lines.append(
            {
                **flatten(trial.model_dump(mode="json")),
                "task": trial.task.name,
                "kernel": resolve_kernel(trial.model.kernel, **trial.model.kernel_params)[0],
                EXAMPLES: train.max_steps * train.batch_size * train.grad_accum_steps,
            }
        )
    return pd.DataFrame(lines)


def _allowed(value: Any, paper: str) -> bool:
    """Whether our value is one of the paper's (`2|4|8`): numbers compare as numbers."""
    for choice in paper.split("|"):
        try:
            if np.isclose(float(value), float(choice), rtol=1e-9, atol=0.0):
                return True
        except (TypeError, ValueError):
            if str(value) == choice:
                return True
    return False


def _compared_settings(
    paper: str, ours: pd.DataFrame, seeds: int | None, tasks: set[str]
) -> Iterator[tuple[Any, list[Any]]]:
    """(setup.csv row, our values) for each setting of the paper's experiment that applies to the
    `tasks` we ran and of which we know our values (`seeds` per configuration)."""
    for row in paper_setup(paper).itertuples(index=False):
        if row.task and row.task not in tasks:
            continue
        mine = ours[ours["task"] == row.task] if row.task else ours[ours["task"].isin(tasks)]
        mine = mine[mine["kernel"] == row.kernel] if row.kernel else mine
        if row.setting == SEEDS:
            values = [] if seeds is None else [seeds]
        else:
            values = sorted(set(mine.get(row.setting, pd.Series(dtype=object)).dropna()), key=str)
        if values:
            yield row, values


def setup_lines(
    paper: str,
    results: pd.DataFrame,
    configs: Sequence[Mapping[str, Any]] | None,
    seeds: int | None,
) -> list[str]:
    """What a reader must know first: each setting of ours that is not the paper's experiment,
    `- sort · n_layer: 1 vs 2 (Table 6)`; `configs`: the sweep's trial configs, if known."""
    tasks = set(results["task"].dropna())
    compared = list(_compared_settings(paper, our_settings(results, configs), seeds, tasks))
    differences = [
        f"- {f'{row.task} · ' if row.task else ''}"
        f"{_SETTING_NAMES.get(row.setting, row.setting.rsplit('.', 1)[-1])}: "
        f"{', '.join(show(value) for value in values)} vs {row.paper.replace('|', ' or ')} "
        f"({row.source})"
        for row, values in compared
        if not all(_allowed(value, row.paper) for value in values)
    ]
    unknown = (
        " (without the sweep's trial configs: batch, lengths and training steps not checked)"
        if configs is None
        else ""
    )
    if not compared:
        return [f"Setup: not checked, none of its settings is known here{unknown}."]
    if not differences:
        return [f"Setup: as the paper's in every setting checked{unknown}."]
    return [f"Not the paper's setup (ours vs the paper's){unknown}:", *differences]


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
                    "ci_low": cell["ci_low"],
                    "ci_high": cell["ci_high"],
                }
            )
    return pd.DataFrame(
        cells,
        columns=[KERNEL_LABEL, "key", "ours_mean", "ours_top", "seeds", "ci_low", "ci_high"],
    )


def _ranks(cells: pd.DataFrame, value: str) -> pd.Series:
    """Each kernel's rank in its column (1 is best; equal shown values share a rank), in the
    columns where two or more kernels are common to both tables (NaN elsewhere)."""
    signed = cells[value].where(cells["lower"].astype(bool), -cells[value])
    return signed.where(cells["judged"]).groupby(cells["key"]).rank(method="min")


def _our_interval(cell: pd.Series, slack: float) -> tuple[float, float]:
    """Our 95 % interval, widened by the rounding slack; our mean alone where one seed gives none."""
    low, high = cell["ci_low"], cell["ci_high"]
    if np.isnan(low):
        low = high = cell["ours_mean"]
    return low - slack, high + slack


def _paper_interval(cell: pd.Series) -> tuple[float, float]:
    """The paper's mean ± its max–mean spread (its only word on seed noise; 0 where it gives one number)."""
    return cell["mean"] - cell["spread"], cell["mean"] + cell["spread"]


def _beyond_noise(cells: pd.DataFrame, slack: float) -> pd.Series:
    """Cells whose mean lies outside the paper's spread and the paper's mean outside our interval."""
    outside_paper = (cells["ours_mean"] - cells["mean"]).abs() > cells["spread"] + slack
    outside_ours = [
        not overlaps(_our_interval(cell, slack), (cell["mean"], cell["mean"]))
        for _, cell in cells.iterrows()
    ]
    return outside_paper & pd.Series(outside_ours, index=cells.index, dtype=bool)


def _rank_flags(cells: pd.DataFrame, slack: float) -> pd.Series:
    """Per cell whose rank is not the paper's: RANK_DIFFERS where its kernel and another are
    ordered against the paper's order with both our intervals and the paper's spreads apart,
    RANK_NOISE where every such swap is within either's noise; "" otherwise."""
    flags = pd.Series("", index=cells.index)
    for _, column in cells[cells["judged"]].groupby("key"):
        for (i, a), (j, b) in itertools.combinations(column.iterrows(), 2):
            sign = -1 if a["lower"] else 1
            if np.sign(sign * (a["ours_mean"] - b["ours_mean"])) == np.sign(
                sign * (a["mean"] - b["mean"])
            ):
                continue
            real = not overlaps(_our_interval(a, slack), _our_interval(b, slack)) and not overlaps(
                _paper_interval(a), _paper_interval(b)
            )
            for index in (i, j):
                moved = cells.at[index, "rank_ours"] != cells.at[index, "rank_paper"]
                if moved and (real or flags[index] != RANK_DIFFERS):
                    flags[index] = RANK_DIFFERS if real else RANK_NOISE
    return flags


def compare(
    results: pd.DataFrame,
    paper: str,
    *,
    select: str | None = None,
    conditions: Sequence[str] = (),
    tolerance: float | None = None,
    planned_seeds: int | None = None,
    configs: Sequence[Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """One line per cell both tables have: ours (mean, top, seeds, 95 % interval), the paper's,
    the differences at the paper's decimals, both ranks (in columns with two or more common
    kernels), and flags: a difference beyond seed noise (with `tolerance`: beyond it) or within
    it, and a rank swap beyond or within seed noise. attrs: the setup check (`configs`: the
    sweep's trial configs), how many of the paper's cells we lack, and more. ValueError when our
    results cannot be laid out as that table."""
    table = PAPER_TABLES[paper]
    stats = table_stats(
        results, by=table.by, select=select, conditions=conditions, planned_seeds=planned_seeds
    )
    theirs = paper_cells(paper)
    cells = theirs.merge(_ours(stats), on=[KERNEL_LABEL, "key"], how="inner")
    for value in ("ours_mean", "ours_top"):
        cells[value] = cells[value].astype(float).round(table.decimals)
    cells["spread"] = (cells["top"] - cells["mean"]).abs().fillna(0.0)
    cells["diff_mean"] = (cells["ours_mean"] - cells["mean"]).round(table.decimals)
    cells["diff_top"] = (cells["ours_top"] - cells["top"]).round(table.decimals)
    cells["judged"] = cells.groupby("key")[KERNEL_LABEL].transform("size") >= 2
    cells["rank_ours"], cells["rank_paper"] = _ranks(cells, "ours_mean"), _ranks(cells, "mean")
    slack = 10.0 ** -(table.decimals + 3)  # rounding noise of the differences
    if tolerance is None:
        cells["differs"] = _beyond_noise(cells, slack)
    else:
        beyond = tolerance + slack
        cells["differs"] = (cells["diff_mean"].abs() > beyond) | (cells["diff_top"].abs() > beyond)
    cells["noise"] = ~cells["differs"] & (cells["diff_mean"].abs() > slack)
    cells["rank_flag"] = _rank_flags(cells, slack)
    cells.attrs.update(
        planned=stats.planned_seeds,
        select=stats.select,
        decimals=table.decimals,
        tolerance=tolerance,
        lacking=len(theirs) - len(cells),
        paper_cells=len(theirs),
        columns=theirs["key"].nunique(),
        not_in_paper=sorted(set(stats.rows[KERNEL_LABEL]) - set(theirs[KERNEL_LABEL])),
        setup=[
            *setup_lines(paper, results, configs, stats.planned_seeds),
            *reference_code_lines(paper, results, configs),
        ],
    )
    return cells


def reference_code_lines(
    paper: str, results: pd.DataFrame, configs: Sequence[Mapping[str, Any]] | None
) -> list[str]:
    """With `model.reference_code` off, the rows of ours the paper's code would compute otherwise
    (its masks and scores for some kernels, README "Fidelity to the paper"); nothing when on."""
    family = "regbench" if PAPER_TABLES[paper].experiment == "table1" else "lm_length"
    if configs is not None:
        flags = {str(config.get("model", {}).get("reference_code", False)) for config in configs}
    else:
        flags = set(results.get("reference_code", pd.Series(dtype=object)).fillna("False"))
    if flags - {"False"}:
        return []
    kernels = results.get("kernel", pd.Series(index=results.index, dtype=object))
    changed = results[kernels.isin(CHANGED_KERNELS[family])]
    labels = sorted(set(changed[KERNEL_LABEL].dropna()))
    if not labels:
        return []
    return [
        f"model.reference_code is off (the paper's text): its code ({QUIRKS[family]}) would change "
        f"the rows {', '.join(labels)}; `model.reference_code: true` reproduces it."
    ]


def _shown(mean: float, top: float, decimals: int) -> str:
    if np.isnan(mean):
        return "—"
    return f"{mean:.{decimals}f}" + ("" if np.isnan(top) else f"^({top:.{decimals}f})")


def _signed(value: float, decimals: int) -> str:
    return "" if np.isnan(value) else f"{value:+.{decimals}f}"


def comparison_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The comparison as shown, a line per common cell: Kernel, Column, Ours (`[n/N]` where seeds
    are missing), our 95 % interval, Paper, Δ mean, Δ max, ranks, and the flags."""
    d, planned = cells.attrs["decimals"], cells.attrs["planned"]

    def ours(row: pd.Series) -> str:
        short = planned and row["seeds"] < planned
        return _shown(row["ours_mean"], row["ours_top"], d) + (
            f" [{int(row['seeds'])}/{planned}]" if short else ""
        )

    def interval(row: pd.Series) -> str:
        return "" if np.isnan(row["ci_low"]) else f"[{row['ci_low']:.{d}f}, {row['ci_high']:.{d}f}]"

    flags = [
        ", ".join(flag for flag in (DIFFERS if differs else NOISE if noise else "", rank) if flag)
        for differs, noise, rank in zip(cells["differs"], cells["noise"], cells["rank_flag"])
    ]
    return pd.DataFrame(
        {
            "Column": list(cells["header"]),
            "Ours": [ours(row) for _, row in cells.iterrows()],
            "Ours 95 % CI": [interval(row) for _, row in cells.iterrows()],
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


def _ranking_lines(cells: pd.DataFrame) -> list[str]:
    """Whether the kernels rank as the paper's, in the columns with two or more common kernels."""
    judged = cells[cells["judged"]]
    if judged.empty:
        return [
            "ranking of kernels: not compared (no column has two kernels in common with the paper)"
        ]
    real = list(dict.fromkeys(judged.loc[judged["rank_flag"] == RANK_DIFFERS, "header"]))
    noisy = [
        header
        for header in dict.fromkeys(judged.loc[judged["rank_flag"] == RANK_NOISE, "header"])
        if header not in real
    ]
    columns = judged["key"].nunique()
    lines = [
        "ranking of kernels differs from the paper's beyond seed noise in: " + ", ".join(real)
        if real
        else f"ranking of kernels: as the paper's, up to seed noise, in the {columns} column(s) "
        "with two or more common kernels"
    ]
    if noisy:
        lines.append("ranking differs only within seed noise in: " + ", ".join(noisy))
    unjudged = cells.loc[~cells["judged"], "key"].nunique()
    if unjudged:
        lines.append(f"not ranked: {unjudged} column(s) with fewer than two common kernels")
    return lines


def summary(cells: pd.DataFrame) -> list[str]:
    """What a reader checks after the table: how many cells differ and by what rule, what we lack,
    and where the ranking of kernels is not the paper's."""
    tolerance, d = cells.attrs["tolerance"], cells.attrs["decimals"]
    rule = (
        "beyond seed noise (outside both the paper's max–mean spread and our interval)"
        if tolerance is None
        else f"by more than {tolerance:g}"
    )
    noise = f"; {int(cells['noise'].sum())} more within seed noise" if tolerance is None else ""
    lines = [
        f"{int(cells['differs'].sum())} of {len(cells)} common cells differ from the paper's {rule}, "
        f"at the paper's {d} decimals{noise}; {cells.attrs['lacking']} of the paper's "
        f"{cells.attrs['paper_cells']} cells have no result here",
        *_ranking_lines(cells),
        f"our interval: the {METHOD}",
    ]
    if cells.attrs["not_in_paper"]:
        lines.append("not in the paper's table: " + ", ".join(cells.attrs["not_in_paper"]))
    return lines


def report(cells: pd.DataFrame, title: str) -> str:
    """The comparison as Markdown: the setup check first, then the title and table of common
    cells, then the summary."""
    from analysis.tables import to_markdown

    setup = "\n".join(cells.attrs["setup"]) + "\n\n"
    table = to_markdown(comparison_table(cells), title=title) if len(cells) else f"**{title}**\n"
    return setup + table + "\n" + "\n".join(summary(cells)) + "\n"


def to_csv(cells: pd.DataFrame) -> str:
    """The comparison's numbers, one line per common cell."""
    columns = {
        KERNEL_LABEL: KERNEL_LABEL,
        "key": "column",
        "ours_mean": "ours_mean",
        "ours_top": "ours_top",
        "seeds": "seeds",
        "ci_low": "ci_low",
        "ci_high": "ci_high",
        "mean": "paper_mean",
        "top": "paper_top",
        "diff_mean": "diff_mean",
        "diff_top": "diff_top",
        "rank_ours": "rank_ours",
        "rank_paper": "rank_paper",
        "differs": "differs",
        "noise": "within_seed_noise",
        "rank_flag": "rank_flag",
    }
    frame = cells[list(columns)].rename(columns=columns)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.10g", lineterminator="\n")
    return buffer.getvalue()

"""A sweep's figures, ready for a paper: exact match and support size vs. length (one panel per
task), validation loss vs. step (the paper's Figure 2) and the per-position OOD loss (Figure 5).

Each curve is one configuration (as a table's row: `Gaussian · lr 1e-4`), the mean over seeds with
a min–max band, one colour per configuration across panels (Okabe–Ito's colour-blind-safe
palette) and one line style and marker per kernel, so curves differ in print and in grey too;
failed trials are left out. One legend per figure, under the panels: it covers no data and no
title. A point
of a length or position figure holds one budget, as a table's cell (`analysis.budgets`): seeds
stopped early are left out where others trained longer, and the legend names them. Length
factors double from one evaluation to the next, so the length axis is log₂ with a tick at each
evaluated factor. Every family also gets its training curves: train_loss and the headline
metric of its table vs. step. Files are 300-dpi PNG, or PDF/SVG.
Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting needs no
display and leaves the process's backend alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from analysis.budgets import NOTE, at_one_budget, trial_budgets
from analysis.configurations import ROW, config_frame, labelled, row_keys
from analysis.tables import selected, succeeded
from mosaic_core.files import replacing
from mosaic_core.metrics import EXACT_MATCH, OOD_LOSS_EMA, SUPPORT_SIZE, TRAIN_LOSS, VAL_LOSS

OOD_PREFIX = f"{OOD_LOSS_EMA}/pos"
FORMATS = ("png", "pdf", "svg")  # what `make_plots` writes: matplotlib's raster and vector formats
DPI = 300  # a PNG fit for print; PDF and SVG are vector, and embed nothing at a lower resolution
LENGTH_AXIS = "× eval_length"  # the length factor multiplies the task's eval_length
# Okabe & Ito's palette (black left out for the bands): told apart with any colour vision
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _figure(
    rows: pd.DataFrame,
    *,
    panel: str,
    x: str,
    title: str,
    xlabel: str,
    ylabel: str,
    panel_title: Callable[[object], str] = str,
    logx: bool = False,
    ticks_at_data: bool = False,
    budgets: pd.DataFrame | None = None,
) -> Figure | None:
    """One panel per value of `panel`, a mean line and min–max band per configuration; None without
    data. With `budgets` (`trial_budgets`), each point from the seeds of its highest budget."""
    rows = rows[succeeded(rows) & np.isfinite(rows["value"].astype(float))].dropna(
        subset=[panel, x, "kernel_label"]
    )
    if rows.empty:
        return None
    frame, keys = config_frame(rows)
    rows = labelled(frame, row_keys(frame, keys, [panel, x]))
    notes = {}
    if budgets is not None:
        rows = at_one_budget(rows, budgets, [panel, ROW, x])
        notes = rows[rows[NOTE] != ""].groupby(ROW)[NOTE].unique().map("; ".join).to_dict()
    stats = rows.groupby([panel, ROW, x])["value"].agg(["mean", "min", "max"])
    curves = {
        key: curve.droplevel([panel, ROW]) for key, curve in stats.groupby(level=[panel, ROW])
    }
    labels = list(dict.fromkeys(rows[ROW]))
    kernels = list(dict.fromkeys(rows["kernel"].fillna(rows["kernel_label"])))
    kernel_of = dict(zip(rows[ROW], rows["kernel"].fillna(rows["kernel_label"])))
    panels = sorted(rows[panel].unique())

    rows_of_legend = -(-len(labels) // _legend_columns(len(panels)))
    figure = Figure(
        figsize=(max(4.5 * len(panels), 6), 3.4 + 0.22 * rows_of_legend), layout="constrained"
    )
    FigureCanvasAgg(figure)
    figure.suptitle(f"{title} (mean over seeds, band min–max)", fontsize="medium")
    for ax, key in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for number, label in enumerate(labels):
            curve = curves.get((key, label))
            if curve is None:
                continue
            family = kernels.index(kernel_of[label])
            color = PALETTE[number % len(PALETTE)]
            style = dict(
                linestyle=LINE_STYLES[family % len(LINE_STYLES)],
                marker=MARKERS[family % len(MARKERS)],
            )
            shown = f"{label} [{notes[label]}]" if label in notes else label
            ax.plot(curve.index, curve["mean"], markersize=4, color=color, label=shown, **style)
            ax.fill_between(
                curve.index, curve["min"], curve["max"], color=color, alpha=0.15, linewidth=0
            )
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(panel_title(key), fontsize="medium")
        if logx:
            ax.set_xscale("log", base=2)
        if ticks_at_data:
            _ticks_at(ax, sorted(rows.loc[rows[panel] == key, x].unique()))
        ax.grid(alpha=0.3)
    _legend(figure)
    return figure


def _legend_columns(panels: int) -> int:
    """Legend entries side by side: two per panel's width, at least two."""
    return max(2, 2 * panels)


def _legend(figure: Figure) -> None:
    """One legend for all panels, under them (titles are above): a configuration once, even where
    several panels draw it."""
    named: dict[str, object] = {}
    for ax in figure.get_axes():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            named.setdefault(label, handle)
    columns = min(len(named), _legend_columns(len(figure.get_axes())))
    figure.legend(
        list(named.values()),
        list(named),
        loc="outside lower center",
        ncols=columns,
        fontsize="small",
    )


def _ticks_at(ax: Axes, values: list[float]) -> None:
    """A labelled tick at each value (`0.5`, `1`, `2`, …) and no others."""
    ax.set_xticks(values, labels=[f"{value:g}" for value in values])
    ax.xaxis.set_minor_locator(NullLocator())


def _by_length(results: pd.DataFrame, metric: str, title: str) -> Figure | None:
    rows = selected(results[(results["metric"] == metric) & results["length_factor"].notna()])
    return _figure(
        rows,
        budgets=trial_budgets(results),
        panel="task",
        x="length_factor",
        title=title,
        xlabel=LENGTH_AXIS,
        ylabel=title,
        logx=True,
        ticks_at_data=True,
    )


def _depth(key: object) -> str:
    return f"n_layer = {key}"


def _val_loss(results: pd.DataFrame) -> Figure | None:
    rows = results[results["metric"] == VAL_LOSS]
    return _figure(
        rows,
        panel="n_layer",
        x="step",
        title="validation loss",
        xlabel="step",
        ylabel="validation loss",
        panel_title=_depth,
    )


def _ood_per_position(results: pd.DataFrame) -> Figure | None:
    rows = selected(results[results["metric"].str.startswith(OOD_PREFIX, na=False)])
    rows = rows.assign(position=rows["metric"].str.removeprefix(OOD_PREFIX).astype(int))
    return _figure(
        rows,
        budgets=trial_budgets(results),
        panel="n_layer",
        x="position",
        title="OOD loss per position (EMA)",
        xlabel="position",
        ylabel="OOD loss",
        panel_title=_depth,
        logx=True,
    )


def _training_curves(results: pd.DataFrame) -> Figure | None:
    """train_loss and the family's headline metric (its table's first, at the shortest length)
    vs. step, a panel each per task: how every configuration trained."""
    # the tables' layouts know each family's headline metric
    from analysis.tables import headlines

    headline = next((found.metric for found in headlines(results)), VAL_LOSS)
    rows = results[results["metric"].isin([TRAIN_LOSS, headline])]
    factors = rows["length_factor"]
    rows = rows[factors.isna() | (factors == factors.min())]
    shortest = f" at {factors.min():g}×" if factors.notna().any() else ""
    names = {TRAIN_LOSS: TRAIN_LOSS, headline: f"{headline.replace('_', ' ')}{shortest}"}
    rows = rows.assign(curve=rows["metric"].map(names) + " · " + rows["task"].astype(str))
    return _figure(
        rows,
        panel="curve",
        x="step",
        title="training curves",
        xlabel="step",
        ylabel="value",
    )


def figures(results: pd.DataFrame) -> dict[str, Figure]:
    """File stem -> figure, for each figure the results have data for."""
    drawn = {
        "training_curves": _training_curves(results),
        "exact_match_vs_length": _by_length(results, EXACT_MATCH, "exact match"),
        "val_loss_vs_step": _val_loss(results),
        "ood_loss_per_position": _ood_per_position(results),
        "support_size_vs_length": _by_length(results, SUPPORT_SIZE, "mean support size"),
    }
    return {stem: figure for stem, figure in drawn.items() if figure is not None}


def make_plots(
    results: pd.DataFrame, out_dir: str | Path, formats: tuple[str, ...] = ("png",)
) -> list[Path]:
    """Write the figures the results have data for into `out_dir`, a file per format (of FORMATS);
    returns their paths."""
    paths = []
    for stem, figure in figures(results).items():
        for suffix in formats:
            path = Path(out_dir) / f"{stem}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path) as file:
                figure.savefig(file, format=suffix, dpi=DPI)
            paths.append(path)
    return paths

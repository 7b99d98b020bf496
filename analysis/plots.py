"""A sweep's figures as PNG files: exact match and support size vs. length, validation loss vs.
step (the paper's Figure 2) and the per-position OOD loss (Figure 5).

Each curve is one configuration (as a table's row: `Gaussian · lr 1e-4`), the mean over seeds with
a min–max band, one colour per configuration across panels; failed trials are left out.
Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting needs no
display and leaves the process's backend alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.configurations import ROW, config_frame, labelled, row_keys
from analysis.tables import selected, succeeded

OOD_PREFIX = "ood_loss_ema/pos"


def _figure(
    rows: pd.DataFrame, *, panel: str, x: str, title: str, xlabel: str, ylabel: str,
    panel_title: Callable[[object], str] = str, logx: bool = False,
) -> Figure | None:
    """One panel per value of `panel`, a mean line and min–max band per configuration; None without data."""
    rows = rows[succeeded(rows) & np.isfinite(rows["value"].astype(float))].dropna(subset=[panel, x, "kernel_label"])
    if rows.empty:
        return None
    frame, keys = config_frame(rows)
    rows = labelled(frame, row_keys(frame, keys, [panel, x]))
    stats = rows.groupby([panel, ROW, x])["value"].agg(["mean", "min", "max"])
    curves = {key: curve.droplevel([panel, ROW]) for key, curve in stats.groupby(level=[panel, ROW])}
    labels = list(dict.fromkeys(rows[ROW]))
    panels = sorted(rows[panel].unique())

    figure = Figure(figsize=(4.5 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"{title}: mean over seeds, band min–max")
    for ax, key in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for number, label in enumerate(labels):
            curve = curves.get((key, label))
            if curve is None:
                continue
            color = f"C{number % 10}"
            ax.plot(curve.index, curve["mean"], marker="o", markersize=3, color=color, label=label)
            ax.fill_between(curve.index, curve["min"], curve["max"], color=color, alpha=0.2, linewidth=0)
        ax.set(title=panel_title(key), xlabel=xlabel, ylabel=ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure


def _by_length(results: pd.DataFrame, metric: str, title: str) -> Figure | None:
    rows = selected(results[(results["metric"] == metric) & results["length_factor"].notna()])
    return _figure(rows, panel="task", x="length_factor", title=title, xlabel="length factor (× training length)",
                   ylabel=title)


def _depth(key: object) -> str:
    return f"n_layer = {key}"


def _val_loss(results: pd.DataFrame) -> Figure | None:
    rows = results[results["metric"] == "val_loss"]
    return _figure(rows, panel="n_layer", x="step", title="validation loss", xlabel="step", ylabel="validation loss",
                   panel_title=_depth)


def _ood_per_position(results: pd.DataFrame) -> Figure | None:
    rows = selected(results[results["metric"].str.startswith(OOD_PREFIX, na=False)])
    rows = rows.assign(position=rows["metric"].str.removeprefix(OOD_PREFIX).astype(int))
    return _figure(rows, panel="n_layer", x="position", title="OOD loss per position (EMA)", xlabel="position",
                   ylabel="OOD loss", panel_title=_depth, logx=True)


def make_plots(results: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the figures the results have data for into `out_dir`; returns their paths."""
    figures = {
        "exact_match_vs_length.png": _by_length(results, "exact_match", "exact match"),
        "val_loss_vs_step.png": _val_loss(results),
        "ood_loss_per_position.png": _ood_per_position(results),
        "support_size_vs_length.png": _by_length(results, "support_size", "mean support size"),
    }
    paths = []
    for name, figure in figures.items():
        if figure is None:
            continue
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        paths.append(path)
    return paths

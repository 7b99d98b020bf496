"""`mosaic-sweep table`, `compare`, `plot` and `status`: a sweep's results, from its folder (or
rebuilt from MLflow)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer

from analysis.paper_tables import PAPER_TABLES
from mosaic_core.files import own_folder, write_file
from orchestrator.cli.common import echo_markdown, fail
from orchestrator.locations import LocationError, check_output_file
from orchestrator.sweep_folder import (
    PLOTS,
    SweepFolder,
    SweepFolderError,
    check_new_folder,
    check_tracking_uri,
    comparison_file,
    read_configs,
)

if TYPE_CHECKING:
    import pandas

# pandas, matplotlib and MLflow are imported by the commands, never at start-up

# choices of options, shown in --help and checked before any work
TableFormat = Literal["md", "latex", "csv"]
PaperName = Literal[tuple(PAPER_TABLES)]  # table1, table2, table7
# options several commands share
SkipBad = Annotated[
    bool,
    typer.Option(
        "--skip-bad",
        help="Read the results' other parts when one is unreadable (it is named on stderr).",
    ),
]
Where = Annotated[
    Optional[list[str]],
    typer.Option(
        metavar="KEY=VALUE",
        help="Only trials whose KEY is VALUE (lr=1e-4, kernel=softmax, model.dropout=0.1); "
        "repeatable.",
    ),
]
Select = Annotated[
    Optional[str],
    typer.Option(
        metavar="last|best:METRIC",
        help="Each trial's evaluation that counts: last, or best:METRIC (best:val_loss: the one "
        "with the lowest val_loss). Default: the paper's (RegBench: best:val_loss; otherwise last).",
    ),
]


def _results(
    sweep_dir: Path | None,
    from_mlflow: str | None = None,
    experiment: str | None = None,
    skip_bad: bool = False,
) -> "pandas.DataFrame":
    """The results frame of a sweep folder, or rebuilt from an MLflow experiment."""
    # pandas: here and below, the results' modules come with the command that reads them
    from analysis.results_store import ResultsStoreError, read_results, store_path

    if (sweep_dir is None) == (from_mlflow is None):
        raise fail("give either DIR or --from-mlflow URI --experiment NAME")
    if from_mlflow is None:
        if experiment is not None:
            raise fail("--experiment goes with --from-mlflow")
        if sweep_dir.exists() and not sweep_dir.is_dir():
            raise fail(f"DIR: {sweep_dir} is a file; give a sweep folder")
        try:
            results = read_results(sweep_dir, skip_bad=skip_bad)
        except ResultsStoreError as error:
            raise fail(str(error)) from None
        if results.empty:
            raise fail(f"no results in {store_path(sweep_dir)}")
        return results
    if experiment is None:
        raise fail("--from-mlflow needs --experiment NAME (the sweep's name)")
    _checked(check_tracking_uri, from_mlflow, "--from-mlflow", reading=True)
    # MLflow: only to rebuild results from it
    from analysis.mlflow_source import results_from_mlflow

    try:
        results = results_from_mlflow(from_mlflow, experiment)
    except ValueError as error:
        raise fail(str(error)) from None
    if results.empty:
        raise fail(f"MLflow experiment {experiment!r} at {from_mlflow} holds no results")
    return results


def _checked(check: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """A check of where a command reads or writes, its refusal one line."""
    try:
        check(*args, **kwargs)
    except LocationError as error:
        raise fail(str(error)) from None


def _trial_configs(sweep_dir: Path | None) -> list[dict] | None:
    """The sweep's planned trial configs, from its folder (None without one)."""
    try:
        return list(read_configs(sweep_dir).values()) if sweep_dir is not None else None
    except SweepFolderError:
        return None


def _planned_seeds(sweep_dir: Path | None) -> int | None:
    """Seeds per configuration as the sweep planned them, from its folder (None without one)."""
    configs = _trial_configs(sweep_dir)
    return None if configs is None else len({config.get("seed") for config in configs})


def _checked_select(select: str | None) -> str | None:
    # pandas
    from analysis.tables import check_select

    try:
        return None if select is None else check_select(select)
    except ValueError as error:
        raise fail(str(error)) from None


def table(
    sweep_dir: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="DIR", help="Sweep folder holding results.parquet; or use --from-mlflow."
        ),
    ] = None,
    metric: Annotated[
        Optional[str],
        typer.Option(
            help="Metric to show. Default: exact_match by length_factor, accuracy and tvd by "
            "num_examples, val_loss and ood_loss by n_layer."
        ),
    ] = None,
    fmt: Annotated[
        TableFormat, typer.Option("--format", help="md, latex (booktabs) or csv (numbers only).")
    ] = "md",
    by: Annotated[
        Optional[list[str]],
        typer.Option(
            metavar="KEY",
            help="Columns: first the layout, length_factor (Table 2), num_examples (RegBench, "
            "Table 1) or n_layer (losses per depth), default the results' task family; then any "
            "key the sweep varies (lr, model.dropout) as more columns. Repeatable.",
        ),
    ] = None,
    where: Where = None,
    select: Select = None,
    ci: Annotated[
        bool,
        typer.Option(
            "--ci",
            help="Cells as mean ± half width of the 95 % Student-t interval over seeds (md, "
            "latex; csv always has ci_low and ci_high).",
        ),
    ] = False,
    skip_bad: SkipBad = False,
    out: Annotated[
        Optional[Path], typer.Option(help="Write the table to this file instead of printing it.")
    ] = None,
    from_mlflow: Annotated[
        Optional[str],
        typer.Option(
            "--from-mlflow",
            metavar="URI",
            help="Rebuild the results from this MLflow tracking URI instead of DIR (the latest "
            "sweep run).",
        ),
    ] = None,
    experiment: Annotated[
        Optional[str], typer.Option(help="MLflow experiment, the sweep's name; with --from-mlflow.")
    ] = None,
) -> None:
    """Print a sweep's results table: one row per configuration, mean^(max) over seeds, best mean bold, best seed underlined."""
    # pandas
    from analysis.tables import LAYOUTS, markdown_cells, table_stats, to_csv, to_latex, to_markdown

    select = _checked_select(select)
    if out is not None:
        _checked(check_output_file, out, "--out")
    by = list(by or [])
    layout, columns_by = (by[0], by[1:]) if by and by[0] in LAYOUTS else (None, by)
    results = _results(sweep_dir, from_mlflow, experiment, skip_bad)
    try:
        stats = table_stats(
            results,
            by=layout,
            metric=metric,
            select=select,
            columns_by=columns_by,
            conditions=where or [],
            planned_seeds=_planned_seeds(sweep_dir),
        )
    except ValueError as error:
        raise fail(str(error)) from None
    text = {
        "md": lambda: to_markdown(markdown_cells(stats, ci)),
        "latex": lambda: to_latex(stats, ci),
        "csv": lambda: to_csv(stats),
    }[fmt]()
    if out is None:
        echo_markdown(text) if fmt == "md" else typer.echo(text, nl=False)
    else:
        write_file(out, text)
        typer.echo(f"wrote {out}")


def compare(
    sweep_dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="Sweep folder holding results.parquet.")
    ],
    paper: Annotated[
        Optional[PaperName],
        typer.Option(
            help="The paper's table: table1 (RegBench), table2 or table7 (length "
            "generalisation). Default: the results' task family."
        ),
    ] = None,
    select: Select = None,
    where: Where = None,
    tolerance: Annotated[
        Optional[float],
        typer.Option(
            min=0,
            help="Flag cells whose mean or max differs from the paper's by more than this. "
            "Default: the seed noise (outside both the paper's max–mean spread and our 95 % "
            "interval).",
        ),
    ] = None,
    skip_bad: SkipBad = False,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help=f"Folder for {comparison_file('<table>', '.md')} and .csv. Default: DIR."
        ),
    ] = None,
) -> None:
    """Our results beside the paper's table: first the settings that are not the paper's, then
    per common cell ours, the paper's and the difference, and where the ranking of kernels in a
    column is not the paper's, beyond or within seed noise."""
    # pandas
    from analysis.comparison import compare as compare_cells
    from analysis.comparison import paper_for, report, to_csv
    from analysis.tables import describe_select

    select = _checked_select(select)
    folder = out or sweep_dir
    _checked(check_new_folder, folder, "--out" if out else "DIR")
    results = _results(sweep_dir, skip_bad=skip_bad)
    paper = paper or paper_for(results)
    try:
        cells = compare_cells(
            results,
            paper,
            select=select,
            conditions=where or [],
            tolerance=tolerance,
            planned_seeds=_planned_seeds(sweep_dir),
            configs=_trial_configs(sweep_dir),
        )
    except ValueError as error:
        raise fail(str(error)) from None
    title = (
        f"{sweep_dir.name} vs. the paper's {PAPER_TABLES[paper].what}; ours at "
        f"{describe_select(cells.attrs['select'])}, mean^(max) over seeds"
    )
    markdown = report(cells, title)
    folder.mkdir(parents=True, exist_ok=True)
    write_file(folder / comparison_file(paper, ".md"), markdown)
    write_file(folder / comparison_file(paper, ".csv"), to_csv(cells))
    typer.echo(markdown, nl=False)
    typer.echo(f"wrote {folder / comparison_file(paper, '.md')} and .csv")


def plot(
    sweep_dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="Sweep folder holding results.parquet.")
    ],
    out: Annotated[
        Optional[Path], typer.Option(help=f"Folder for the figures. Default: DIR/{PLOTS}.")
    ] = None,
    formats: Annotated[
        Optional[list[str]],
        typer.Option(
            "--format",
            metavar="png|pdf|svg",
            help="File format(s): repeat the option or give a comma list. Default: png (300 dpi).",
        ),
    ] = None,
    skip_bad: SkipBad = False,
) -> None:
    """Draw a sweep's figures for the metrics it has: exact match and support size vs. length (log2,
    a panel per task), validation loss vs. step, per-position OOD loss; a curve per configuration."""
    # matplotlib and pandas
    from analysis.plots import FORMATS, make_plots

    chosen = tuple(
        dict.fromkeys(
            name.strip().lower() for value in formats or ["png"] for name in value.split(",")
        )
    )
    unknown = [name for name in chosen if name not in FORMATS]
    if unknown:
        raise fail(
            f"--format {', '.join(unknown)} is not a figure format; give {', '.join(FORMATS)}"
        )
    _checked(check_new_folder, out or sweep_dir / PLOTS, "--out" if out else "DIR")
    results = _results(sweep_dir, skip_bad=skip_bad)
    paths = make_plots(results, out or own_folder(sweep_dir / PLOTS), chosen)
    if not paths:
        present = ", ".join(sorted(results["metric"].dropna().unique()))
        raise fail(
            f"nothing to plot in {sweep_dir}: no exact_match, val_loss, ood_loss_ema/pos* or support_size; metrics present: {present}"
        )
    for path in paths:
        typer.echo(str(path))


def status(
    sweep_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A sweep folder.")],
    skip_bad: SkipBad = False,
) -> None:
    """Trials by state and the best so far, from the sweep folder alone (while it runs, or after)."""
    # pandas
    from analysis.results_store import ResultsStoreError, read_results, trial_states
    from analysis.schema import TrialStatus

    try:
        planned = SweepFolder.open(sweep_dir).launch.trials
    except SweepFolderError as error:
        raise fail(f"{error}; run `mosaic-sweep run` first") from None
    try:
        results = read_results(sweep_dir, skip_bad=skip_bad)
    except ResultsStoreError as error:
        raise fail(str(error)) from None
    states = trial_states(results)
    if planned > sum(states.values()):
        states[TrialStatus.PENDING] = planned - sum(states.values())
    typer.echo(
        f"{sweep_dir}: {planned} trials — "
        + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    )
    for line in [*_failures(results), *_best_so_far(results)]:
        typer.echo(line)


def _failures(results: pandas.DataFrame) -> Iterator[str]:
    """Each failed trial and its reason, the last line of its error (the exception and message)."""
    # pandas, as the status command's other lines
    from analysis.configurations import describe_config
    from analysis.schema import TrialStatus

    last = results.sort_values("step", na_position="first").groupby("trial_id").tail(1)
    for _, row in last[last["status"] == TrialStatus.ERROR].iterrows():
        lines = str(row["error"] or "").strip().splitlines() or ["no error was recorded"]
        yield f"failed: {describe_config(row)}, seed {row['seed']} (trial {row['trial_id']}): {lines[-1]}"


def _best_so_far(results: pandas.DataFrame) -> Iterator[str]:
    """The best trial by each task family's headline metric (exact match at the shortest length,
    accuracy, validation loss), for those reported."""
    # pandas
    from analysis.configurations import describe_config
    from analysis.tables import headlines, selected

    for headline in headlines(results):
        rows = selected(results[results["metric"] == headline.metric])
        # the shortest evaluation length: in distribution
        at = f" at {headline.factors[0]:g}×" if headline.factors else ""
        if headline.factors:
            rows = rows[rows["length_factor"] == headline.factors[0]]
        if rows.empty:
            continue
        values = rows["value"]
        top = rows.loc[values.idxmin() if headline.lower_is_better else values.idxmax()]
        yield (
            f"best {headline.metric}{at}: {top['value']:.4g}  {describe_config(top)}, "
            f"seed {top['seed']}, {top['task']} (trial {top['trial_id']}, step {top['step']})"
        )

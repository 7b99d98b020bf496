"""The `mosaic-sweep` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from search_spaces import bundled_sweeps
from search_spaces.schema import Sweep, SweepError, load_sweep

app = typer.Typer(help="Run sparse-attention kernel sweeps of Memory Mosaics with Ray Tune and MLflow.",
                  no_args_is_help=True, add_completion=False)

USAGE_ERROR = 2


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(USAGE_ERROR)


def _load(spec: str) -> Sweep:
    """A sweep file path, or the name of a sweep that ships with the package (`smoke`)."""
    path = Path(spec)
    if not path.is_file() and spec in bundled_sweeps():
        path = bundled_sweeps()[spec]
    try:
        return load_sweep(path)
    except SweepError as error:
        raise _fail(str(error)) from None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's and the trials' logs.")] = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    spec: Annotated[str, typer.Argument(help="Sweep file (YAML), or the name of a bundled sweep such as 'smoke'.")],
    out: Annotated[Optional[Path], typer.Option(help="Sweep folder. Default: sweeps/<sweep name>.")] = None,
    mlflow_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///<sweeps>/mlflow.db.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the expanded trials and start nothing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse a non-empty sweep folder; the old one is moved to a backup.")] = False,
) -> None:
    """Validate a sweep, run one Ray Tune trial per grid point, print the results table."""
    sweep = _load(spec)
    if dry_run:
        width = len(str(len(sweep.trials)))
        for number, trial in enumerate(sweep.trials, 1):
            typer.echo(f"{number:>{width}}  {trial.describe()}")
        typer.echo(f"{len(sweep.trials)} trials")
        return

    from orchestrator.sweep import run_sweep
    from orchestrator.tracking import default_tracking_uri

    sweep_dir = out or Path("sweeps") / sweep.name
    tracking_uri = mlflow_uri or default_tracking_uri(sweep_dir.parent)
    verbose = logging.getLogger().level <= logging.INFO
    try:
        outcome = run_sweep(sweep, sweep_dir, tracking_uri, overwrite=overwrite, verbose=verbose)
    except FileExistsError as error:
        raise _fail(str(error)) from None
    typer.echo("")
    typer.echo(outcome.table_markdown)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(outcome.trials_by_status.items()))
    typer.echo(f"\ntrials: {counts}")
    typer.echo(f"table: {outcome.sweep_dir / 'table.md'}   results: {outcome.sweep_dir / 'results.parquet'}")
    typer.echo(f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    if outcome.trials_by_status.get("ERROR"):
        raise typer.Exit(1)


@app.command()
def train(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="One trial's config (YAML): seed, task, model, train.")],
    steps: Annotated[Optional[int], typer.Option(help="Override train.max_steps.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Override train.device: auto, cpu or cuda.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder. Default: runs/<config name>.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse a non-empty run folder; the old one is moved to a backup.")] = False,
) -> None:
    """Train one trial without Ray: progress bar, metrics at every evaluation, a resumable checkpoint."""
    from orchestrator.single_run import load_trial_config, run_single_trial

    try:
        config = load_trial_config(config_file, steps=steps, device=device)
    except ValueError as error:
        raise _fail(str(error)) from None
    run_dir = out or Path("runs") / config_file.stem
    try:
        run_single_trial(config, run_dir, resume=resume, overwrite=overwrite)
    except (FileExistsError, FileNotFoundError) as error:
        raise _fail(str(error)) from None


@app.command()
def prepare(
    sources: Annotated[list[Path], typer.Argument(help="Text (.txt), JSONL (.jsonl: one story per line) or Parquet (.parquet: a 'text' column) files.")],
    out: Annotated[Path, typer.Option(help="Folder for train.bin, val.bin and meta.json.")],
    val_fraction: Annotated[float, typer.Option(help="Share of documents for val.bin; 1 for an out-of-distribution corpus.")] = 0.005,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing token files.")] = False,
) -> None:
    """Tokenise a corpus once with GPT-2 BPE into uint16 token files for the `lm` task."""
    from rich.progress import Progress

    from mosaic_core.tasks.language_modeling import prepare_corpus

    with Progress(transient=True) as progress:
        bar = progress.add_task("tokenising", total=None)
        try:
            meta = prepare_corpus(sources, out, val_fraction=val_fraction, overwrite=overwrite,
                                  progress=lambda done, total: progress.update(bar, completed=done, total=total))
        except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as error:
            raise _fail(str(error)) from None
    docs, tokens = meta["documents"], meta["tokens"]
    typer.echo(f"{out}: train {docs['train']} documents / {tokens['train']} tokens, "
               f"val {docs['val']} documents / {tokens['val']} tokens")


if __name__ == "__main__":
    app()

"""`mosaic-sweep run`: a sweep checked by `orchestrator.launch`, then run by `orchestrator.sweep`."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer

from orchestrator import launch
from orchestrator.cli.common import echo_markdown, fail
from orchestrator.driver_lock import hold_driver_lock
from orchestrator.resources import GPU_TYPES
from orchestrator.sweep_folder import LAUNCH, MLFLOW_DB, TABLE
from orchestrator.tracking.names import FAILED
from search_spaces.overrides import EXAMPLES, apply_overrides
from search_spaces.yaml_io import read_sweep_file

if TYPE_CHECKING:
    from orchestrator.sweep import SweepOutcome
    from orchestrator.sweep_folder import SweepFolder
    from search_spaces.schema import Sweep

GpuType = Literal[GPU_TYPES]  # h100, h200


def run(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="SPEC",
            help="Sweep file (YAML), or the name of a bundled sweep such as 'smoke'.",
        ),
    ],
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="[KEY=VALUE]...",
            show_default=False,
            help=f"Change a key of the sweep file ({EXAMPLES}); a trial key such as "
            "train.lr sets the grid's values when the grid varies it, else base's. Checked as "
            f"the file is, and kept in {LAUNCH} for --resume.",
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(metavar="DIR", help="Sweep folder. Default: sweeps/<sweep name>."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the sweep in the folder: finished trials are kept, interrupted ones "
            "continue from their checkpoints.",
        ),
    ] = False,
    address: Annotated[
        Optional[str],
        typer.Option(
            metavar="ADDR",
            envvar="RAY_ADDRESS",
            show_envvar=True,
            help="Ray cluster to join ('auto', or host:port). Default: Ray on this machine.",
        ),
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(
            metavar="URI",
            help="Shared path or s3:// URI for Tune's trial checkpoints; required on a cluster of "
            "more than one node. Default: the sweep folder.",
        ),
    ] = None,
    mlflow_uri: Annotated[
        Optional[str],
        typer.Option(
            metavar="URI",
            help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else "
            f"sqlite:///<sweeps>/{MLFLOW_DB}.",
        ),
    ] = None,
    max_concurrent: Annotated[
        Optional[int], typer.Option(min=1, help="Run at most this many trials at once.")
    ] = None,
    gpus_per_trial: Annotated[
        Optional[float],
        typer.Option(
            min=0, help="Override the sweep file's resources.gpu (0.25 packs four trials on a GPU)."
        ),
    ] = None,
    cpus_per_trial: Annotated[
        Optional[float], typer.Option(min=0.01, help="Override the sweep file's resources.cpu.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="List the expanded trials and the resource plan, say whether this machine (or "
            "--address) can run them and which data is missing; start nothing.",
        ),
    ] = False,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="With --dry-run: time a few training steps and an evaluation of each distinct "
            "trial here, and print tokens per trial, device-hours and the wall time at the "
            "planned concurrency.",
        ),
    ] = False,
    gpu_type: Annotated[
        Optional[GpuType],
        typer.Option(
            help="With --dry-run: price the trials from the benchmark figures recorded for this "
            "GPU (bench/data/model-<gpu>.jsonl) instead of timing them here.",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Reuse a non-empty sweep folder; the old one is moved to a backup."
        ),
    ] = False,
) -> None:
    """Validate a sweep, run it as Ray Tune trials (a grid, or an Optuna search), print the results table."""
    verbose = logging.getLogger().level <= logging.INFO
    flags = dict(
        resume=resume,
        overwrite=overwrite,
        storage=storage,
        mlflow_uri=mlflow_uri,
        overrides=overrides or [],
    )
    try:
        if (estimate or gpu_type) and not dry_run:
            raise launch.LaunchError(
                "--estimate and --gpu-type go with --dry-run: an estimate starts no sweep"
            )
        launch.check_address(address)
        path, sweep = _checked_sweep(
            spec, overrides or [], None if dry_run else flags, out, (gpus_per_trial, cpus_per_trial)
        )
        if dry_run:
            estimating = estimate or gpu_type is not None
            for line in launch.dry_run(
                sweep, address, verbose, max_concurrent, estimate=estimating, gpu_type=gpu_type
            ):
                typer.echo(line)
            return
        sweep_dir = out or Path("sweeps") / sweep.name
        folder = launch.open_folder(sweep, sweep_dir, **flags, address=address, verbose=verbose)
        hold_driver_lock(folder.path)
    except launch.REFUSALS as error:
        raise fail(str(error)) from None
    if resume:
        # pyarrow: only when resuming, so that `--help` and refusals go without it
        from analysis.results_store import set_aside_unreadable

        for line in set_aside_unreadable(folder.path):
            typer.echo(line, err=True)
    if resume and launch.finished(folder):
        _print_finished(folder)
        return
    if resume:
        _repair_tune_state(folder)
    if resume and (restarting := launch.restarting_from_scratch(folder)):
        typer.echo(restarting, err=True)
    # Ray, MLflow and torch: only now that the sweep will run
    from orchestrator.sweep import run_sweep

    where = (
        "starting Ray on this machine…"
        if address is None
        else f"joining the Ray cluster at {address}…"
    )
    typer.echo(where, err=True)
    how = dict(address=address, verbose=verbose, max_concurrent=max_concurrent, sweep_file=path)
    again = ["mosaic-sweep", "run", spec, *(overrides or []), "--out", str(sweep_dir), "--resume"]
    again += ["--address", address] if address is not None else []
    _print_outcome(run_sweep(sweep, folder, **how), shlex.join(again))


def _repair_tune_state(folder: SweepFolder) -> None:
    """Tune's state made whole before Tune resumes from it (a line when repaired), or refused."""
    try:
        repaired = launch.repaired_tune_state(folder)
    except launch.REFUSALS as error:
        raise fail(str(error)) from None
    if repaired:
        typer.echo(repaired, err=True)


def _checked_sweep(
    spec: str,
    overrides: list[str],
    flags: dict[str, Any] | None,
    out: Path | None,
    per_trial: tuple[float | None, float | None],
) -> tuple[Path, Sweep]:
    """The sweep file and its sweep, with the overrides (a resume given none: those it was launched
    with); with a run's `flags`, those are checked first, without torch, Ray or MLflow (unless the
    file's name is not a sweep's, which its validation names)."""
    path = launch.sweep_file(spec)
    file = read_sweep_file(path)
    sweep_dir = out or launch.default_sweep_dir(apply_overrides(file, overrides))
    if flags is not None and sweep_dir is not None:
        launch.check_flags(sweep_dir, **flags)
        if flags["resume"] and not overrides:
            overrides = launch.recorded_overrides(sweep_dir)
    source = " ".join([path.name, *overrides])
    return path, launch.load(source, apply_overrides(file, overrides), *per_trial)


def _print_finished(folder: SweepFolder) -> None:
    """A resumed sweep whose trials had all finished: its table, nothing run."""
    table = folder.path / TABLE
    typer.echo(
        f"{folder.path}: all {folder.launch.trials} trials had finished; nothing was left to run"
    )
    typer.echo(table.read_text() if table.is_file() else "")


def _print_outcome(outcome: SweepOutcome, resume_command: str) -> None:
    """The table, the trials by state, where everything is; exit 130 when interrupted, 1 when a trial failed."""
    # pandas and pyarrow, loaded by the sweep by now: kept out of `--help`
    from analysis.results_store import store_path
    from analysis.schema import TrialStatus
    from orchestrator.mlflow_ui import server_links

    typer.echo("")
    echo_markdown(outcome.table_markdown + "\n")
    counts = [f"{n} {status}" for status, n in sorted(outcome.trials_by_status.items())]
    counts += [f"{outcome.unfinished} unfinished"] if outcome.unfinished else []
    typer.echo(f"\ntrials: {', '.join(counts)}")
    typer.echo(f"table: {outcome.sweep_dir / TABLE}   results: {store_path(outcome.sweep_dir)}")
    typer.echo(f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    if outcome.tracking_uri.startswith("sqlite:"):
        typer.echo(f"browse its trials: mosaic-sweep ui {outcome.sweep_dir}")
    for links in server_links(outcome.sweep_dir, outcome.tracking_uri):
        typer.echo(f"its trials in MLflow: {links.trials}\nas charts: {links.charts}")
    if outcome.stopped is not None:
        stop = outcome.stopped
        typer.echo(
            f"\nstopped: {stop.what} ({stop.line}). Its trials were stopped, and their MLflow "
            f"runs marked {FAILED} with this reason where the store still took it; the table "
            f"above holds what they had reported. {stop.before_resume}, then continue it "
            f"(finished trials are kept) with:\n  {resume_command}"
        )
        raise typer.Exit(1)
    if outcome.unfinished:
        typer.echo(f"interrupted; continue it (finished trials are kept) with:\n  {resume_command}")
        raise typer.Exit(130)
    if outcome.trials_by_status.get(TrialStatus.ERROR):
        raise typer.Exit(1)

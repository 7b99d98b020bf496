"""The `mosaic-sweep` command line."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from analysis.paper_tables import PAPER_TABLES
from search_spaces import bundled_sweeps

if TYPE_CHECKING:
    import pandas

    from orchestrator.sweep import SweepOutcome
    from orchestrator.sweep_folder import SweepFolder
    from search_spaces.schema import Sweep

# torch, Ray and MLflow are imported by the commands that use them, never at start-up:
# `--help` and the errors found before any work answer at once


class _Command(TyperCommand):
    """typer writes a required argument as {NAME} in the usage line; write it as click and
    argparse do, NAME."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [
            piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)
        ]


class _OneLineErrors(TyperGroup):
    """click answers a usage error (an unknown option, a value not among the choices, a missing
    argument) with the usage and a hint over four lines: here it is one line, like every error the
    commands find, and exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:
            context = getattr(error, "ctx", None)
            hint = f"; see '{context.command_path} --help'" if context is not None else ""
            _error_line(f"{error.format_message().rstrip('.')}{hint}")
            sys.exit(USAGE_ERROR if context is not None else error.exit_code)
        except typer.Abort:
            _error_line("aborted")
            sys.exit(1)
        sys.exit(code or 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Run sparse-attention kernel sweeps of Memory Mosaics with Ray Tune and MLflow.",
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode=None,
)
command = functools.partial(app.command, cls=_Command)

USAGE_ERROR = 2


MAX_ERROR_CHARS = 290  # an error quotes what the user wrote: never more than a line of it


# help texts longer than a line
RESUME_HELP = (
    "Continue the sweep in the folder: finished trials are kept, interrupted ones continue "
    "from their checkpoints."
)
STORAGE_HELP = (
    "Shared path or s3:// URI for Tune's trial checkpoints; required on a cluster of more "
    "than one node. Default: the sweep folder."
)
MLFLOW_URI_HELP = (
    "MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///<sweeps>/mlflow.db."
)
WORKERS_HELP = (
    "Train data-parallel on N Ray Train workers of this machine (a GPU each when the trial "
    "uses CUDA), with the same global batch."
)
THREADS_HELP = (
    "torch's CPU threads, as a sweep trial gets its resources.cpu (more than the cores free "
    "slows a shared machine down)."
)
SOURCES_HELP = (
    "Text (.txt), JSONL (.jsonl: one story per line) or Parquet (.parquet: a 'text' column) files."
)
METRIC_HELP = (
    "Metric to show. Default: exact_match by length_factor, accuracy and tvd by num_examples,"
    " val_loss and ood_loss by n_layer."
)
BY_HELP = (
    "Columns: first the layout, length_factor (Table 2), num_examples (RegBench, Table 1) or "
    "n_layer (losses per depth), default the results' task family; then any key the sweep "
    "varies (lr, model.dropout) as more columns. Repeatable."
)
FROM_MLFLOW_HELP = (
    "Rebuild the results from this MLflow tracking URI instead of DIR (the latest sweep run)."
)
PAPER_HELP = (
    "The paper's table: table1 (RegBench), table2 or table7 (length generalisation). Default:"
    " the results' task family."
)
DRY_RUN_HELP = (
    "List the expanded trials and the resource plan, say whether this machine (or --address) "
    "can run them and which data is missing; start nothing."
)
ESTIMATE_HELP = (
    "With --dry-run: time a few training steps and an evaluation of each distinct trial here, "
    "and print tokens per trial, device-hours and the wall time at the planned concurrency."
)
GPU_TYPE_HELP = (
    "With --dry-run: price the trials from the benchmark figures recorded for this GPU "
    "(bench/data/model-<gpu>.jsonl: h100, h200) instead of timing them here."
)
SKIP_BAD_HELP = "Read the results' other parts when one is unreadable (it is named on stderr)."
WHERE_HELP = (
    "Only trials whose KEY is VALUE (lr=1e-4, kernel=softmax, model.dropout=0.1); repeatable."
)
SELECT_HELP = (
    "Each trial's evaluation that counts: last, or best:METRIC (best:val_loss: the one with the lowest "
    "val_loss). Default: the paper's (RegBench: best:val_loss; otherwise last)."
)

# choices of options, shown in --help and checked before any work
TableFormat = Literal["md", "latex", "csv"]
PaperName = Literal[tuple(PAPER_TABLES)]  # table1, table2, table7


def _error_line(message: str) -> None:
    """One line on stderr, at most MAX_ERROR_CHARS long."""
    line = " ".join(f"error: {message}".split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 1] + "…"
    typer.secho(line, err=True, fg=typer.colors.RED)


def _fail(message: str) -> typer.Exit:
    """One line on stderr, and exit 2."""
    _error_line(message)
    return typer.Exit(USAGE_ERROR)


def _sweep_file(spec: str) -> Path:
    """A sweep file path, or the file of a sweep that ships with the package (`smoke`)."""
    path = Path(spec)
    path = bundled_sweeps()[spec] if not path.is_file() and spec in bundled_sweeps() else path
    if not path.is_file():
        raise _fail(
            f"{spec}: no such sweep file, nor a bundled sweep; bundled: {', '.join(bundled_sweeps())}"
        )
    return path


def _load(spec: str) -> Sweep:
    # an unknown name is refused before the schema (and torch) are imported
    path = _sweep_file(spec)
    from search_spaces.schema import SweepError, load_sweep

    try:
        return load_sweep(path)
    except SweepError as error:
        raise _fail(str(error)) from None


@app.callback()
def main(
    context: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray's and the trials' logs.")
    ] = False,
) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if context.invoked_subcommand is None:  # a bare `mosaic-sweep` shows what it can do
        typer.echo(context.get_help())


@command()
def run(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="SPEC",
            help="Sweep file (YAML), or the name of a bundled sweep such as 'smoke'.",
        ),
    ],
    out: Annotated[
        Optional[Path], typer.Option(help="Sweep folder. Default: sweeps/<sweep name>.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help=RESUME_HELP,
        ),
    ] = False,
    address: Annotated[
        Optional[str],
        typer.Option(
            envvar="RAY_ADDRESS",
            show_envvar=True,
            help="Ray cluster to join ('auto', or host:port). Default: Ray on this machine.",
        ),
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(help=STORAGE_HELP),
    ] = None,
    mlflow_uri: Annotated[
        Optional[str],
        typer.Option(help=MLFLOW_URI_HELP),
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help=ESTIMATE_HELP)] = False,
    gpu_type: Annotated[Optional[str], typer.Option(help=GPU_TYPE_HELP)] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Reuse a non-empty sweep folder; the old one is moved to a backup."
        ),
    ] = False,
) -> None:
    """Validate a sweep, run it as Ray Tune trials (a grid, or an Optuna search), print the results table."""
    if (estimate or gpu_type) and not dry_run:
        raise _fail("--estimate and --gpu-type go with --dry-run: an estimate starts no sweep")
    sweep = _with_resources(_load(spec), gpus_per_trial, cpus_per_trial)
    from orchestrator.resources import PlacementError, check_shared_storage, placement
    from orchestrator.sweep_folder import SweepFolderError

    verbose = logging.getLogger().level <= logging.INFO
    if dry_run:
        _dry_run(
            sweep,
            address,
            verbose,
            max_concurrent,
            estimate=estimate or gpu_type is not None,
            gpu_type=gpu_type,
        )
        return
    sweep_dir = out or Path("sweeps") / sweep.name
    try:  # the flags and the data first: they are checked without Ray
        _check_run_flags(
            sweep_dir, resume=resume, overwrite=overwrite, storage=storage, mlflow_uri=mlflow_uri
        )
        if missing := _missing_data(sweep):
            raise _fail(
                f"{len(missing)} data file(s) a trial reads are missing, e.g. {missing[0]}; "
                "write them with `mosaic-sweep prepare`"
            )
        cluster = placement(sweep.widest, address, verbose)
        if not resume:
            check_shared_storage(cluster, storage)
        folder = _sweep_folder(
            sweep,
            sweep_dir,
            resume=resume,
            overwrite=overwrite,
            storage=storage,
            mlflow_uri=mlflow_uri,
        )
    except (PlacementError, SweepFolderError) as error:
        raise _fail(str(error)) from None

    if resume and _finished(folder):
        typer.echo(
            f"{folder.path}: all {folder.launch.trials} trials had finished; nothing was left to run"
        )
        typer.echo(
            (folder.path / "table.md").read_text() if (folder.path / "table.md").is_file() else ""
        )
        return
    from orchestrator.sweep import run_sweep

    typer.echo(
        "starting Ray on this machine…"
        if address is None
        else f"joining the Ray cluster at {address}…",
        err=True,
    )
    _print_outcome(
        run_sweep(
            sweep,
            folder,
            address=address,
            verbose=verbose,
            max_concurrent=max_concurrent,
            sweep_file=_sweep_file(spec),
        )
    )


def _finished(folder: "SweepFolder") -> bool:
    """Every planned trial of the folder's sweep ended (finished or failed after its retries)? Failed
    ones are retried by --resume, so only finished ones count."""
    from analysis.results_store import read_results, trial_states
    from analysis.schema import TrialStatus

    return (
        trial_states(read_results(folder.path)).get(TrialStatus.TERMINATED, 0)
        >= folder.launch.trials
    )


def _with_resources(
    sweep: Sweep, gpus_per_trial: float | None, cpus_per_trial: float | None
) -> Sweep:
    """The sweep with --gpus-per-trial / --cpus-per-trial, validated like the sweep file's own resources."""
    from pydantic import ValidationError

    from mosaic_core.config import describe_validation_error
    from search_spaces.schema import Resources

    overrides = {
        key: value
        for key, value in (("gpu", gpus_per_trial), ("cpu", cpus_per_trial))
        if value is not None
    }
    if not overrides:
        return sweep
    try:
        resources = Resources.model_validate({**sweep.resources.model_dump(), **overrides})
    except ValidationError as error:
        raise _fail(
            describe_validation_error(error, Resources, "--gpus-per-trial/--cpus-per-trial")
        ) from None
    return dataclasses.replace(sweep, resources=resources)


def _check_run_flags(
    sweep_dir: Path, *, resume: bool, overwrite: bool, storage: str | None, mlflow_uri: str | None
) -> None:
    """Flags that cannot work together, or folders and stores that cannot be written."""
    from orchestrator.sweep_folder import (
        check_new_folder,
        check_overwrite,
        check_storage,
        check_tracking_uri,
    )

    if resume and overwrite:
        raise _fail(
            "--resume continues the sweep in the folder, --overwrite starts it again: give one of them"
        )
    check_new_folder(sweep_dir, "--out")
    if overwrite:
        check_overwrite(sweep_dir)
    if storage is not None:
        check_storage(storage)
    if not resume:
        check_tracking_uri(_tracking_uri(sweep_dir, mlflow_uri))


def _tracking_uri(sweep_dir: Path, mlflow_uri: str | None) -> str:
    from orchestrator.tracking import default_tracking_uri

    return mlflow_uri or default_tracking_uri(sweep_dir.parent)


def _sweep_folder(
    sweep: Sweep,
    sweep_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    storage: str | None,
    mlflow_uri: str | None,
) -> "SweepFolder":
    """The folder to run in: the sweep's own to resume (its MLflow store and storage), or a new one."""
    from orchestrator.sweep import new_sweep_folder, resumable_sweep_folder

    if not resume:
        return new_sweep_folder(
            sweep, sweep_dir, _tracking_uri(sweep_dir, mlflow_uri), storage, overwrite
        )
    folder = resumable_sweep_folder(sweep_dir)
    for flag, given, used in (
        ("--mlflow-uri", mlflow_uri, folder.launch.tracking_uri),
        ("--storage", storage, folder.launch.storage_path),
    ):
        if given is not None and given != used:
            logging.getLogger(__name__).warning("%s: resuming with the sweep's own %s", flag, used)
    return folder


def _dry_run(
    sweep: Sweep,
    address: str | None,
    verbose: bool,
    max_concurrent: int | None,
    *,
    estimate: bool,
    gpu_type: str | None,
) -> None:
    """The trials and the resource plan, whether this machine (or the cluster) can run them, missing
    data, and with `estimate` what the sweep will cost. Only a real run refuses."""
    from orchestrator.estimate import one_gpu_slots
    from orchestrator.resources import (
        PlacementError,
        check_fits,
        concurrency,
        connect,
        local_machine,
        resource_plan,
    )

    cluster = local_machine() if address is None else connect(address, verbose)
    _print_plan(sweep, resource_plan(sweep, cluster, max_concurrent))
    try:
        check_fits(sweep.widest, cluster)
        typer.echo(f"{cluster.where} can run this sweep")
    except PlacementError as error:
        typer.echo(f"{cluster.where} cannot run this sweep: {error}")
    for path in _missing_data(sweep):
        typer.echo(f"missing data: {path} (write it with `mosaic-sweep prepare`)")
    if estimate:
        at_once = concurrency(sweep, cluster.nodes, max_concurrent)[0]
        if gpu_type is not None and not at_once:
            # priced for a GPU this machine does not have: what one of them runs at once
            at_once = min(
                sweep.num_trials, one_gpu_slots(sweep), max_concurrent or sweep.num_trials
            )
        _print_estimate(sweep, at_once, gpu_type)


def _print_estimate(sweep: Sweep, at_once: int, gpu_type: str | None) -> None:
    from orchestrator.estimate import describe, estimate

    if not at_once:
        raise _fail(
            "no trial fits on this machine to be timed; pass --gpu-type to price the sweep from the "
            "benchmark figures of a GPU"
        )
    typer.echo(
        "estimating: a few training steps of each distinct trial…"
        if gpu_type is None
        else "estimating…"
    )
    try:
        cost = estimate(sweep, at_once, gpu_type)
    except (ValueError, FileNotFoundError) as error:
        raise _fail(str(error)) from None
    for line in describe(cost, on_gpu=bool(gpu_type or sweep.resources.gpu)):
        typer.echo(line)


def _missing_data(sweep: Sweep) -> list[str]:
    """Files the trials read that are not there (a language-model corpus not yet prepared)."""
    files = {str(path) for trial in sweep.trials for path in trial.config.task.required_files()}
    return sorted(path for path in files if not Path(path).is_file())


def _print_plan(sweep: Sweep, plan: list[str]) -> None:
    """--dry-run: the expanded trials, numbered, then the resource plan."""
    width = len(str(len(sweep.trials)))
    for number, trial in enumerate(sweep.trials, 1):
        count = sweep.trial_resources(trial).workers
        typer.echo(
            f"{number:>{width}}  {trial.describe()}" + (f"  ({count} workers)" if count > 1 else "")
        )
    for line in plan:
        typer.echo(line)


def _print_outcome(outcome: "SweepOutcome") -> None:
    """The table, the trials by state, where everything is; exit 130 when interrupted, 1 when a trial failed."""
    from analysis.schema import TrialStatus

    typer.echo("")
    typer.echo(outcome.table_markdown)
    counts = [f"{n} {status}" for status, n in sorted(outcome.trials_by_status.items())]
    counts += [f"{outcome.unfinished} unfinished"] if outcome.unfinished else []
    typer.echo(f"\ntrials: {', '.join(counts)}")
    typer.echo(
        f"table: {outcome.sweep_dir / 'table.md'}   results: {outcome.sweep_dir / 'results.parquet'}"
    )
    typer.echo(f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    if outcome.tracking_uri.startswith("sqlite:"):
        typer.echo(f"browse its trials: mosaic-sweep ui {outcome.sweep_dir}")
    if outcome.unfinished:
        typer.echo(
            "interrupted: continue with the same command and --resume (finished trials are kept)"
        )
        raise typer.Exit(130)
    if outcome.trials_by_status.get(TrialStatus.ERROR):
        raise typer.Exit(1)


@command()
def ui(
    sweeps_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help="A sweep folder, or the folder of sweeps holding mlflow.db."
        ),
    ] = Path("sweeps"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 5000,
    optuna: Annotated[
        bool,
        typer.Option(
            "--optuna",
            help="Open optuna-dashboard on the Optuna study of the search sweep in DIR instead.",
        ),
    ] = False,
) -> None:
    """Open the MLflow UI for the sweeps' tracking store (or optuna-dashboard for a search's study), on
    127.0.0.1 only (reach it from elsewhere by port-forwarding)."""
    import os

    argv, served, links = (
        _optuna_dashboard(sweeps_dir, port) if optuna else _mlflow_ui(sweeps_dir, port)
    )
    typer.echo(f"{served} at http://127.0.0.1:{port} (Ctrl-C stops it)")
    for link in links:
        typer.echo(f"  {link}")
    os.execv(argv[0], argv)  # the server owns the terminal from here: Ctrl-C goes to it


def _mlflow_ui(sweeps_dir: Path, port: int) -> tuple[list[str], str, list[str]]:
    """(command, what it serves, links): MLflow's UI on the SQLite store the sweeps in DIR logged
    to, and a link per sweep that opens on its trials."""
    from orchestrator.mlflow_ui import sweep_links, ui_command
    from orchestrator.sweep_folder import LAUNCH, SweepFolder, SweepFolderError

    if (sweeps_dir / LAUNCH).is_file():  # a sweep folder: the store it logged to
        try:
            tracking_uri = SweepFolder.open(sweeps_dir).launch.tracking_uri
        except SweepFolderError as error:
            raise _fail(str(error)) from None
    elif (sweeps_dir / "mlflow.db").is_file():
        tracking_uri = f"sqlite:///{(sweeps_dir / 'mlflow.db').resolve()}"
    else:
        raise _fail(
            f"{sweeps_dir} holds no mlflow.db and is not a sweep folder; give the folder that `mosaic-sweep run` wrote"
        )
    if not tracking_uri.startswith("sqlite:"):
        raise _fail(f"{sweeps_dir} logs to the MLflow server {tracking_uri}; open that instead")
    links = sweep_links(sweeps_dir, tracking_uri, f"http://127.0.0.1:{port}")
    return (
        ui_command(tracking_uri, port),
        f"MLflow UI for {tracking_uri}",
        [f"{name}'s trials: {link}" for name, link in links.items()],
    )


def _optuna_dashboard(sweep_dir: Path, port: int) -> tuple[list[str], str, list[str]]:
    """(command, what it serves, no links): optuna-dashboard on the study a search sweep kept in its folder."""
    import shutil

    study = sweep_dir / "optuna.db"
    if not study.is_file():
        raise _fail(
            f"{sweep_dir} holds no optuna.db: give the folder of a search sweep (one that kept its study "
            "at search.storage: run optuna-dashboard on that URL)"
        )
    dashboard = shutil.which(
        "optuna-dashboard", path=str(Path(sys.executable).parent)
    ) or shutil.which("optuna-dashboard")
    if dashboard is None:
        raise _fail("optuna-dashboard is not installed; pip install optuna-dashboard")
    storage = f"sqlite:///{study.resolve()}"
    return (
        [
            dashboard,
            storage,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        f"optuna-dashboard for {storage}",
        [],
    )


@command()
def train(
    config_file: Annotated[
        Path,
        typer.Argument(
            metavar="CONFIG", help="One trial's config (YAML): seed, task, model, train."
        ),
    ],
    steps: Annotated[Optional[int], typer.Option(help="Override train.max_steps.")] = None,
    device: Annotated[
        Optional[str], typer.Option(help="Override train.device: auto, cpu or cuda.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Run folder. Default: runs/<config name>.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run folder's checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Reuse a non-empty run folder; the old one is moved to a backup."
        ),
    ] = False,
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help=WORKERS_HELP,
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help=THREADS_HELP,
        ),
    ] = 1,
) -> None:
    """Train one trial without Ray (or on --workers N): progress, metrics at every evaluation, a resumable checkpoint."""
    from mosaic_core.checkpoint import CheckpointError
    from orchestrator.single_run import (
        load_trial_config,
        local_workers,
        run_data_parallel_trial,
        run_single_trial,
    )
    from orchestrator.sweep_folder import SweepFolderError, check_new_folder

    if resume and overwrite:
        raise _fail(
            "--resume continues the run in the folder, --overwrite starts it again: give one of them"
        )

    import torch

    torch.set_num_threads(threads)
    try:
        config = load_trial_config(config_file, steps=steps, device=device)
        resources = None if workers is None else local_workers(config, workers)
    except ValueError as error:
        raise _fail(str(error)) from None
    run_dir = out or Path("runs") / config_file.stem
    try:
        check_new_folder(run_dir, "--out")
        if resources is None:
            run_single_trial(config, run_dir, resume=resume, overwrite=overwrite)
        else:
            verbose = logging.getLogger().level <= logging.INFO
            run_data_parallel_trial(
                config, run_dir, resources, resume=resume, overwrite=overwrite, verbose=verbose
            )
    except (FileExistsError, FileNotFoundError, SweepFolderError, CheckpointError) as error:
        raise _fail(str(error)) from None


@command()
def prepare(
    sources: Annotated[
        list[Path],
        typer.Argument(metavar="SOURCE", help=SOURCES_HELP),
    ],
    out: Annotated[Path, typer.Option(help="Folder for train.bin, val.bin and meta.json.")],
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of documents for val.bin; 1 for an out-of-distribution corpus."),
    ] = 0.005,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing token files.")
    ] = False,
) -> None:
    """Tokenise a corpus once with GPT-2 BPE into uint16 token files for the `lm` task."""
    from rich.progress import Progress

    from mosaic_core.tasks.language_modeling import prepare_corpus

    with Progress(transient=True) as progress:
        bar = progress.add_task("tokenising", total=None)
        try:
            meta = prepare_corpus(
                sources,
                out,
                val_fraction=val_fraction,
                overwrite=overwrite,
                progress=lambda done, total: progress.update(bar, completed=done, total=total),
            )
        except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as error:
            raise _fail(str(error)) from None
    docs, tokens = meta["documents"], meta["tokens"]
    typer.echo(
        f"{out}: train {docs['train']} documents / {tokens['train']} tokens, "
        f"val {docs['val']} documents / {tokens['val']} tokens"
    )


def _results(
    sweep_dir: Path | None,
    from_mlflow: str | None = None,
    experiment: str | None = None,
    skip_bad: bool = False,
) -> "pandas.DataFrame":
    """The results frame of a sweep folder, or rebuilt from an MLflow experiment."""
    from analysis.results_store import ResultsStoreError, read_results, store_path

    if (sweep_dir is None) == (from_mlflow is None):
        raise _fail("give either DIR or --from-mlflow URI --experiment NAME")
    if from_mlflow is None:
        if experiment is not None:
            raise _fail("--experiment goes with --from-mlflow")
        try:
            results = read_results(sweep_dir, skip_bad=skip_bad)
        except ResultsStoreError as error:
            raise _fail(str(error)) from None
        if results.empty:
            raise _fail(f"no results in {store_path(sweep_dir)}")
        return results
    if experiment is None:
        raise _fail("--from-mlflow needs --experiment NAME (the sweep's name)")
    from analysis.mlflow_source import results_from_mlflow

    try:
        results = results_from_mlflow(from_mlflow, experiment)
    except ValueError as error:
        raise _fail(str(error)) from None
    if results.empty:
        raise _fail(f"MLflow experiment {experiment!r} at {from_mlflow} holds no results")
    return results


def _planned_seeds(sweep_dir: Path | None) -> int | None:
    """Seeds per configuration as the sweep planned them, from its folder (None without one)."""
    from orchestrator.sweep_folder import SweepFolderError, read_configs

    try:
        configs = read_configs(sweep_dir) if sweep_dir is not None else None
    except SweepFolderError:
        return None
    return None if configs is None else len({config.get("seed") for config in configs.values()})


def _checked_select(select: str | None) -> str | None:
    from analysis.tables import check_select

    try:
        return None if select is None else check_select(select)
    except ValueError as error:
        raise _fail(str(error)) from None


@command()
def table(
    sweep_dir: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="DIR", help="Sweep folder holding results.parquet; or use --from-mlflow."
        ),
    ] = None,
    metric: Annotated[
        Optional[str],
        typer.Option(help=METRIC_HELP),
    ] = None,
    fmt: Annotated[
        TableFormat, typer.Option("--format", help="md, latex (booktabs) or csv (numbers only).")
    ] = "md",
    by: Annotated[
        Optional[list[str]],
        typer.Option(help=BY_HELP),
    ] = None,
    where: Annotated[
        Optional[list[str]], typer.Option(metavar="KEY=VALUE", help=WHERE_HELP)
    ] = None,
    select: Annotated[
        Optional[str], typer.Option(metavar="last|best:METRIC", help=SELECT_HELP)
    ] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help=SKIP_BAD_HELP)] = False,
    out: Annotated[
        Optional[Path], typer.Option(help="Write the table to this file instead of printing it.")
    ] = None,
    from_mlflow: Annotated[
        Optional[str],
        typer.Option(
            "--from-mlflow",
            metavar="URI",
            help=FROM_MLFLOW_HELP,
        ),
    ] = None,
    experiment: Annotated[
        Optional[str], typer.Option(help="MLflow experiment, the sweep's name; with --from-mlflow.")
    ] = None,
) -> None:
    """Print a sweep's results table: one row per configuration, mean^(max) over seeds, best mean bold, best seed underlined."""
    from analysis.tables import LAYOUTS, markdown_cells, table_stats, to_csv, to_latex, to_markdown

    select = _checked_select(select)
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
        raise _fail(str(error)) from None
    text = {
        "md": lambda: to_markdown(markdown_cells(stats)),
        "latex": lambda: to_latex(stats),
        "csv": lambda: to_csv(stats),
    }[fmt]()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}")


@command()
def compare(
    sweep_dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="Sweep folder holding results.parquet.")
    ],
    paper: Annotated[
        Optional[PaperName],
        typer.Option(help=PAPER_HELP),
    ] = None,
    select: Annotated[
        Optional[str], typer.Option(metavar="last|best:METRIC", help=SELECT_HELP)
    ] = None,
    where: Annotated[
        Optional[list[str]], typer.Option(metavar="KEY=VALUE", help=WHERE_HELP)
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0, help="Flag cells whose mean or max differs from the paper's by more than this."
        ),
    ] = 0.0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help=SKIP_BAD_HELP)] = False,
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for compare-<table>.md and .csv. Default: DIR.")
    ] = None,
) -> None:
    """Our results beside the paper's table: per cell ours, the paper's and the difference, and
    where the ranking of kernels in a column is not the paper's."""
    from analysis.comparison import compare as compare_cells
    from analysis.comparison import comparison_table, paper_for, summary, to_csv
    from analysis.tables import describe_select, to_markdown

    select = _checked_select(select)
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
        )
    except ValueError as error:
        raise _fail(str(error)) from None
    title = (
        f"{sweep_dir.name} vs. the paper's {PAPER_TABLES[paper].what}; ours at "
        f"{describe_select(cells.attrs['select'])}, mean^(max) over seeds"
    )
    markdown = (
        to_markdown(comparison_table(cells), title=title)
        + "\n"
        + "\n".join(summary(cells, tolerance))
        + "\n"
    )
    folder = out or sweep_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"compare-{paper}.md").write_text(markdown)
    (folder / f"compare-{paper}.csv").write_text(to_csv(cells))
    typer.echo(markdown, nl=False)
    typer.echo(f"wrote {folder / f'compare-{paper}.md'} and .csv")


@command()
def plot(
    sweep_dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="Sweep folder holding results.parquet.")
    ],
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for the figures. Default: DIR/plots.")
    ] = None,
    formats: Annotated[
        Optional[list[str]],
        typer.Option(
            "--format",
            metavar="png|pdf|svg",
            help="File format(s): repeat the option or give a comma list. Default: png (300 dpi).",
        ),
    ] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help=SKIP_BAD_HELP)] = False,
) -> None:
    """Draw a sweep's figures for the metrics it has: exact match and support size vs. length (log2,
    a panel per task), validation loss vs. step, per-position OOD loss; a curve per configuration."""
    from analysis.plots import FORMATS, make_plots

    chosen = tuple(
        dict.fromkeys(
            name.strip().lower() for value in formats or ["png"] for name in value.split(",")
        )
    )
    unknown = [name for name in chosen if name not in FORMATS]
    if unknown:
        raise _fail(
            f"--format {', '.join(unknown)} is not a figure format; give {', '.join(FORMATS)}"
        )
    results = _results(sweep_dir, skip_bad=skip_bad)
    paths = make_plots(results, out or sweep_dir / "plots", chosen)
    if not paths:
        present = ", ".join(sorted(results["metric"].dropna().unique()))
        raise _fail(
            f"nothing to plot in {sweep_dir}: no exact_match, val_loss, ood_loss_ema/pos* or support_size; metrics present: {present}"
        )
    for path in paths:
        typer.echo(str(path))


@command()
def status(
    sweep_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A sweep folder.")],
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help=SKIP_BAD_HELP)] = False,
) -> None:
    """Trials by state and the best so far, from the sweep folder alone (while it runs, or after)."""
    import pandas as pd

    from analysis.configurations import describe_config
    from analysis.results_store import ResultsStoreError, read_results, trial_states
    from analysis.schema import TrialStatus
    from analysis.tables import selected
    from orchestrator.sweep_folder import SweepFolder, SweepFolderError

    try:
        planned = SweepFolder.open(sweep_dir).launch.trials
    except SweepFolderError as error:
        raise _fail(f"{error}; run `mosaic-sweep run` first") from None
    try:
        results = read_results(sweep_dir, skip_bad=skip_bad)
    except ResultsStoreError as error:
        raise _fail(str(error)) from None
    states = trial_states(results)
    if planned > sum(states.values()):
        states[TrialStatus.PENDING] = planned - sum(states.values())
    typer.echo(
        f"{sweep_dir}: {planned} trials — "
        + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    )
    for metric, best in (("exact_match", "max"), ("accuracy", "max"), ("val_loss", "min")):
        rows = selected(results[results["metric"] == metric])
        if rows.empty:
            continue
        if rows["length_factor"].notna().any():  # the shortest evaluation length: in distribution
            rows = rows[rows["length_factor"] == rows["length_factor"].min()]
        top = rows.loc[rows["value"].idxmax() if best == "max" else rows["value"].idxmin()]
        at = f" at {top['length_factor']:g}×" if pd.notna(top["length_factor"]) else ""
        typer.echo(
            f"best {metric}{at}: {top['value']:.4g}  {describe_config(top)}, seed {top['seed']}, "
            f"{top['task']} (trial {top['trial_id']}, step {top['step']})"
        )


if __name__ == "__main__":
    app()

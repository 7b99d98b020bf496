"""`mosaic-sweep train`: one trial without Ray (or on Ray Train workers); `mosaic-sweep prepare`:
the token files of the `lm` task."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator.cli.common import fail
from orchestrator.locations import LocationError
from orchestrator.sweep_folder import check_new_folder


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
    replan: Annotated[
        bool,
        typer.Option(
            "--replan",
            help="With --resume: plan the lr schedule anew for the run's steps (--steps), as if "
            "it had been planned for them. Without it an extended run keeps its own schedule "
            "and then holds min_lr.",
        ),
    ] = False,
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Train data-parallel on N Ray Train workers of this machine (a GPU each when "
            "the trial uses CUDA), with the same global batch.",
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help="torch's CPU threads, as a sweep trial gets its resources.cpu (more than the "
            "cores free slows a shared machine down).",
        ),
    ] = 1,
) -> None:
    """Train one trial without Ray (or on --workers N): progress, metrics at every evaluation, a resumable checkpoint."""
    if resume and overwrite:
        raise fail(
            "--resume continues the run in the folder, --overwrite starts it again: give one of them"
        )
    if replan and not resume:
        raise fail("--replan plans a resumed run's lr schedule anew: it goes with --resume")
    # torch: a trial's config is validated with its model's kernels
    import torch

    from mosaic_core.checkpoint import CheckpointError
    from orchestrator.run_folder import load_trial_config
    from orchestrator.single_run import local_workers, run_data_parallel_trial, run_single_trial

    torch.set_num_threads(threads)
    try:
        config = load_trial_config(config_file, steps=steps, device=device)
        resources = None if workers is None else local_workers(config, workers)
    except ValueError as error:
        raise fail(str(error)) from None
    if config.train.device == "cuda" and not torch.cuda.is_available():
        where = "--device cuda" if device else f"{config_file.name}: train.device cuda"
        raise fail(f"{where}: this machine has no CUDA GPU; use cpu or auto")
    run_dir = out or Path("runs") / config_file.stem
    try:
        check_new_folder(run_dir, "--out")
        if resources is None:
            run_single_trial(config, run_dir, resume=resume, overwrite=overwrite, replan=replan)
        else:
            verbose = logging.getLogger().level <= logging.INFO
            run_data_parallel_trial(
                config,
                run_dir,
                resources,
                resume=resume,
                overwrite=overwrite,
                replan=replan,
                verbose=verbose,
            )
    except (FileExistsError, FileNotFoundError, LocationError, CheckpointError) as error:
        raise fail(str(error)) from None


def prepare(
    sources: Annotated[
        list[Path],
        typer.Argument(
            metavar="SOURCE",
            help="Text (.txt), JSONL (.jsonl: one story per line) or Parquet (.parquet: a 'text' "
            "column) files.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for train.bin, val.bin and meta.json.")],
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of documents for val.bin; 1 for an out-of-distribution corpus."),
    ] = 0.005,
    val: Annotated[
        list[Path] | None,
        typer.Option(
            "--val",
            metavar="FILE",
            help="The corpus's own validation file (BabiStories' valid.jsonl) as val.bin; every "
            "SOURCE document then trains and --val-fraction is not used. Repeatable.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing token files.")
    ] = False,
) -> None:
    """Tokenise a corpus once with GPT-2 BPE into uint16 token files for the `lm` task."""
    try:
        check_new_folder(out, "--out")
    except LocationError as error:
        raise fail(str(error)) from None
    # torch and tiktoken: only for the command that tokenises
    from rich.progress import Progress

    from mosaic_core.tasks.language_modeling import prepare_corpus

    progress = Progress(transient=True)
    bar = progress.add_task("tokenising", total=None)

    def advance(done: int, total: int) -> None:
        # shown from the first document on: a refusal of the input is its one line alone
        progress.start()
        progress.update(bar, completed=done, total=total)

    try:
        meta = prepare_corpus(
            sources, out, val_fraction=val_fraction, val_sources=val, overwrite=overwrite,
            progress=advance,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as error:
        raise fail(str(error)) from None
    finally:
        # stop() ends with a blank line off a terminal: only after the bar was shown
        if progress.live.is_started:
            progress.stop()
    docs, tokens = meta["documents"], meta["tokens"]
    typer.echo(
        f"{out}: train {docs['train']} documents / {tokens['train']} tokens, "
        f"val {docs['val']} documents / {tokens['val']} tokens"
    )

"""`mosaic-sweep train`: one trial in this process, no Ray, with progress and a resumable folder
(`run_folder`); or, with `--workers N`, the same trial data-parallel on N Ray Train workers of this
machine.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mosaic_core.config import TrialConfig
from mosaic_core.train import train_trial
from orchestrator.resources import connect
from orchestrator.run_folder import METRICS, format_metrics, open_run_folder, record_evaluation
from search_spaces.schema import Resources


def run_single_trial(
    config: TrialConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    replan: bool = False,
    console: Console | None = None,
) -> dict[str, float]:
    """One trial in this process, in `run_dir`; `replan`: with `resume`, the lr schedule of the
    config's steps instead of the run's own."""
    console = console or Console(highlight=False)
    resume_from, note = open_run_folder(
        config, run_dir, resume=resume, overwrite=overwrite, replan=replan
    )
    if note:
        console.print(note, soft_wrap=True)

    def report(metrics: dict[str, float], directory: str | None) -> None:
        if directory is not None:  # an evaluation; between them the progress bar shows the loss
            record_evaluation(run_dir, metrics, directory)
            progress.console.print(format_metrics(metrics))

    columns = (
        TextColumn("step"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("train", total=config.train.max_steps, loss="—")
        on_step = lambda step, loss: progress.update(bar, completed=step, loss=f"{loss:.4f}")  # noqa: E731
        metrics = train_trial(
            config, report=report, resume_from=resume_from, on_step=on_step, replan=replan
        )
    console.print(f"run folder: {run_dir}  (metrics.jsonl, checkpoint/)")
    return metrics


def local_workers(config: TrialConfig, workers: int) -> Resources:
    """`--workers N` on this machine: a GPU each when the trial trains on CUDA, else CPU workers
    sharing the cores (at most one each)."""
    gpus = torch.cuda.device_count() if config.train.device != "cpu" else 0
    cpu = min(1.0, (os.cpu_count() or 1) / workers)
    if config.train.device == "cuda" or gpus:
        if workers > gpus:
            raise ValueError(
                f"--workers {workers} needs {workers} GPUs (one per worker) and this machine has {gpus}; "
                "pass fewer workers, or --device cpu for CPU workers"
            )
        return Resources(cpu=cpu, gpu=1, workers=workers)
    return Resources(cpu=cpu, workers=workers)


def run_data_parallel_trial(
    config: TrialConfig,
    run_dir: Path,
    resources: Resources,
    *,
    resume: bool = False,
    overwrite: bool = False,
    replan: bool = False,
    verbose: bool = False,
    console: Console | None = None,
) -> dict[str, float]:
    """The same trial as `run_single_trial` on Ray Train workers of this machine (`local_workers`),
    with the same run folder (rank 0 keeps it), so either kind of run resumes the other."""
    # Ray only for --workers: a run in this process starts without it
    import ray

    from orchestrator.trainables import trainer

    console = console or Console(highlight=False)
    resume_from, note = open_run_folder(
        config, run_dir, resume=resume, overwrite=overwrite, replan=replan
    )
    if note:
        console.print(note, soft_wrap=True)
    connect(None, verbose)
    try:
        with _printing_evaluations(run_dir / METRICS, console):
            trainer(
                config,
                resources,
                storage_path=str(run_dir.resolve()),
                max_failures=0,
                run_dir=run_dir,
                resume_from=resume_from,
                replan=replan,
            ).fit()
    finally:
        ray.shutdown()
    console.print(f"run folder: {run_dir}  (metrics.jsonl, checkpoint/; Ray Train's own in train/)")
    return json.loads((run_dir / METRICS).read_text().splitlines()[-1])


@contextmanager
def _printing_evaluations(metrics_file: Path, console: Console) -> Iterator[None]:
    """While the workers train, print each evaluation rank 0 adds to `metrics_file`."""
    stop = threading.Event()
    printed = len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0

    def follow() -> None:
        nonlocal printed
        while True:
            finished = stop.wait(0.5)
            lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
            for line in lines[printed:]:
                console.print(format_metrics(json.loads(line)))
            printed = len(lines)
            if finished:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

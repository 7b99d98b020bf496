"""`mosaic-sweep train`: one trial in this process, no Ray, with progress and a resumable folder;
or, with `--workers N`, the same trial data-parallel on N Ray Train workers of this machine.

The run folder holds `config.yaml`, `metrics.jsonl` (one line per evaluation) and `checkpoint/`
(the latest checkpoint), so `--resume` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mosaic_core.checkpoint import load_checkpoint
from mosaic_core.config import TrialConfig, describe_validation_error
from mosaic_core.train import train_trial
from orchestrator.sweep_folder import prepare_output_dir
from search_spaces.schema import Resources, read_yaml

METRICS = "metrics.jsonl"


def load_trial_config(
    path: Path, *, steps: int | None = None, device: str | None = None
) -> TrialConfig:
    """A trial config file with command-line overrides; ValueError with one line when it is wrong."""
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path.name}: a trial config is a mapping with keys {', '.join(TrialConfig.model_fields)}"
        )
    train = dict(raw.get("train") or {})
    if steps is not None:
        train["max_steps"] = steps
    if device is not None:
        train["device"] = device
    try:
        return TrialConfig.model_validate({**raw, "train": train})
    except ValidationError as error:
        raise ValueError(describe_validation_error(error, TrialConfig, path.name)) from None


def open_run_folder(
    config: TrialConfig, run_dir: Path, *, resume: bool, overwrite: bool
) -> Path | None:
    """A new run folder holding the config, or with `resume` the existing one's checkpoint to resume from."""
    checkpoint_dir = run_dir / "checkpoint"
    if resume:
        if not (checkpoint_dir / "checkpoint.pt").is_file():
            raise FileNotFoundError(
                f"{run_dir} has no checkpoint to resume from (expected {checkpoint_dir})"
            )
        load_checkpoint(
            checkpoint_dir, config
        )  # a checkpoint that cannot be resumed stops the run before it starts
        return checkpoint_dir
    prepare_output_dir(run_dir, overwrite, marker="config.yaml", what="a run")
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    return None


def record_evaluation(run_dir: Path, metrics: dict[str, float], checkpoint_dir: str) -> None:
    """An evaluation into the run folder: its checkpoint replaces `checkpoint/`, its metrics a line more."""
    tmp = run_dir / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp)
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    tmp.rename(run_dir / "checkpoint")
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def run_single_trial(
    config: TrialConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> dict[str, float]:
    console = console or Console(highlight=False)
    resume_from = open_run_folder(config, run_dir, resume=resume, overwrite=overwrite)

    def report(metrics: dict[str, float], directory: str | None) -> None:
        if directory is not None:  # an evaluation; between them the progress bar shows the loss
            record_evaluation(run_dir, metrics, directory)
            progress.console.print(_format(metrics))

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
        metrics = train_trial(config, report=report, resume_from=resume_from, on_step=on_step)
    console.print(f"run folder: {run_dir}  (metrics.jsonl, checkpoint/)")
    return metrics


def local_workers(config: TrialConfig, workers: int) -> Resources:
    """`--workers N` on this machine: a GPU each when the trial trains on CUDA, else CPU workers
    sharing the cores (at most one each)."""
    import torch

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
    verbose: bool = False,
    console: Console | None = None,
) -> dict[str, float]:
    """The same trial as `run_single_trial` on Ray Train workers of this machine (`local_workers`),
    with the same run folder (rank 0 keeps it), so either kind of run resumes the other."""
    import ray

    from orchestrator.data_parallel import trainer
    from orchestrator.resources import connect

    console = console or Console(highlight=False)
    resume_from = open_run_folder(config, run_dir, resume=resume, overwrite=overwrite)
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
                console.print(_format(json.loads(line)))
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


def _format(metrics: dict[str, Any]) -> str:
    shown = "  ".join(
        f"{key}={value:.4g}"
        for key, value in metrics.items()
        if key not in ("step", "elapsed_s") and "/" not in key
    )  # per-head diagnostics: metrics.jsonl
    return f"step {int(metrics['step'])}: {shown}"

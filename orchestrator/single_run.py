"""`mosaic-sweep train`: one trial in this process, no Ray, with progress and a resumable folder.

The run folder holds `config.yaml`, `metrics.jsonl` (one line per evaluation) and `checkpoint/`
(the latest checkpoint), so `--resume` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mosaic_core.checkpoint import load_checkpoint
from mosaic_core.config import TrialConfig, describe_validation_error
from mosaic_core.train import train_trial
from orchestrator.sweep_folder import prepare_output_dir
from search_spaces.schema import read_yaml


def load_trial_config(path: Path, *, steps: int | None = None, device: str | None = None) -> TrialConfig:
    """A trial config file with command-line overrides; ValueError with one line when it is wrong."""
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path.name}: a trial config is a mapping with keys {', '.join(TrialConfig.model_fields)}")
    train = dict(raw.get("train") or {})
    if steps is not None:
        train["max_steps"] = steps
    if device is not None:
        train["device"] = device
    try:
        return TrialConfig.model_validate({**raw, "train": train})
    except ValidationError as error:
        raise ValueError(describe_validation_error(error, TrialConfig, path.name)) from None


def run_single_trial(config: TrialConfig, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
                     console: Console | None = None) -> dict[str, float]:
    console = console or Console(highlight=False)
    checkpoint_dir = run_dir / "checkpoint"
    if resume:
        if not (checkpoint_dir / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"{run_dir} has no checkpoint to resume from (expected {checkpoint_dir})")
        load_checkpoint(checkpoint_dir, config)  # a checkpoint that cannot be resumed stops the run before it starts
    else:
        prepare_output_dir(run_dir, overwrite, marker="config.yaml", what="a run")
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    def report(metrics: dict[str, float], directory: str) -> None:
        tmp = run_dir / ".checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(directory, tmp)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        tmp.rename(checkpoint_dir)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        progress.console.print(_format(metrics))

    columns = (TextColumn("step"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("train", total=config.train.max_steps, loss="—")
        on_step = lambda step, loss: progress.update(bar, completed=step, loss=f"{loss:.4f}")  # noqa: E731
        resume_from = checkpoint_dir if resume else None
        metrics = train_trial(config, report=report, resume_from=resume_from, on_step=on_step)
    console.print(f"run folder: {run_dir}  (metrics.jsonl, checkpoint/)")
    return metrics


def _format(metrics: dict[str, Any]) -> str:
    shown = "  ".join(f"{key}={value:.4g}" for key, value in metrics.items()
                      if key not in ("step", "elapsed_s") and "/" not in key)  # per-head diagnostics: metrics.jsonl
    return f"step {int(metrics['step'])}: {shown}"

"""A run folder of `mosaic-sweep train`: `config.yaml`, `metrics.jsonl` (one line per evaluation)
and `checkpoint/` (the latest checkpoint), so `--resume` continues exactly where an interrupted run
stopped, in one process or on Ray Train workers (rank 0 keeps it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mosaic_core.checkpoint import FILENAME, load_checkpoint
from mosaic_core.config import TrialConfig, describe_validation_error
from mosaic_core.files import append_line, write_file
from mosaic_core.metrics import ELAPSED_S, STEP
from mosaic_core.train import planned_schedule
from orchestrator.sweep_folder import prepare_output_dir
from search_spaces.yaml_io import read_yaml

METRICS = "metrics.jsonl"


def load_trial_config(
    path: Path, *, steps: int | None = None, device: str | None = None
) -> TrialConfig:
    """A trial config file with command-line overrides; ValueError with one line when it is wrong."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a trial's config file (YAML)")
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
    config: TrialConfig, run_dir: Path, *, resume: bool, overwrite: bool, replan: bool = False
) -> tuple[Path | None, str | None]:
    """A new run folder holding the config, or with `resume` the existing one's checkpoint to
    resume from and, where the run goes past its lr schedule or `replan` replaces it, a line that
    says which schedule it follows."""
    checkpoint_dir = run_dir / "checkpoint"
    if resume:
        if not (checkpoint_dir / FILENAME).is_file():
            raise FileNotFoundError(
                f"{run_dir} has no checkpoint to resume from (expected {checkpoint_dir})"
            )
        # a checkpoint that cannot be resumed stops the run before it starts
        state = load_checkpoint(checkpoint_dir, config)
        return checkpoint_dir, schedule_note(state, config, replan)
    prepare_output_dir(run_dir, overwrite, marker="config.yaml", what="a run")
    write_file(
        run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    return None, None


def schedule_note(state: dict[str, Any], config: TrialConfig, replan: bool) -> str | None:
    """What `train --resume` says of the lr schedule: replanned, or kept past its end."""
    end = planned_schedule(state, config.train, replan=False).lr_decay_steps
    steps = config.train.max_steps
    if replan:
        return (
            f"--replan: from step {state['step']} the lr follows the schedule of a {steps}-step "
            f"run, not the run's own (which reached min_lr at step {end})"
        )
    if steps > end:
        return (
            f"the lr keeps the run's schedule: min_lr from step {end} on, to step {steps} "
            "(--replan plans it anew)"
        )
    return None


def record_evaluation(run_dir: Path, metrics: dict[str, float], checkpoint_dir: str) -> None:
    """An evaluation into the run folder: its checkpoint replaces `checkpoint/`, its metrics a line more."""
    tmp = run_dir / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp)
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    tmp.rename(run_dir / "checkpoint")
    append_line(run_dir / METRICS, json.dumps(metrics))


def format_metrics(metrics: dict[str, Any]) -> str:
    """`step 40: val_loss=1.234  exact_match_1x=0.5`; per-head diagnostics stay in metrics.jsonl."""
    shown = "  ".join(
        f"{key}={value:.4g}"
        for key, value in metrics.items()
        if key not in (STEP, ELAPSED_S) and "/" not in key
    )
    return f"step {int(metrics[STEP])}: {shown}"

"""Trial checkpoints: plain state dicts in one file, loaded with `weights_only=True`.

A checkpoint holds everything that decides the rest of a run — model, optimiser, step, RNG
states and the learning-rate schedule the run follows — so a resumed trial continues exactly where the interrupted one was. Data needs no
state: batches are a function of (seed, batch index). A checkpoint that cannot be read, or that
belongs to another model, task or seed, is an error: never a silent fresh start. Where a trial
keeps several checkpoints, `first_loadable` picks the newest it can resume from and says why it
skipped the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mosaic_core.config import TrainConfig, TrialConfig, flatten
from mosaic_core.files import replacing

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1
_MUST_MATCH = ("seed", "task", "model")  # what makes it the same trial; `train` may be extended


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why in one line."""


def save_checkpoint(
    directory: str | Path,
    *,
    config: TrialConfig,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics: dict[str, float],
    schedule: TrainConfig | None = None,
) -> Path:
    """Write `directory/checkpoint.pt` as `mosaic_core.files` writes, so a crash or a full disk
    never leaves half a file (nor the temporary one). `schedule`: the train config whose lr schedule the run follows (default
    `config.train`), which an extended run keeps."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "config": config.model_dump(mode="json"),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "metrics": metrics,
        "schedule": (schedule or config.train).model_dump(mode="json"),
    }
    path = directory / FILENAME
    with replacing(path) as file:
        torch.save(state, file)
    return path


def load_checkpoint(directory: str | Path, config: TrialConfig) -> dict[str, Any]:
    """The state saved in `directory`, checked to belong to this trial."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        raise CheckpointError(f"no {FILENAME} in {directory}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        # a 0-byte file's error has no message; torch's go on with advice after the first sentence
        reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise CheckpointError(f"checkpoint {path} is unreadable: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not a mosaic-sweep checkpoint (format {FORMAT_VERSION})"
        )
    saved = flatten({key: state["config"].get(key) for key in _MUST_MATCH})
    current = flatten({key: config.model_dump(mode="json")[key] for key in _MUST_MATCH})
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"checkpoint {path} belongs to another trial: {key} is {saved.get(key)!r} there, "
                f"{current.get(key)!r} here"
            )
    return state


def first_loadable(
    directories: Sequence[str | Path], config: TrialConfig
) -> tuple[Path | None, list[str]]:
    """The first of `directories` (newest first) whose checkpoint this trial can resume from (None:
    none can, start from scratch), and the reason each one before it could not."""
    reasons = []
    for directory in directories:
        try:
            load_checkpoint(directory, config)
            return Path(directory), reasons
        except CheckpointError as error:
            reasons.append(str(error))
    return None, reasons


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])

"""Tasks: each makes training batches deterministically from (seed, index) and evaluates a model.

Every task offers the same four things to the trial loop (`Task`); which one runs is decided by
`task.name` in the config.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from mosaic_core.config import LanguageModelConfig, LengthTaskConfig, RegBenchConfig, TaskConfig
from mosaic_core.tasks.language_modeling import LanguageModelTask
from mosaic_core.tasks.length_generalization import LengthGeneralizationTask
from mosaic_core.tasks.regbench import RegBenchTask


class Task(Protocol):
    vocab_size: int

    def train_batch(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of batch `index`; labels are IGNORE_INDEX where nothing is scored."""

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """The task's metrics on its fixed evaluation data."""

    def diagnostic_inputs(self, examples: int) -> dict[float, Tensor]:
        """A few evaluation inputs per length factor (1.0 for tasks without lengths), for diagnostics."""


def build_task(config: TaskConfig, seed: int) -> Task:
    if isinstance(config, LengthTaskConfig):
        return LengthGeneralizationTask(config, seed)
    if isinstance(config, LanguageModelConfig):
        return LanguageModelTask(config, seed)
    if isinstance(config, RegBenchConfig):
        return RegBenchTask(config, seed)
    raise TypeError(f"no task for config {type(config).__name__}")


__all__ = ["LanguageModelTask", "LengthGeneralizationTask", "RegBenchTask", "Task", "build_task"]

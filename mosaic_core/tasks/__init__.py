"""Tasks: each makes training batches deterministically from (seed, index) and evaluates a model."""

from __future__ import annotations

from mosaic_core.config import TaskConfig
from mosaic_core.tasks.length_generalization import LengthGeneralizationTask


def build_task(config: TaskConfig, seed: int) -> LengthGeneralizationTask:
    return LengthGeneralizationTask(config, seed)


__all__ = ["LengthGeneralizationTask", "build_task"]

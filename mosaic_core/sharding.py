"""Data parallelism inside one trial: which rows of each global batch this process trains on, and
how the workers' losses add up to the loss of a one-process run.

A trial trained by several processes (Ray Train's workers, which set up the torch.distributed
process group) follows the same global batches as a one-process run: every worker builds the
global micro-batch from (seed, batch index), which is cheap, and keeps its block of rows. Its loss
is its sum over scored tokens divided by the global micro-batch's scored-token count, so the
workers' losses add up to the one-process token mean whatever the shards' token counts; DDP
averages gradients over workers, so each worker's loss is scaled by the worker count before
`backward()` and the averaged gradient is the one-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mosaic_core.metrics import IGNORE_INDEX


@dataclass(frozen=True)
class Shard:
    """This process's place among a trial's data-parallel workers (rank 0 of 1 without a process group)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def of_this_process(cls) -> Shard:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def leads(self) -> bool:
        """Rank 0 evaluates, checkpoints and reports, once for the whole trial."""
        return self.rank == 0

    def rows(self, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """This worker's contiguous block of a global batch's rows. A worker left without rows (a
        batch smaller than the worker count, such as an epoch's remainder) gets the first row with
        every label ignored: it still joins DDP's gradient all-reduce, with zero weight."""
        if self.world_size == 1:
            return inputs, labels
        block = inputs.tensor_split(self.world_size)[self.rank]
        if len(block) == 0:
            return inputs[:1], torch.full_like(labels[:1], IGNORE_INDEX)
        return block, labels.tensor_split(self.world_size)[self.rank]

    def summed(self, value: Tensor) -> Tensor:
        """`value` summed over the workers, on every worker (an all-reduce; itself on one worker)."""
        if self.world_size > 1:
            dist.all_reduce(value)
        return value

    def reseed_dropout(self, seed: int, step: int) -> None:
        """Workers other than rank 0 draw dropout from a stream fixed by (seed, rank, step), so
        their random state needs no place in the checkpoint; rank 0 keeps the trial's own stream,
        and a one-worker run is the plain run."""
        if self.rank > 0:
            torch.manual_seed(
                int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0])
            )


def scored_tokens(labels: Tensor) -> Tensor:
    """How many positions of a (global) batch carry a loss (at least 1, so a mean never divides by 0)."""
    return (labels != IGNORE_INDEX).sum().clamp(min=1)

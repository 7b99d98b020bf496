"""Length generalisation (paper Table 2): train on short sequences, test exact match on longer ones.

A sequence is `BOS src SEP trg EOS`; the model reads it shifted by one and is scored only on
what follows the first SEP (the target and EOS). Everything is generated on the fly from
(seed, index): no data files, no length cap.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from mosaic_core.config import LengthTaskConfig
from mosaic_core.metrics import IGNORE_INDEX, exact_match, length_metric_name

_TRAIN_STREAM, _TEST_STREAM = 0, 1  # disjoint numpy seed streams: test sets never meet training data


class LengthGeneralizationTask:
    """sort / reverse / copy over symbols 0..n−1, with BOS n, SEP n+1, EOS n+2, PAD n+3."""

    def __init__(self, config: LengthTaskConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        n = config.num_symbols
        self.bos, self.sep, self.eos, self.pad = n, n + 1, n + 2, n + 3
        self.vocab_size = n + 4

    def target(self, src: np.ndarray) -> np.ndarray:
        if self.config.name == "sort":
            return np.sort(src)
        if self.config.name == "reverse":
            return src[::-1]
        return src

    def sequence(self, src: np.ndarray) -> np.ndarray:
        return np.concatenate([[self.bos], src, [self.sep], self.target(src), [self.eos]])

    def make_batch(self, sources: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of shape (B, T); labels are IGNORE_INDEX except on target and EOS."""
        width = max(2 * len(src) + 2 for src in sources)
        inputs = np.full((len(sources), width), self.pad, dtype=np.int64)
        labels = np.full((len(sources), width), IGNORE_INDEX, dtype=np.int64)
        for row, src in enumerate(sources):
            seq = self.sequence(src)
            inputs[row, : len(seq) - 1] = seq[:-1]
            first_scored = len(src) + 1  # the SEP position predicts the first target token
            labels[row, first_scored : len(seq) - 1] = seq[first_scored + 1 :]
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def train_batch(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Batch number `index` of this trial's training stream: the same (seed, index), the same batch."""
        rng = np.random.default_rng([_TRAIN_STREAM, self.seed, index])
        lo, hi = self.config.train_min_length, self.config.train_max_length
        lengths = rng.integers(lo, hi + 1, size=batch_size)
        return self.make_batch([rng.integers(0, self.config.num_symbols, size=n) for n in lengths])

    def test_batches(self, length: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The fixed test set at one length: the same for every trial seed, so seeds are comparable."""
        rng = np.random.default_rng([_TEST_STREAM, length])
        sources = rng.integers(0, self.config.num_symbols, size=(self.config.eval_examples, length))
        for start in range(0, len(sources), self.config.eval_batch_size):
            yield self.make_batch(list(sources[start : start + self.config.eval_batch_size]))

    def diagnostic_inputs(self, examples: int) -> dict[float, Tensor]:
        return {factor: next(self.test_batches(length))[0][:examples] for factor, length in self.eval_lengths().items()}

    def eval_lengths(self) -> dict[float, int]:
        return {f: max(1, round(self.config.eval_length * f)) for f in self.config.eval_factors}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Teacher-forced exact match at every evaluation length factor."""
        metrics = {}
        for factor, length in self.eval_lengths().items():
            hits = [
                exact_match(model(x.to(device)), y.to(device)).float().cpu() for x, y in self.test_batches(length)
            ]
            metrics[length_metric_name("exact_match", factor)] = torch.cat(hits).mean().item()
        return metrics

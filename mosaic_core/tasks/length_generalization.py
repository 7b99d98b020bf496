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
    """sort / reverse / copy over symbols 0..n−1, and MQMTAR (multi-query multi-token associative recall).

    Ids: sort/reverse/copy use symbols 0..n−1; MQMTAR reserves 0 (space), 1 (key-value separator)
    and 2 (query marker) and uses letters 3..n+2. Then BOS, SEP, EOS, PAD follow the symbols.
    """

    def __init__(self, config: LengthTaskConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        first = _MQMTAR_FIRST_LETTER if config.name == "mqmtar" else 0
        top = first + config.num_symbols
        self.bos, self.sep, self.eos, self.pad = top, top + 1, top + 2, top + 3
        self.vocab_size = top + 4

    def target(self, src: np.ndarray) -> np.ndarray:
        if self.config.name == "sort":
            return np.sort(src)
        if self.config.name == "reverse":
            return src[::-1]
        return src

    def example(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(src, trg) for a source of `length` tokens (MQMTAR: `length` context tokens, then the queries)."""
        if self.config.name == "mqmtar":
            return mqmtar_example(rng, length, self.config.num_symbols)
        src = rng.integers(0, self.config.num_symbols, size=length)
        return src, self.target(src)

    def sequence(self, src: np.ndarray, trg: np.ndarray) -> np.ndarray:
        return np.concatenate([[self.bos], src, [self.sep], trg, [self.eos]])

    def make_batch(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of shape (B, T); labels are IGNORE_INDEX except on target and EOS."""
        width = max(len(src) + len(trg) + 2 for src, trg in examples)
        inputs = np.full((len(examples), width), self.pad, dtype=np.int64)
        labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
        for row, (src, trg) in enumerate(examples):
            seq = self.sequence(src, trg)
            inputs[row, : len(seq) - 1] = seq[:-1]
            first_scored = len(src) + 1  # the SEP position predicts the first target token
            labels[row, first_scored : len(seq) - 1] = seq[first_scored + 1 :]
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def train_batch(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Batch number `index` of this trial's training stream: the same (seed, index), the same batch."""
        rng = np.random.default_rng([_TRAIN_STREAM, self.seed, index])
        lo, hi = self.config.train_min_length, self.config.train_max_length
        return self.make_batch([self.example(rng, int(n)) for n in rng.integers(lo, hi + 1, size=batch_size)])

    def test_batches(self, length: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The fixed test set at one length: the same for every trial seed, so seeds are comparable.

        Batches hold at most `eval_max_tokens` tokens, so long lengths are evaluated in smaller chunks.
        """
        rng = np.random.default_rng([_TEST_STREAM, _TASK_STREAMS[self.config.name], length])
        examples = [self.example(rng, length) for _ in range(self.config.eval_examples)]
        size = max(1, min(self.config.eval_batch_size, self.config.eval_max_tokens // (2 * length + 2)))
        for start in range(0, len(examples), size):
            yield self.make_batch(examples[start : start + size])

    def diagnostic_inputs(self, examples: int) -> dict[float, Tensor]:
        return {factor: next(self.test_batches(length))[0][:examples] for factor, length in self.eval_lengths().items()}

    def eval_lengths(self) -> dict[float, int]:
        return {f: max(1, round(self.config.eval_length * f)) for f in self.config.eval_factors}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Teacher-forced exact match at every evaluation length factor (and, for MQMTAR, the
        fraction of the four queries answered right)."""
        metrics = {}
        for factor, length in self.eval_lengths().items():
            hits, queries = [], []
            for x, y in self.test_batches(length):
                logits, y = model(x.to(device)), y.to(device)
                hits.append(exact_match(logits, y).float().cpu())
                if self.config.name == "mqmtar":
                    queries.append(query_accuracy(logits, y).cpu())
            metrics[length_metric_name("exact_match", factor)] = torch.cat(hits).mean().item()
            if queries:
                metrics[length_metric_name("query_accuracy", factor)] = torch.cat(queries).mean().item()
        return metrics


_MQMTAR_FIRST_LETTER = 3  # 0 space, 1 key-value separator, 2 query marker
_MQMTAR_QUERIES = 4
_TASK_STREAMS = {"sort": 0, "reverse": 1, "copy": 2, "mqmtar": 3}


def mqmtar_example(rng: np.random.Generator, length: int, letters: int) -> tuple[np.ndarray, np.ndarray]:
    """A context of `length` tokens holding int(0.8·length // 6) key→value pairs, then 4 queries.

    The context is 6-token slots `0 k1 k2 1 v1 v2` (0 = space) at random slot positions, spaces
    elsewhere; keys are unique 2-letter words. The queries `2 k1 k2` ask for keys present in the
    context; the target answers each with `2 v1 v2` (12 tokens).
    """
    num_kv = int(length * 0.8 // 6)
    if num_kv < 1:
        raise ValueError(f"an MQMTAR context needs at least 8 tokens for one key-value pair; got {length}")
    first = _MQMTAR_FIRST_LETTER
    codes = rng.choice(letters * letters, size=num_kv, replace=False)  # unique keys
    keys = np.stack([codes // letters, codes % letters], axis=1) + first
    values = rng.integers(0, letters, size=(num_kv, 2)) + first
    context = np.zeros(length, dtype=np.int64)
    for slot, key, value in zip(sorted(rng.choice(length // 6, size=num_kv, replace=False)), keys, values):
        context[6 * slot : 6 * slot + 6] = [0, key[0], key[1], 1, value[0], value[1]]
    asked = rng.choice(num_kv, size=_MQMTAR_QUERIES, replace=num_kv < _MQMTAR_QUERIES)
    queries = np.concatenate([[2, *keys[i]] for i in asked])
    answers = np.concatenate([[2, *values[i]] for i in asked])
    return np.concatenate([context, queries]), answers


def query_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per MQMTAR query: all three answer tokens (`2 v1 v2`) right under teacher forcing."""
    scored = labels != IGNORE_INDEX
    first = scored.float().argmax(-1, keepdim=True)  # the first scored position of each row
    offsets = torch.arange(3 * _MQMTAR_QUERIES, device=labels.device)
    positions = first + offsets
    right = logits.argmax(-1).gather(-1, positions) == labels.gather(-1, positions)
    return right.view(len(labels), _MQMTAR_QUERIES, 3).all(-1).float().flatten()

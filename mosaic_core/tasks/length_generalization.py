"""Length generalisation (paper Table 2): train on short sequences, test exact match on longer ones.

A sequence is `BOS src SEP trg EOS`; the model reads it shifted by one and is trained only on
what follows the first SEP (the target and EOS). Exact match scores the answer only, as the
paper's evaluation does: the target without EOS, and for MQMTAR its value tokens, not the `2`
query markers. Everything is generated on the fly from (seed, index): no data files, no length cap.

MQMTAR follows the generator of Vasylenko et al. 2025 (deep-spin/asentmax, which produced the
paper's data): at a nominal length n the context holds num_kv = int(0.8·n // 6) pairs, each in a
segment of n // num_kv tokens holding `k1 k2 1 v1 v2 0` with spaces around it; keys and values are
distinct within an example and come from the split's own vocabulary of `kv_vocab_size` (10 000) words; the
four queries are drawn with replacement from the context's pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mosaic_core.config import LengthTaskConfig
from mosaic_core.metrics import (
    EXACT_MATCH,
    EXACT_MATCH_WITH_EOS,
    IGNORE_INDEX,
    QUERY_ACCURACY,
    exact_match,
    length_metric_name,
)

_TRAIN_STREAM, _TEST_STREAM, _VOCABULARY_STREAM = 0, 1, 2  # disjoint numpy seed streams


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
        self.train_vocabulary = self._vocabulary([_TRAIN_STREAM, seed])

    def target(self, src: np.ndarray) -> np.ndarray:
        if self.config.name == "sort":
            return np.sort(src)
        if self.config.name == "reverse":
            return src[::-1]
        return src

    def _vocabulary(self, stream: list[int]) -> KeyValueVocabulary | None:
        """A split's MQMTAR words (each split draws its own, as Vasylenko et al.); None for other tasks."""
        if self.config.name != "mqmtar":
            return None
        rng = np.random.default_rng([_VOCABULARY_STREAM, *stream])
        return KeyValueVocabulary.draw(rng, self.config.num_symbols, self.config.key_value_words)

    def example(
        self, rng: np.random.Generator, length: int, vocabulary: KeyValueVocabulary | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(src, trg) at nominal length `length`: a source of `length` symbols, or for MQMTAR a
        context of at most `length` tokens followed by the queries (from `vocabulary`, default
        the training split's)."""
        if self.config.name == "mqmtar":
            return mqmtar_example(rng, length, vocabulary or self.train_vocabulary)
        src = rng.integers(0, self.config.num_symbols, size=length)
        return src, self.target(src)

    def answer_mask(self, labels: Tensor) -> Tensor:
        """Where exact match looks: the target without EOS; for MQMTAR only the value tokens."""
        answer = (labels != IGNORE_INDEX) & (labels != self.eos)
        return answer & (labels != _QUERY_MARKER) if self.config.name == "mqmtar" else answer

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
        return self.make_batch(
            [self.example(rng, int(n)) for n in rng.integers(lo, hi + 1, size=batch_size)]
        )

    def test_batches(self, length: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The fixed test set at one length: the same for every trial seed, so seeds are comparable.

        Batches hold at most `eval_max_tokens` tokens, so long lengths are evaluated in smaller chunks.
        """
        stream = [_TEST_STREAM, _TASK_STREAMS[self.config.name], length]
        rng, vocabulary = np.random.default_rng(stream), self._vocabulary(stream)
        examples = [self.example(rng, length, vocabulary) for _ in range(self.config.eval_examples)]
        size = max(
            1, min(self.config.eval_batch_size, self.config.eval_max_tokens // (2 * length + 2))
        )
        for start in range(0, len(examples), size):
            yield self.make_batch(examples[start : start + size])

    def diagnostic_inputs(self, examples: int) -> dict[float, Tensor]:
        return {
            factor: next(self.test_batches(length))[0][:examples]
            for factor, length in self.eval_lengths().items()
        }

    def eval_lengths(self) -> dict[float, int]:
        return {f: max(1, round(self.config.eval_length * f)) for f in self.config.eval_factors}

    METRICS = (EXACT_MATCH, EXACT_MATCH_WITH_EOS, QUERY_ACCURACY)  # each per length: `_2x`

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Teacher-forced exact match of the answer at every evaluation length factor; the same
        with EOS (`exact_match_with_eos`); for MQMTAR the fraction of queries whose two value
        tokens are right."""
        metrics = {}
        for factor, length in self.eval_lengths().items():
            scores: dict[str, list[Tensor]] = {}
            for x, y in self.test_batches(length):
                for name, values in self._scores(model(x.to(device)), y.to(device)).items():
                    scores.setdefault(name, []).append(values.float().cpu())
            for name, values in scores.items():
                metrics[length_metric_name(name, factor)] = torch.cat(values).mean().item()
        return metrics

    def _scores(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        answer = self.answer_mask(labels)
        scores = {
            EXACT_MATCH: exact_match(logits, labels, answer),
            EXACT_MATCH_WITH_EOS: exact_match(logits, labels),
        }
        if self.config.name == "mqmtar":
            scores[QUERY_ACCURACY] = query_accuracy(logits, labels, answer)
        return scores


_MQMTAR_FIRST_LETTER = 3  # 0 space, 1 key-value separator, 2 query marker
_QUERY_MARKER = 2
_MQMTAR_QUERIES = 4
_MQMTAR_PAIR = 6  # `k1 k2 1 v1 v2 0`: key, separator, value and the space that closes the pair
_TASK_STREAMS = {"sort": 0, "reverse": 1, "copy": 2, "mqmtar": 3}


@dataclass(frozen=True)
class KeyValueVocabulary:
    """The 2-letter key words and value words of one MQMTAR split, as (size, 2) letter ids."""

    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, letters: int, size: int) -> KeyValueVocabulary:
        """`size` distinct keys and, independently, `size` distinct values among the letters² words."""

        def words() -> np.ndarray:
            codes = rng.choice(letters * letters, size=size, replace=False)
            return np.stack([codes // letters, codes % letters], axis=1) + _MQMTAR_FIRST_LETTER

        return cls(keys=words(), values=words())


def mqmtar_example(
    rng: np.random.Generator, length: int, vocabulary: KeyValueVocabulary
) -> tuple[np.ndarray, np.ndarray]:
    """A context for nominal length `length` (num_kv segments of length // num_kv tokens), then
    4 queries `2 k1 k2`; the target answers each with `2 v1 v2` (12 tokens)."""
    num_kv = min(int(length * 0.8 // _MQMTAR_PAIR), len(vocabulary.keys))
    if num_kv < 1:
        raise ValueError(
            f"an MQMTAR context needs at least 8 tokens for one key-value pair; got {length}"
        )
    keys = vocabulary.keys[rng.choice(len(vocabulary.keys), size=num_kv, replace=False)]
    values = vocabulary.values[rng.choice(len(vocabulary.values), size=num_kv, replace=False)]
    context = _mqmtar_context(rng, keys, values, segment=length // num_kv)
    asked = rng.integers(0, num_kv, size=_MQMTAR_QUERIES)  # with replacement, as theirs
    marker = np.full((_MQMTAR_QUERIES, 1), _QUERY_MARKER)
    queries = np.concatenate([marker, keys[asked]], axis=1).ravel()
    answers = np.concatenate([marker, values[asked]], axis=1).ravel()
    return np.concatenate([context, queries]), answers


def _mqmtar_context(
    rng: np.random.Generator, keys: np.ndarray, values: np.ndarray, segment: int
) -> np.ndarray:
    """One segment per pair: the 6-token pair amid spaces, placed as Vasylenko et al. place it.

    Their generator centres the pair in 2·(segment + 1) spaces and deletes random spaces until
    `segment` tokens remain; which spaces survive is a uniform subset, so the spaces left before
    the pair follow a hypergeometric law.
    """
    padded = 2 * (segment + 1)
    before = padded // 2 - 2  # spaces before the centred pair
    after = padded - before - _MQMTAR_PAIR
    kept_before = rng.hypergeometric(before, after, segment - _MQMTAR_PAIR, size=len(keys))
    pairs = np.concatenate(
        [keys, np.ones((len(keys), 1), np.int64), values, np.zeros((len(keys), 1), np.int64)],
        axis=1,
    )
    context = np.zeros(len(keys) * segment, dtype=np.int64)
    starts = np.arange(len(keys)) * segment + kept_before
    context[starts[:, None] + np.arange(_MQMTAR_PAIR)] = pairs
    return context


def query_accuracy(logits: Tensor, labels: Tensor, answer: Tensor) -> Tensor:
    """Per MQMTAR query: both value tokens right under teacher forcing (`answer` marks the 8 per example)."""
    right = (logits.argmax(-1) == labels)[answer]  # row by row, in order: v1 v2 of query 1, 2, …
    return right.view(len(labels), _MQMTAR_QUERIES, 2).all(-1).float().flatten()

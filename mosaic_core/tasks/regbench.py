"""In-context language learning (RegBench, Akyürek et al. 2024; paper Table 1).

Every sequence is 10–19 strings of one random regular language joined by `|`; the model has to
infer the language from the strings so far and continue the current string legally. Scored by
whether the argmax is a legal next letter and by the total variation distance to the DFA's
next-letter distribution (uniform over the legal letters). The automata code is our own: random
DFAs, Moore minimisation, trimming and a canonical form for deduplication.

Choices where SPEC §4 is silent:
- Every state keeps 1–3 outgoing edges through minimisation and trimming, so a walk never gets
  stuck: every string has exactly its sampled length (1–49).
- Minimising can shrink a DFA below 4 states, or merge a state with its successor (a self-loop) or
  two of its successors (a repeated target). seq_icl keeps such DFAs (~6.5 % of draws) and, since
  its set of DFA objects compares them by identity, never removes a duplicate: `dfa_filter:
  seq_icl`, the default. `dfa_filter: strict` redraws them and keeps all splits disjoint, so
  every DFA used satisfies §4.
- `|` is never a target. Where a string ends depends on its sampled length, not on the language,
  so training labels are IGNORE_INDEX there (as in the RegBench reference code) and the truth is
  uniform over legal *letters*: a model that knows the DFA scores accuracy 100 and TVD 0.

As seq_icl (berlino/seq_icl), which produced the paper's Table 1:
- The training set is fixed: one sequence per training DFA, drawn once from `data_seed` (the same
  for every trial seed), trained on for epochs, shuffled each epoch by (seed, epoch); the last
  batch of an epoch is smaller, as a DataLoader's. Validation and test hold one sequence per DFA.
- Accuracy counts every position whose label is a letter (those after `|` included, those
  predicting `|` not): is the argmax a legal next letter? TVD counts every non-padding position,
  against the uniform distribution over the legal next letters (after `|`: the start state's),
  and is seq_icl's L1 Σ_v |p_model(v) − p_DFA(v)|, i.e. twice the textbook ½Σ|p − q|: the scale of
  the paper's Table 1. Both are averages over positions, in percent.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mosaic_core.config import RegBenchConfig
from mosaic_core.metrics import ACCURACY, IGNORE_INDEX, TVD, VAL_ACCURACY, VAL_LOSS, VAL_TVD

LETTERS = "abcdefghijklmnopqr"  # ids 0..17
NUM_LETTERS = len(LETTERS)
PAD, SEP = NUM_LETTERS, NUM_LETTERS + 1  # `.` and `|`
VOCAB_SIZE = NUM_LETTERS + 2

MIN_STATES, MAX_STATES = 4, 12
MIN_ALPHABET = 4
MAX_EDGES = 3
MIN_STRINGS, MAX_STRINGS = 10, 19
MAX_LENGTH = 49

_EVAL_STREAM, _TRAIN_STREAM, _ORDER_STREAM = 0, 1, 2  # disjoint numpy seed streams
_SPLITS = ("val", "test", "train")  # generation order: training skips what val and test hold

Transitions = list[dict[int, int]]  # state -> {letter: next state}; 0 starts, every state accepts
# canonical: states in BFS order, (letter, target) sorted
Dfa = tuple[tuple[tuple[int, int], ...], ...]


def random_transitions(rng: random.Random) -> Transitions:
    """A raw DFA of SPEC §4: 4–12 states over an alphabet of 4–18 letters; every state has 1–3
    edges with distinct letters and distinct targets other than itself."""
    n = rng.randint(MIN_STATES, MAX_STATES)
    alphabet = rng.sample(range(NUM_LETTERS), rng.randint(MIN_ALPHABET, NUM_LETTERS))
    transitions = []
    for state in range(n):
        edges = rng.randint(1, MAX_EDGES)
        others = [t for t in range(n) if t != state]
        transitions.append(dict(zip(rng.sample(alphabet, edges), rng.sample(others, edges))))
    return transitions


def minimise(transitions: Transitions) -> Transitions:
    """Moore's partition refinement. All states accept, so states differ only where their letter
    sets differ after some word: split blocks by (block, {letter: block of target}) until stable.
    Missing letters lead to an implicit rejecting sink, which the letter sets already tell apart."""
    blocks, count = [0] * len(transitions), 1
    while True:
        signatures = [
            (blocks[s], tuple(sorted((a, blocks[t]) for a, t in edges.items())))
            for s, edges in enumerate(transitions)
        ]
        # state 0's block is 0
        ids = {signature: i for i, signature in enumerate(dict.fromkeys(signatures))}
        blocks = [ids[signature] for signature in signatures]
        if len(ids) == count:
            break
        count = len(ids)
    merged: Transitions = [{} for _ in range(count)]
    for state, edges in enumerate(transitions):
        merged[blocks[state]] = {a: blocks[t] for a, t in edges.items()}
    return merged


def canonical(transitions: Transitions) -> Dfa:
    """Trim to the states reachable from the start and number them in BFS order, letters in order:
    relabelled copies of one DFA become the same tuple, so a set finds duplicates."""
    number, queue = {0: 0}, [0]
    for state in queue:
        for _, target in sorted(transitions[state].items()):
            if target not in number:
                number[target] = len(number)
                queue.append(target)
    return tuple(tuple((a, number[t]) for a, t in sorted(transitions[s].items())) for s in queue)


def satisfies_spec(dfa: Dfa) -> bool:
    """4–12 states, no self-loops, distinct targets per state (distinct letters hold by construction)."""
    return MIN_STATES <= len(dfa) <= MAX_STATES and all(
        state not in targets and len(set(targets)) == len(targets)
        for state, targets in enumerate([t for _, t in edges] for edges in dfa)
    )


def generate_dfas(count: int, rng: random.Random, seen: set[Dfa] | None) -> list[Dfa]:
    """`count` minimised, trimmed DFAs that satisfy the SPEC and are not in `seen` (which they
    join); with `seen` None, every draw as it comes (seq_icl's sampler: no filter, no deduplication)."""
    dfas: list[Dfa] = []
    while len(dfas) < count:
        dfa = canonical(minimise(random_transitions(rng)))
        if seen is None:
            dfas.append(dfa)
        elif satisfies_spec(dfa) and dfa not in seen:
            seen.add(dfa)
            dfas.append(dfa)
    return dfas


def accepts(dfa: Dfa, string: Sequence[int]) -> bool:
    """Every state accepts, so a string is in the language iff the DFA can walk it."""
    state = 0
    for letter in string:
        edges = dict(dfa[state])
        if letter not in edges:
            return False
        state = edges[letter]
    return True


class DfaTable:
    """A split's DFAs as padded arrays, so walks of a whole batch are a few vectorised steps."""

    def __init__(self, dfas: Sequence[Dfa]) -> None:
        shape = (len(dfas), MAX_STATES, MAX_EDGES)
        self.letters, self.targets = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        self.degree = np.ones(shape[:2], np.int64)
        # legal next letters per state
        self.legal = np.zeros((len(dfas), MAX_STATES, NUM_LETTERS), bool)
        for i, dfa in enumerate(dfas):
            for state, edges in enumerate(dfa):
                self.degree[i, state] = len(edges)
                for k, (letter, target) in enumerate(edges):
                    self.letters[i, state, k], self.targets[i, state, k] = letter, target
                    self.legal[i, state, letter] = True


def sample_sequences(
    table: DfaTable, dfa_ids: np.ndarray, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One sequence per DFA id: (tokens, state after each token; after `|` the start state 0).

    All strings are walked to the maximum length at once, choosing uniformly among the current
    state's letters, then cut to their sampled lengths and joined with `|`.
    """
    batch = len(dfa_ids)
    strings = rng.integers(MIN_STRINGS, MAX_STRINGS + 1, size=batch)
    lengths = rng.integers(1, MAX_LENGTH + 1, size=(batch, MAX_STRINGS))
    choices = rng.random((batch, MAX_STRINGS, MAX_LENGTH))
    dfa = dfa_ids[:, None]
    state = np.zeros((batch, MAX_STRINGS), np.int64)
    tokens = np.full((batch, MAX_STRINGS, MAX_LENGTH + 1), SEP, np.int64)
    states = np.full((batch, MAX_STRINGS, MAX_LENGTH + 1), -1, np.int64)
    for step in range(MAX_LENGTH):
        edge = (choices[..., step] * table.degree[dfa, state]).astype(np.int64)
        tokens[..., step] = table.letters[dfa, state, edge]
        state = table.targets[dfa, state, edge]
        states[..., step] = state
    np.put_along_axis(tokens, lengths[..., None], SEP, axis=-1)
    np.put_along_axis(states, lengths[..., None], 0, axis=-1)  # `|` starts the next string
    keep = (np.arange(MAX_LENGTH + 1) <= lengths[..., None]) & (
        np.arange(MAX_STRINGS) < strings[:, None]
    )[..., None]
    # no `|` after the last
    return [(tokens[b][keep[b]][:-1], states[b][keep[b]][:-1]) for b in range(batch)]


def make_batch(
    sequences: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, states) of shape (B, T): inputs = seq[:-1] padded with PAD; labels = seq[1:]
    with IGNORE_INDEX on padding and on `|`; states = DFA state after each input (−1 on padding)."""
    width = max(len(tokens) for tokens, _ in sequences) - 1
    inputs = np.full((len(sequences), width), PAD, np.int64)
    labels = np.full((len(sequences), width), IGNORE_INDEX, np.int64)
    states = np.full((len(sequences), width), -1, np.int64)
    for row, (tokens, after) in enumerate(sequences):
        n = len(tokens) - 1
        inputs[row, :n] = tokens[:-1]
        labels[row, :n] = np.where(tokens[1:] == SEP, IGNORE_INDEX, tokens[1:])
        states[row, :n] = after[:-1]
    return inputs, labels, states


class RegBenchTask:
    """Random regular languages: DFAs and sequences fixed by data_seed; the trial seed orders the epochs."""

    vocab_size = VOCAB_SIZE

    def __init__(self, config: RegBenchConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        counts = {"val": config.num_val, "test": config.num_test, "train": config.num_examples}
        seen: set[Dfa] | None = set() if config.dfa_filter == "strict" else None
        self.dfas = {
            split: generate_dfas(
                counts[split], random.Random(f"regbench/{config.data_seed}/{split}"), seen
            )
            for split in _SPLITS
        }
        self.tables = {split: DfaTable(dfas) for split, dfas in self.dfas.items()}
        self.eval_sequences = {
            split: sample_sequences(
                self.tables[split],
                np.arange(counts[split]),
                np.random.default_rng([_EVAL_STREAM, config.data_seed, _SPLITS.index(split)]),
            )
            for split in ("val", "test")
        }
        self.train_sequences = sample_sequences(
            self.tables["train"],
            np.arange(config.num_examples),
            np.random.default_rng([_TRAIN_STREAM, config.data_seed]),
        )

    def train_ids(self, index: int, batch_size: int) -> np.ndarray:
        """The training sequences of batch `index`: epochs of ⌈n / batch_size⌉ batches over all of
        them, each epoch in an order fixed by (seed, epoch), its last batch the remainder."""
        n = len(self.train_sequences)
        epoch, position = divmod(index, -(-n // batch_size))
        order = np.random.default_rng([_ORDER_STREAM, self.seed, epoch]).permutation(n)
        return order[position * batch_size : (position + 1) * batch_size]

    def train_batch(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Batch number `index` of this trial's epochs over the fixed training set."""
        inputs, labels, _ = make_batch(
            [self.train_sequences[i] for i in self.train_ids(index, batch_size)]
        )
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def diagnostic_inputs(self, examples: int) -> dict[float, Tensor]:
        return {1.0: torch.from_numpy(make_batch(self.eval_sequences["test"][:examples])[0])}

    METRICS = (ACCURACY, TVD, VAL_ACCURACY, VAL_TVD, VAL_LOSS)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """The reported accuracy and TVD (percent) come from test; model selection uses the val_* metrics."""
        val, test = self.score(model, device, "val"), self.score(model, device, "test")
        return {
            ACCURACY: test["accuracy"],
            TVD: test["tvd"],
            VAL_ACCURACY: val["accuracy"],
            VAL_TVD: val["tvd"],
            VAL_LOSS: val["loss"],
        }

    @torch.no_grad()
    def score(self, model: nn.Module, device: torch.device, split: str) -> dict[str, float]:
        """Accuracy (positions labelled with a letter), TVD (every non-padding position; seq_icl's
        L1 scale) and mean cross-entropy over the letter labels."""
        sequences, table, size = (
            self.eval_sequences[split],
            self.tables[split],
            self.config.eval_batch_size,
        )
        totals = dict.fromkeys(("hits", "letters", "l1", "positions", "loss"), 0.0)
        for start in range(0, len(sequences), size):
            inputs, labels, states = make_batch(sequences[start : start + size])
            legal = table.legal[np.arange(start, start + len(inputs))[:, None], states.clip(min=0)]
            legal = torch.from_numpy(legal & (states >= 0)[..., None]).to(device)
            logits = model(torch.from_numpy(inputs).to(device)).float()
            truth = torch.zeros_like(logits)  # the model's vocabulary may be padded beyond ours
            truth[..., :NUM_LETTERS] = legal / legal.sum(-1, keepdim=True).clamp(min=1)
            labels_t = torch.from_numpy(labels).to(device)
            lettered, real = labels_t != IGNORE_INDEX, legal.any(-1)
            totals["hits"] += (
                (truth.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1) > 0)[lettered]
                .sum()
                .item()
            )
            totals["letters"] += lettered.sum().item()
            totals["l1"] += (logits.softmax(-1) - truth).abs().sum(-1)[real].sum().item()
            totals["positions"] += real.sum().item()
            totals["loss"] += F.cross_entropy(
                logits.flatten(0, 1), labels_t.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
        return {
            "accuracy": 100 * totals["hits"] / totals["letters"],
            "tvd": 100 * totals["l1"] / totals["positions"],
            "loss": totals["loss"] / totals["letters"],
        }

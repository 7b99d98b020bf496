"""RegBench: random DFAs (invariants, minimisation, dedupe, splits), sequences, batches and metrics."""

from __future__ import annotations

import random
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mosaic_core.config import ModelConfig, RegBenchConfig, TrialConfig
from mosaic_core.metrics import IGNORE_INDEX
from mosaic_core.model import MemoryMosaics
from mosaic_core.tasks.regbench import (
    MAX_EDGES,
    MAX_LENGTH,
    MAX_STATES,
    MAX_STRINGS,
    MIN_STATES,
    MIN_STRINGS,
    NUM_LETTERS,
    PAD,
    SEP,
    VOCAB_SIZE,
    Dfa,
    DfaTable,
    RegBenchTask,
    Transitions,
    accepts,
    canonical,
    generate_dfas,
    make_batch,
    minimise,
    random_transitions,
    sample_sequences,
    satisfies_spec,
)

SMALL = dict(num_examples=60, num_val=20, num_test=20, eval_batch_size=8, dfa_filter="strict")


def task(seed: int = 0, **overrides) -> RegBenchTask:
    return RegBenchTask(RegBenchConfig(name="regbench", **{**SMALL, **overrides}), seed)


@pytest.fixture(scope="module")
def small() -> RegBenchTask:
    return task()


def language(transitions: Transitions, max_length: int) -> set[tuple[int, ...]]:
    """Every accepted string up to `max_length`: all states accept, so all walks from the start."""
    words, frontier = {()}, [((), 0)]
    for _ in range(max_length):
        frontier = [
            (word + (a,), t) for word, state in frontier for a, t in transitions[state].items()
        ]
        words.update(word for word, _ in frontier)
    return words


def as_transitions(dfa: Dfa) -> Transitions:
    return [dict(edges) for edges in dfa]


def split_strings(tokens: np.ndarray) -> list[list[int]]:
    strings, current = [], []
    for token in tokens.tolist():
        if token == SEP:
            strings.append(current)
            current = []
        else:
            current.append(token)
    return strings + [current]


# ---- automata ------------------------------------------------------------------------------------


def test_every_dfa_of_every_split_satisfies_the_spec(small):
    for dfas in small.dfas.values():
        for dfa in dfas:
            assert MIN_STATES <= len(dfa) <= MAX_STATES
            # trimmed: BFS from the start reaches every state
            assert canonical(as_transitions(dfa)) == dfa
            assert len(minimise(as_transitions(dfa))) == len(dfa)  # already minimal
            for state, edges in enumerate(dfa):
                letters, targets = [a for a, _ in edges], [t for _, t in edges]
                assert 1 <= len(edges) <= MAX_EDGES
                assert len(set(letters)) == len(letters) and len(set(targets)) == len(targets)
                assert state not in targets and all(0 <= a < NUM_LETTERS for a in letters)


def test_minimisation_merges_equivalent_states_and_keeps_the_language():
    # 1 and 2 both read "c" then behave like 3; 4 and 5 differ only two letters later (b vs d after a)
    redundant = [{0: 1, 1: 2, 4: 4}, {2: 3}, {2: 3}, {0: 0}, {0: 5}, {0: 6}, {1: 0}, {3: 0}]
    minimal = minimise(redundant)
    assert len(minimal) == len(redundant) - 1  # 1 ≡ 2 merged; 4, 5 kept apart (needs two rounds)
    assert language(minimal, 6) == language(redundant, 6)
    assert minimise([{0: 1}, {0: 2}, {0: 3}, {0: 0}]) == [{0: 0}]  # a 4-cycle of one letter is a^*


def test_minimisation_keeps_the_language_of_random_dfas():
    rng = random.Random(1)
    for _ in range(50):
        raw = random_transitions(rng)
        minimal = minimise(raw)
        assert len(minimal) <= len(raw)
        assert language(minimal, 6) == language(raw, 6)
        assert language(as_transitions(canonical(minimal)), 6) == language(raw, 6)


def test_relabelled_copies_have_one_canonical_form():
    rng = random.Random(2)
    for _ in range(50):
        raw = random_transitions(rng)
        perm = [0, *rng.sample(range(1, len(raw)), len(raw) - 1)]  # the start stays state 0
        relabelled = [{} for _ in raw]
        for state, edges in enumerate(raw):
            relabelled[perm[state]] = {a: perm[t] for a, t in edges.items()}
        assert canonical(relabelled) == canonical(raw)
        assert canonical(minimise(relabelled)) == canonical(minimise(raw))


def test_generation_skips_what_is_already_seen():
    first = generate_dfas(30, random.Random("x"), set())
    assert len(set(first)) == 30
    again = generate_dfas(30, random.Random("x"), set(first[:10]))
    assert again[:20] == first[10:30] and not set(again) & set(first[:10])


def test_seq_icls_filter_keeps_every_draw_that_strict_redraws():
    """seq_icl's sampler: the minimised, trimmed draws in order, the ones outside SPEC §4 (fewer
    than 4 states, self-loops, repeated targets) included, repeats allowed."""
    rng = random.Random("draws")
    draws = [canonical(minimise(random_transitions(rng))) for _ in range(400)]
    assert generate_dfas(400, random.Random("draws"), None) == draws
    outside = [dfa for dfa in draws if not satisfies_spec(dfa)]
    assert 0.02 < len(outside) / len(draws) < 0.15  # ~6.5 % by an independent reimplementation
    assert any(len(dfa) < MIN_STATES for dfa in outside)
    strict = generate_dfas(400, random.Random("draws"), set())
    assert all(satisfies_spec(dfa) for dfa in strict) and len(set(strict)) == 400


def test_seq_icl_splits_are_drawn_independently():
    seq_icl = task(dfa_filter="seq_icl")
    for split, count in (("train", 60), ("val", 20), ("test", 20)):
        rng = random.Random(f"regbench/0/{split}")
        assert seq_icl.dfas[split] == [
            canonical(minimise(random_transitions(rng))) for _ in range(count)
        ]


# ---- splits and training batches -----------------------------------------------------------------


def test_validation_and_test_dfas_never_occur_in_training(small):
    train, val, test = (set(small.dfas[split]) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (60, 20, 20)
    assert not train & val and not train & test and not val & test


def test_splits_depend_on_data_seed_only(small):
    other = task(seed=5)
    assert other.dfas == small.dfas
    assert all(
        np.array_equal(a[0], b[0])
        for a, b in zip(other.eval_sequences["test"], small.eval_sequences["test"])
    )
    assert task(data_seed=1).dfas["test"] != small.dfas["test"]
    # larger splits extend smaller ones
    assert task(num_examples=30).dfas["train"] == small.dfas["train"][:30]


def test_train_batches_are_a_pure_function_of_seed_and_index(small):
    again, other = task(), task(seed=1)
    assert all(
        torch.equal(a, b) for a, b in zip(small.train_batch(7, 16), again.train_batch(7, 16))
    )
    assert not torch.equal(small.train_batch(7, 16)[0], small.train_batch(8, 16)[0])
    assert not torch.equal(small.train_batch(7, 16)[0], other.train_batch(7, 16)[0])


def test_a_trial_sees_exactly_num_examples_distinct_sequences_over_two_epochs(small):
    """As seq_icl: one fixed sequence per training DFA, each seen once per epoch; 60 sequences in
    batches of 16 make epochs of 4 batches (16, 16, 16, 12)."""
    seen = []
    for index in range(8):  # two epochs
        inputs, _ = small.train_batch(index, 16)
        assert len(inputs) == (12 if index % 4 == 3 else 16)
        seen += [tuple(row[row != PAD].tolist()) for row in inputs]
    counts = Counter(seen)
    assert len(counts) == 60 and set(counts.values()) == {2}
    assert set(counts) == {tuple(tokens[:-1].tolist()) for tokens, _ in small.train_sequences}
    assert set(seen[:60]) == set(seen[60:])  # the second epoch reorders the same sequences
    assert seen[:60] != seen[60:]


def test_the_training_set_depends_on_data_seed_not_on_the_trial_seed(small):
    other = task(seed=3)
    assert all(
        np.array_equal(a[0], b[0]) for a, b in zip(small.train_sequences, other.train_sequences)
    )
    assert not all(
        np.array_equal(a[0], b[0])
        for a, b in zip(small.train_sequences, task(data_seed=2).train_sequences)
    )


def test_max_epochs_sets_the_steps_of_a_fixed_training_set():
    config = TrialConfig.model_validate(
        {
            "task": {"name": "regbench", "num_examples": 1000},
            "train": {"max_epochs": 200, "batch_size": 32},
        }
    )
    assert config.train.max_steps == 200 * 32  # ⌈1000 / 32⌉ = 32 batches per epoch
    with pytest.raises(ValueError, match="disagrees with train.max_epochs"):
        TrialConfig.model_validate(
            {"task": {"name": "regbench"}, "train": {"max_epochs": 2, "max_steps": 5}}
        )
    with pytest.raises(ValueError, match="needs a task with a fixed training set"):
        TrialConfig.model_validate({"task": {"name": "sort"}, "train": {"max_epochs": 2}})


def test_labels_are_shifted_inputs_without_padding_or_separators(small):
    inputs, labels = small.train_batch(0, 16)
    assert inputs.shape == labels.shape and inputs.dtype == labels.dtype == torch.int64
    lengths = (inputs != PAD).sum(-1)
    assert (lengths < inputs.shape[1]).any()  # some rows are padded
    for row, n in zip(range(len(inputs)), lengths.tolist()):
        assert (inputs[row, n:] == PAD).all() and (labels[row, n:] == IGNORE_INDEX).all()
        # labels[t] is the token at t+1
        shifted = torch.cat([inputs[row, 1:n], labels[row, n - 1 : n]])
        scored = labels[row, :n] != IGNORE_INDEX
        assert torch.equal(labels[row, :n][scored], shifted[scored])
        assert (shifted[~scored] == SEP).all() and (labels[row, :n][scored] < NUM_LETTERS).all()
        assert (inputs[row, :n] != PAD).all()


# ---- sequences -----------------------------------------------------------------------------------


def test_sequences_are_10_to_19_accepted_strings_of_length_1_to_49(small):
    table = small.tables["train"]
    ids = np.arange(60).repeat(4)
    counts, lengths = set(), set()
    for dfa_id, (tokens, states) in zip(
        ids, sample_sequences(table, ids, np.random.default_rng(0))
    ):
        dfa = small.dfas["train"][dfa_id]
        strings = split_strings(tokens)
        counts.add(len(strings))
        lengths.update(len(s) for s in strings)
        assert all(accepts(dfa, s) for s in strings)
        assert (states[tokens == SEP] == 0).all()  # `|` restarts the DFA
        # the recorded state is the one reached by walking the current string so far
        for position in np.flatnonzero(tokens != SEP)[:50]:
            start = position
            while start > 0 and tokens[start - 1] != SEP:
                start -= 1
            walked = 0
            for letter in tokens[start : position + 1]:
                walked = dict(dfa[walked])[letter]
            assert states[position] == walked
    assert min(counts) == MIN_STRINGS and max(counts) == MAX_STRINGS
    assert min(lengths) == 1 and max(lengths) == MAX_LENGTH


def test_a_walk_chooses_uniformly_among_legal_letters():
    dfa = ((0, 1), (2, 2), (3, 3)), ((4, 0),), ((5, 0),), ((6, 0),)
    table = DfaTable([dfa])
    tokens = np.concatenate(
        [t for t, _ in sample_sequences(table, np.zeros(40, np.int64), np.random.default_rng(0))]
    )
    after_start = tokens[np.flatnonzero(np.isin(tokens, [4, 5, 6])) + 1]
    after_start = after_start[after_start != SEP]
    shares = np.bincount(after_start, minlength=4)[[0, 2, 3]] / len(after_start)
    assert np.allclose(shares, 1 / 3, atol=0.03)


# ---- metrics -------------------------------------------------------------------------------------


class LookupModel(nn.Module):
    """Logits looked up by the exact input batch: stands in for a model with a known distribution."""

    def __init__(self, logits: dict[bytes, Tensor]) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, idx: Tensor) -> Tensor:
        return self.logits[idx.cpu().numpy().tobytes()]


def legal_letters(dfa: Dfa, inputs: np.ndarray) -> Tensor:
    """(T, 18) bool: the letters the DFA allows after each input, found by walking the current
    string from the start (after `|`: the start state's letters); none on padding."""
    legal, state = torch.zeros(len(inputs), NUM_LETTERS, dtype=torch.bool), 0
    for position, token in enumerate(inputs.tolist()):
        if token == PAD:
            continue
        state = 0 if token == SEP else dict(dfa[state])[token]
        legal[position, [a for a, _ in dfa[state]]] = True
    return legal


def lookup_model(t: RegBenchTask, vocab: int, fill) -> LookupModel:
    """Logits for every evaluation batch of `t`, made by fill(legal letters (B, T, 18)) -> (B, T, vocab)."""
    logits = {}
    for split in ("val", "test"):
        sequences, size = t.eval_sequences[split], t.config.eval_batch_size
        for start in range(0, len(sequences), size):
            inputs, _, _ = make_batch(sequences[start : start + size])
            legal = torch.stack(
                [legal_letters(t.dfas[split][start + row], x) for row, x in enumerate(inputs)]
            )
            logits[inputs.tobytes()] = fill(legal, vocab)
    return LookupModel(logits)


def true_logits(legal: Tensor, vocab: int) -> Tensor:
    logits = torch.full((*legal.shape[:2], vocab), -1e9)
    logits[..., :NUM_LETTERS] = torch.where(
        legal, -torch.log(legal.sum(-1, keepdim=True).clamp(min=1.0)), -1e9
    )
    logits[~legal.any(-1)] = 0.0  # padding: uniform
    return logits


def illegal_logits(legal: Tensor, vocab: int) -> Tensor:
    logits = torch.zeros((*legal.shape[:2], vocab))
    logits[..., vocab - 1] = 1e9  # all mass on the last id: `|` or beyond the task's vocabulary
    return logits


@pytest.mark.parametrize("vocab", [20, 24])
def test_the_true_distribution_scores_perfectly(small, vocab):
    metrics = small.evaluate(lookup_model(small, vocab, true_logits), torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(100) and metrics["val_accuracy"] == pytest.approx(
        100
    )
    assert metrics["tvd"] == pytest.approx(0, abs=1e-4) and metrics["val_tvd"] == pytest.approx(
        0, abs=1e-4
    )
    assert 0 < metrics["val_loss"] < np.log(NUM_LETTERS)


@pytest.mark.parametrize("vocab", [20, 24])
def test_all_mass_on_an_illegal_token_scores_zero(small, vocab):
    metrics = small.evaluate(lookup_model(small, vocab, illegal_logits), torch.device("cpu"))
    assert metrics["accuracy"] == 0 and metrics["val_accuracy"] == 0
    # seq_icl's scale, Σ|p − q|: all mass off the legal letters is 1 + 1 = 200 %
    assert metrics["tvd"] == pytest.approx(200) and metrics["val_tvd"] == pytest.approx(200)
    assert metrics["val_loss"] > 1e8


def test_evaluation_overhead_is_small(small):
    # next-token logits from the current token
    model = nn.Embedding(small.vocab_size, small.vocab_size)
    started = time.perf_counter()
    metrics = small.evaluate(model, torch.device("cpu"))
    assert time.perf_counter() - started < 2  # 20 + 20 sequences of up to ~950 tokens
    assert 0 <= metrics["accuracy"] <= 100 and 0 <= metrics["tvd"] <= 200


def test_metric_positions_are_seq_icls_by_hand():
    """One sequence `a b | b` of the DFA 0 -a-> 1 -b-> 0, 0 -b-> 2 -a-> 0: inputs `a b |`.

    Accuracy counts the positions labelled with a letter (after `a`: `b`; after `|`: `b`), not the
    one labelled `|`; TVD counts all three: after `a` (state 1) legal {b}, after `b` (state 0)
    legal {a, b}, after `|` (start) legal {a, b}."""
    dfa = ((0, 1), (1, 2)), ((1, 0),), ((0, 0),)
    t = task(num_val=1, num_test=1)
    t.dfas["test"], t.tables["test"] = [dfa], DfaTable([dfa])
    t.eval_sequences["test"] = [(np.array([0, 1, SEP, 1]), np.array([1, 0, 0, 2]))]
    always_b = torch.zeros(1, 3, VOCAB_SIZE)
    always_b[..., 1] = 1e4  # the argmax is `b` everywhere, with probability ~1
    scores = t.score(
        LookupModel({np.array([[0, 1, SEP]]).tobytes(): always_b}), torch.device("cpu"), "test"
    )
    assert scores["accuracy"] == pytest.approx(100)  # `b` is legal at both lettered positions
    # L1 per position: state 1: |1 − 1| = 0; states 0: |1 − ½| + |0 − ½| = 1 (twice): mean 2/3
    assert scores["tvd"] == pytest.approx(100 * 2 / 3, abs=1e-3)


def test_a_memory_mosaics_model_evaluates():
    torch.manual_seed(0)
    model = MemoryMosaics(ModelConfig(n_layer=1, n_embd=32, n_head=2), VOCAB_SIZE).eval()
    metrics = task(num_val=3, num_test=3).evaluate(model, torch.device("cpu"))
    assert set(metrics) == {"accuracy", "tvd", "val_accuracy", "val_tvd", "val_loss"}
    assert 0 <= metrics["accuracy"] <= 100 and 0 < metrics["tvd"] < 200 and metrics["val_loss"] > 0


def test_diagnostic_inputs_are_the_first_test_inputs(small):
    inputs = small.diagnostic_inputs(3)[1.0]
    assert inputs.shape[0] == 3
    for row, (tokens, _) in enumerate(small.eval_sequences["test"][:3]):
        assert inputs[row, : len(tokens) - 1].tolist() == tokens[:-1].tolist()

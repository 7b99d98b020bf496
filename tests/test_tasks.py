"""The length-generalisation tasks: sequence layout, loss positions, determinism, exact match."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.config import LengthTaskConfig as TaskConfig
from mosaic_core.metrics import IGNORE_INDEX, exact_match, length_metric_name, parse_metric_name
from mosaic_core.tasks import build_task

BOS, SEP, EOS, PAD = 32, 33, 34, 35


def task(name: str = "sort", seed: int = 0, **overrides):
    return build_task(TaskConfig(name=name, **overrides), seed)


def pair(t, src: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(src), t.target(np.array(src))


@pytest.mark.parametrize(
    ("name", "target"),
    [("sort", [0, 0, 3, 7, 30]), ("reverse", [0, 3, 0, 30, 7]), ("copy", [7, 30, 0, 3, 0])],
)
def test_sequence_layout_and_loss_positions(name, target):
    src = np.array([7, 30, 0, 3, 0])
    t = task(name)
    assert t.vocab_size == 36 and (t.bos, t.sep, t.eos, t.pad) == (BOS, SEP, EOS, PAD)
    inputs, labels = t.make_batch([(src, t.target(src))])
    seq = [BOS, 7, 30, 0, 3, 0, SEP, *target, EOS]
    assert inputs[0].tolist() == seq[:-1]
    # scored exactly where the target and EOS are predicted: from the SEP position on
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + [*target, EOS]


def test_padding_is_never_scored():
    t = task()
    inputs, labels = t.make_batch([pair(t, [1, 2]), pair(t, [5, 4, 3, 2])])
    assert inputs.shape == labels.shape == (2, 10)
    assert inputs[0].tolist()[6:] == [PAD] * 4
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + [1, 2, EOS] + [IGNORE_INDEX] * 4
    assert (labels != IGNORE_INDEX).sum().item() == 3 + 5


def test_paper_figure_4_sort_example():
    src = np.array([30, 5, 12, 29, 7, 0, 19, 12, 8, 5, 21, 3, 14, 7, 0, 19, 8, 2, 12, 5, 21, 14, 3, 8, 0, 7, 19, 2, 12, 30])
    expected = [0, 0, 0, 2, 2, 3, 3, 5, 5, 5, 7, 7, 7, 8, 8, 8, 12, 12, 12, 12, 14, 14, 19, 19, 19, 21, 21, 29, 30, 30]
    assert task().target(src).tolist() == expected


def test_paper_figure_4_reverse_example():
    src = np.array([22, 16, 12, 2, 5, 26, 31, 6, 20, 3, 9, 14, 24, 4, 8, 1, 28, 0, 17, 4, 7, 28, 2, 20, 24, 24, 11, 16,
                    24, 14, 26, 2, 3, 31, 20, 22, 4, 16, 10, 20, 4, 8])
    expected = [8, 4, 20, 10, 16, 4, 22, 20, 31, 3, 2, 26, 14, 24, 16, 11, 24, 24, 20, 2, 28, 7, 4, 17, 0, 28, 1, 8, 4,
                24, 14, 9, 3, 20, 6, 31, 26, 5, 2, 12, 16, 22]
    assert task("reverse").target(src).tolist() == expected


def test_training_batches_are_deterministic_per_seed_and_index():
    a, b = task(seed=3), task(seed=3)
    assert torch.equal(a.train_batch(5, 8)[0], b.train_batch(5, 8)[0])
    assert not torch.equal(a.train_batch(5, 8)[0], a.train_batch(6, 8)[0])
    assert not torch.equal(a.train_batch(5, 8)[0], task(seed=4).train_batch(5, 8)[0])


def test_training_lengths_span_the_configured_range():
    t = task(train_min_length=32, train_max_length=64)
    lengths = set()
    for index in range(20):
        _, labels = t.train_batch(index, 64)
        lengths.update(((labels != IGNORE_INDEX).sum(-1) - 1).tolist())  # scored tokens = L + 1
    assert min(lengths) == 32 and max(lengths) == 64 and len(lengths) > 25


def test_test_sets_are_fixed_across_trial_seeds_and_disjoint_from_training():
    config = dict(eval_examples=50, eval_batch_size=20)
    first = [x for x, _ in task(seed=0, **config).test_batches(64)]
    second = [x for x, _ in task(seed=7, **config).test_batches(64)]
    assert [len(x) for x in first] == [20, 20, 10]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    test_rows = {tuple(row.tolist()) for x in first for row in x}
    train_rows = {tuple(row.tolist()) for i in range(50) for row in task(seed=0).train_batch(i, 32)[0] if len(row) == 130}
    assert not test_rows & train_rows


def test_eval_lengths_follow_the_factors():
    assert task(eval_length=64, eval_factors=[1, 1.5, 2, 64]).eval_lengths() == {1: 64, 1.5: 96, 2: 128, 64: 4096}


def test_exact_match_counts_only_scored_tokens():
    t = task()
    _, labels = t.make_batch([pair(t, [3, 1, 2]), pair(t, [2, 2, 0])])
    perfect = torch.nn.functional.one_hot(labels.clamp(min=0), 36).float()
    perfect[labels == IGNORE_INDEX] = 0  # garbage (all ties → argmax 0) where nothing is scored
    assert exact_match(perfect, labels).tolist() == [True, True]
    one_off = perfect.clone()
    scored = (labels[1] != IGNORE_INDEX).nonzero()[-1].item()  # the EOS prediction of example 1
    one_off[1, scored] = torch.nn.functional.one_hot(torch.tensor(5), 36).float()
    assert exact_match(one_off, labels).tolist() == [True, False]


def test_evaluate_reports_exact_match_per_factor_with_a_perfect_model():
    t = task(eval_length=6, eval_factors=[1, 2], eval_examples=30, eval_batch_size=16)

    class Oracle(torch.nn.Module):
        """Predicts the labels it reconstructs from the input: the target is a function of the source."""

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*idx.shape, 36)
            for row, seq in enumerate(idx.tolist()):
                length = seq.index(SEP) - 1
                target = t.target(np.array(seq[1 : length + 1])).tolist() + [EOS]
                for offset, token in enumerate(target):
                    logits[row, length + 1 + offset, token] = 1.0
            return logits

    assert t.evaluate(Oracle(), torch.device("cpu")) == {"exact_match_1x": 1.0, "exact_match_2x": 1.0}


def test_metric_names_round_trip():
    assert length_metric_name("exact_match", 1.5) == "exact_match_1.5x"
    assert parse_metric_name("exact_match_1.5x") == ("exact_match", 1.5)
    assert parse_metric_name("exact_match_64x") == ("exact_match", 64.0)
    assert parse_metric_name("train_loss") == ("train_loss", None)


def test_task_config_errors():
    with pytest.raises(ValueError, match="train_min_length"):
        TaskConfig(train_min_length=10, train_max_length=5)
    with pytest.raises(ValueError, match="eval_factors"):
        TaskConfig(eval_factors=[1, -2])
    with pytest.raises(ValueError):
        TaskConfig(name="sorting")


# ---------------------------------------------------------------------------------------------
# MQMTAR


def test_mqmtar_ids_and_paper_figure_4_layout():
    t = task("mqmtar")
    assert (t.vocab_size, t.bos, t.sep, t.eos, t.pad) == (263, 259, 260, 261, 262)
    src, trg = t.example(np.random.default_rng(0), 64)
    context, queries = src[:64], src[64:]
    slots = [context[i : i + 6].tolist() for i in range(0, 60, 6)]
    filled = [s for s in slots if s != [0] * 6]
    assert all(s[0] == 0 and s[3] == 1 and all(3 <= x <= 258 for x in (s[1], s[2], s[4], s[5])) for s in filled)
    assert context[60:].tolist() == [0] * 4  # 64 = 10 slots of 6, and 4 spaces
    assert queries[::3].tolist() == [2] * 4 and trg[::3].tolist() == [2] * 4
    inputs, labels = t.make_batch([(src, trg)])
    assert inputs[0, 0] == 259 and inputs[0, 1 + 64 + 12] == 260
    assert labels[0].tolist()[-13:] == [*trg.tolist(), 261]


@pytest.mark.parametrize("length", [32, 50, 64, 96, 128, 1024])
def test_mqmtar_invariants(length):
    rng = np.random.default_rng(length)
    for _ in range(20):
        src, trg = task("mqmtar").example(rng, length)
        context, queries = src[:length], src[length:]
        pairs = {}
        for i in range(0, length - 5, 6):
            if context[i + 3] == 1 and context[i] == 0 and context[i + 1] != 0:
                pairs[(context[i + 1], context[i + 2])] = (context[i + 4], context[i + 5])
        assert len(pairs) == int(length * 0.8 // 6)  # num_kv unique keys
        assert len(queries) == 12 and len(trg) == 12
        for q in range(4):
            key = (queries[3 * q + 1], queries[3 * q + 2])
            assert key in pairs  # every query asks for a key present in the context
            assert tuple(trg[3 * q + 1 : 3 * q + 3]) == pairs[key]  # and the target is its value
        assert len({(queries[3 * q + 1], queries[3 * q + 2]) for q in range(4)}) == 4


def test_mqmtar_needs_room_for_a_pair():
    with pytest.raises(ValueError, match="at least 8 tokens"):
        task("mqmtar").example(np.random.default_rng(0), 7)


def test_mqmtar_query_accuracy_counts_each_query():
    t = task("mqmtar", eval_length=40, eval_examples=3, eval_factors=[1])
    x, y = next(t.test_batches(40))
    logits = torch.nn.functional.one_hot(y.clamp(min=0), 263).float()
    first_scored = (y[1] != IGNORE_INDEX).nonzero()[0].item()
    logits[1, first_scored + 4, :] = 0
    logits[1, first_scored + 4, 5] = 1.0  # one wrong token in the second query of example 1
    from mosaic_core.tasks.length_generalization import query_accuracy
    assert query_accuracy(logits, y).view(3, 4).tolist() == [[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]]
    assert exact_match(logits, y).tolist() == [True, False, True]


def test_long_lengths_are_evaluated_in_smaller_batches():
    t = task("mqmtar", eval_examples=10, eval_batch_size=10, eval_max_tokens=1000)
    sizes = [len(x) for x, _ in t.test_batches(128)]
    assert sizes == [3, 3, 3, 1]  # 1000 // (2·128 + 2) = 3 examples per batch

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
    src = np.array(
        [
            30,
            5,
            12,
            29,
            7,
            0,
            19,
            12,
            8,
            5,
            21,
            3,
            14,
            7,
            0,
            19,
            8,
            2,
            12,
            5,
            21,
            14,
            3,
            8,
            0,
            7,
            19,
            2,
            12,
            30,
        ]
    )
    expected = [
        0,
        0,
        0,
        2,
        2,
        3,
        3,
        5,
        5,
        5,
        7,
        7,
        7,
        8,
        8,
        8,
        12,
        12,
        12,
        12,
        14,
        14,
        19,
        19,
        19,
        21,
        21,
        29,
        30,
        30,
    ]
    assert task().target(src).tolist() == expected


def test_paper_figure_4_reverse_example():
    src = np.array(
        [
            22,
            16,
            12,
            2,
            5,
            26,
            31,
            6,
            20,
            3,
            9,
            14,
            24,
            4,
            8,
            1,
            28,
            0,
            17,
            4,
            7,
            28,
            2,
            20,
            24,
            24,
            11,
            16,
            24,
            14,
            26,
            2,
            3,
            31,
            20,
            22,
            4,
            16,
            10,
            20,
            4,
            8,
        ]
    )
    expected = [
        8,
        4,
        20,
        10,
        16,
        4,
        22,
        20,
        31,
        3,
        2,
        26,
        14,
        24,
        16,
        11,
        24,
        24,
        20,
        2,
        28,
        7,
        4,
        17,
        0,
        28,
        1,
        8,
        4,
        24,
        14,
        9,
        3,
        20,
        6,
        31,
        26,
        5,
        2,
        12,
        16,
        22,
    ]
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
    train_rows = {
        tuple(row.tolist())
        for i in range(50)
        for row in task(seed=0).train_batch(i, 32)[0]
        if len(row) == 130
    }
    assert not test_rows & train_rows


def test_eval_lengths_follow_the_factors():
    assert task(eval_length=64, eval_factors=[1, 1.5, 2, 64]).eval_lengths() == {
        1: 64,
        1.5: 96,
        2: 128,
        64: 4096,
    }


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


class Oracle(torch.nn.Module):
    """Predicts every label it is shown, except EOS where `wrong_eos` says so."""

    def __init__(self, t, labels_of, wrong_eos: bool = False) -> None:
        super().__init__()
        self.t, self.labels_of, self.wrong_eos = t, labels_of, wrong_eos

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        labels = self.labels_of(idx)
        logits = torch.nn.functional.one_hot(labels.clamp(min=0), self.t.vocab_size).float()
        if self.wrong_eos:
            logits[labels == self.t.eos] = torch.nn.functional.one_hot(
                torch.tensor(self.t.bos), self.t.vocab_size
            ).float()
        return logits


def labels_from_inputs(t):
    """The labels of a test batch, found from its inputs (the test sets are fixed)."""

    def labels_of(idx: torch.Tensor) -> torch.Tensor:
        for length in t.eval_lengths().values():
            for x, y in t.test_batches(length):
                if x.shape == idx.shape and torch.equal(x, idx):
                    return y
        raise AssertionError("not a test batch")

    return labels_of


@pytest.mark.parametrize("name", ["sort", "reverse", "mqmtar"])
def test_exact_match_scores_the_answer_not_eos(name):
    """A model right on every answer token but wrong on EOS: exact match 1.0, the EOS-inclusive variant 0."""
    t = task(name, eval_length=16, eval_factors=[1, 2], eval_examples=5, eval_batch_size=5)
    metrics = t.evaluate(Oracle(t, labels_from_inputs(t), wrong_eos=True), torch.device("cpu"))
    assert metrics["exact_match_1x"] == metrics["exact_match_2x"] == 1.0
    assert metrics["exact_match_with_eos_1x"] == metrics["exact_match_with_eos_2x"] == 0.0
    perfect = t.evaluate(Oracle(t, labels_from_inputs(t)), torch.device("cpu"))
    assert perfect["exact_match_with_eos_2x"] == 1.0


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


def parse_mqmtar(
    tokens: list[int],
) -> tuple[dict[tuple[int, int], tuple[int, int]], list[tuple[int, int]]]:
    """An independent reading of an MQMTAR source: every `k1 k2 1 v1 v2` pair, and every `2 k1 k2` query."""
    pairs = {
        (tokens[i - 2], tokens[i - 1]): (tokens[i + 1], tokens[i + 2])
        for i, x in enumerate(tokens)
        if x == 1
    }
    queries = [(tokens[i + 1], tokens[i + 2]) for i, x in enumerate(tokens) if x == 2]
    return pairs, queries


def test_paper_figure_4_mqmtar_example_parses_into_four_queries_with_their_answers():
    shown = (
        "0 k_1 v_1 0 209 116 1 131 31 0 k_2 v_2 0 256 174 1 60 14 0 k_3 v_3 0 216 104 1 147 101 260 k_4 v_4 "
        "2 256 174 2 73 58 2 195 61 2 216 104"
    )
    targets = [2, 60, 14, 2, 106, 177, 2, 248, 216, 2, 147, 101]
    # the figure's k_i/v_i are colour labels
    tokens = [int(word) for word in shown.split() if word.isdigit()]
    pairs, queries = parse_mqmtar(tokens)
    assert queries == [(256, 174), (73, 58), (195, 61), (216, 104)]
    answers = [tuple(targets[3 * q + 1 : 3 * q + 3]) for q in range(4)]
    assert targets[::3] == [2] * 4
    # the figure elides the context of queries 2 and 3
    shown_keys = [q for q in queries if q in pairs]
    assert shown_keys == [(256, 174), (216, 104)]
    assert [pairs[q] for q in shown_keys] == [answers[0], answers[3]]


def test_mqmtar_ids_and_layout():
    t = task("mqmtar")
    assert (t.vocab_size, t.bos, t.sep, t.eos, t.pad) == (263, 259, 260, 261, 262)
    src, trg = t.example(np.random.default_rng(0), 64)
    inputs, labels = t.make_batch([(src, trg)])
    assert len(src) == 64 + 12 and inputs[0, 0] == 259 and inputs[0, 1 + 64 + 12] == 260
    assert labels[0].tolist()[-13:] == [*trg.tolist(), 261]
    answer = t.answer_mask(labels)[0]
    # the 8 value tokens
    assert labels[0][answer].tolist() == [x for i, x in enumerate(trg.tolist()) if i % 3]


@pytest.mark.parametrize(
    ("length", "context"),
    [(32, 32), (48, 48), (50, 48), (64, 64), (96, 96), (128, 119), (256, 238), (1024, 952)],
)
def test_mqmtar_as_vasylenko_et_al_generate_it(length, context):
    """num_kv = int(0.8·n // 6) pairs, each `k1 k2 1 v1 v2 0` in a segment of n // num_kv tokens;
    keys and values distinct within an example; queries drawn with replacement from the pairs."""
    t = task("mqmtar")
    rng = np.random.default_rng(length)
    num_kv, segment = int(length * 0.8 // 6), length // int(length * 0.8 // 6)
    repeated_queries = 0
    for _ in range(30):
        src, trg = t.example(rng, length)
        tokens = src.tolist()
        assert len(tokens) == context + 12 == num_kv * segment + 12
        pairs, queries = parse_mqmtar(tokens)
        # unique keys, unique values
        assert len(pairs) == num_kv and len(set(pairs.values())) == num_kv
        ones = [i for i, x in enumerate(tokens[:context]) if x == 1]
        assert all(tokens[i + 3] == 0 for i in ones)  # the space that closes each pair
        assert [i // segment for i in ones] == list(range(num_kv))  # one pair per segment
        assert set(tokens[:context]) - {0, 1} <= set(range(3, 259))
        assert len(queries) == 4 and trg[::3].tolist() == [2] * 4
        assert [pairs[q] for q in queries] == [tuple(trg[3 * i + 1 : 3 * i + 3]) for i in range(4)]
        repeated_queries += len(set(queries)) < 4
    assert length > 64 or repeated_queries > 0  # with replacement: a short context repeats a query


def test_mqmtar_splits_draw_their_own_vocabularies():
    t = task("mqmtar", eval_factors=[1, 2], eval_examples=50)
    words = {}
    for split, batches in (
        ("train", [t.train_batch(i, 50) for i in range(2)]),
        ("1x", list(t.test_batches(64))),
        ("2x", list(t.test_batches(128))),
    ):
        keys = set()
        for x, _ in batches:
            for row in x.tolist():
                keys |= set(parse_mqmtar(row)[0])
        words[split] = keys
    assert all(len(keys) > 200 for keys in words.values())
    for a, b in (
        ("train", "1x"),
        ("1x", "2x"),
    ):  # 10k of 65536 words each: overlaps of ~15 %, never all
        assert len(words[a] & words[b]) < 0.4 * len(words[b])
    train = task("mqmtar").train_vocabulary
    assert (
        len({tuple(k) for k in train.keys.tolist()})
        == 10_000
        == len({tuple(v) for v in train.values.tolist()})
    )


def test_mqmtar_needs_room_for_a_pair():
    with pytest.raises(ValueError, match="at least 8 tokens"):
        task("mqmtar").example(np.random.default_rng(0), 7)


def test_mqmtar_query_accuracy_counts_the_value_tokens_of_each_query():
    t = task("mqmtar", eval_length=40, eval_examples=3, eval_factors=[1])
    x, y = next(t.test_batches(40))
    logits = torch.nn.functional.one_hot(y.clamp(min=0), 263).float()
    first_scored = (y[1] != IGNORE_INDEX).nonzero()[0].item()
    logits[1, first_scored + 4, :] = 0
    logits[1, first_scored + 4, 5] = 1.0  # one wrong value token in the second query of example 1
    logits[2, first_scored + 6, :] = 0  # a wrong query marker in example 2: not an answer token
    logits[2, first_scored + 6, 5] = 1.0
    from mosaic_core.tasks.length_generalization import query_accuracy

    answer = t.answer_mask(y)
    assert query_accuracy(logits, y, answer).view(3, 4).tolist() == [
        [1, 1, 1, 1],
        [1, 0, 1, 1],
        [1, 1, 1, 1],
    ]
    assert exact_match(logits, y, answer).tolist() == [True, False, True]
    assert exact_match(logits, y).tolist() == [True, False, False]


def test_long_lengths_are_evaluated_in_smaller_batches():
    t = task("mqmtar", eval_examples=10, eval_batch_size=10, eval_max_tokens=1000)
    sizes = [len(x) for x, _ in t.test_batches(128)]
    assert sizes == [3, 3, 3, 1]  # 1000 // (2·128 + 2) = 3 examples per batch

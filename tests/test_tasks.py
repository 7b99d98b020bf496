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


@pytest.mark.parametrize(
    ("name", "target"),
    [("sort", [0, 0, 3, 7, 30]), ("reverse", [0, 3, 0, 30, 7]), ("copy", [7, 30, 0, 3, 0])],
)
def test_sequence_layout_and_loss_positions(name, target):
    src = np.array([7, 30, 0, 3, 0])
    t = task(name)
    assert t.vocab_size == 36 and (t.bos, t.sep, t.eos, t.pad) == (BOS, SEP, EOS, PAD)
    inputs, labels = t.make_batch([src])
    seq = [BOS, 7, 30, 0, 3, 0, SEP, *target, EOS]
    assert inputs[0].tolist() == seq[:-1]
    # scored exactly where the target and EOS are predicted: from the SEP position on
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + [*target, EOS]


def test_padding_is_never_scored():
    t = task()
    inputs, labels = t.make_batch([np.array([1, 2]), np.array([5, 4, 3, 2])])
    assert inputs.shape == labels.shape == (2, 10)
    assert inputs[0].tolist()[6:] == [PAD] * 4
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + [1, 2, EOS] + [IGNORE_INDEX] * 4
    assert (labels != IGNORE_INDEX).sum().item() == 3 + 5


def test_paper_figure_4_sort_example():
    src = np.array([30, 5, 12, 29, 7, 0, 19, 12, 8, 5, 21, 3, 14, 7, 0, 19, 8, 2, 12, 5, 21, 14, 3, 8, 0, 7, 19, 2, 12, 30])
    expected = [0, 0, 0, 2, 2, 3, 3, 5, 5, 5, 7, 7, 7, 8, 8, 8, 12, 12, 12, 12, 14, 14, 19, 19, 19, 21, 21, 29, 30, 30]
    assert task().target(src).tolist() == expected


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
    _, labels = t.make_batch([np.array([3, 1, 2]), np.array([2, 2, 0])])
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

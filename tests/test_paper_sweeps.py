"""The paper's sweeps as shipped: trial counts, conditional kernel parameters, the paper's settings."""

from __future__ import annotations

from collections import Counter

import pytest

from search_spaces import bundled_sweeps
from search_spaces.expand import load_sweep

TABLE_2_LABELS = [
    "Gaussian",
    "Gaussian kNN, k = 16",
    "Gaussian kNN, k = 32",
    "Uniform kNN, k = 16",
    "Uniform kNN, k = 32",
    "Epanechnikov (normReLU)",
    "Epanechnikov (ReLUmax)",
    "Epanechnikov (sparsemax)",
    "Biweight",
    "Triweight",
]


@pytest.mark.parametrize(
    ("name", "trials"),
    [
        ("smoke", 6),
        ("length_generalization", 90),
        ("length_generalization_smoke", 12),
        ("regbench", 48),
        ("regbench_smoke", 6),
        ("babistories", 24),
        ("babistories_smoke", 6),
        ("search_smoke", 8),
        ("paper_check", 6),
    ],
)
def test_every_bundled_sweep_expands_to_its_trial_count(name, trials):
    assert load_sweep(bundled_sweeps()[name]).num_trials == trials


@pytest.mark.parametrize("name", sorted(bundled_sweeps()))
def test_kernel_parameters_never_multiply_across_kernels(name):
    for trial in load_sweep(bundled_sweeps()[name]).trials:
        params = set(trial.config.model.kernel_params)
        expected = {
            "softmax": set(),
            "sparsemax": set(),
            "entmax": {"alpha"},
            "normrelu": {"gamma", "b"},
            "relumax": {"b"},
            "topk_softmax": {"k"},
            "topk_uniform": {"k"},
        }[trial.config.model.kernel]
        assert params == expected, (name, trial.describe())


def test_length_generalization_is_table_2():
    sweep = load_sweep(bundled_sweeps()["length_generalization"])
    assert sweep.kernel_labels == TABLE_2_LABELS
    assert sweep.planned_seeds == 3
    by_task = {t.config.task.name: t.config for t in sweep.trials}
    assert {task: (c.model.n_layer, c.task.eval_factors) for task, c in by_task.items()} == {
        "mqmtar": (4, [1, 2, 4, 8, 16, 32, 64]),
        "reverse": (4, [1, 1.5]),
        "sort": (2, [1, 2, 4]),
    }
    assert all(
        (c.model.n_embd, c.model.n_head, c.train.lr, c.train.weight_decay, c.train.batch_size)
        == (512, 8, 1e-3, 0.1, 256)
        for c in by_task.values()
    )
    assert Counter(t.config.task.name for t in sweep.trials) == {
        "mqmtar": 30,
        "reverse": 30,
        "sort": 30,
    }
    # what Table 6 omits, from the code's defaults (train_memory_mosaics_synthetic_epoch.py)
    assert all(
        (c.train.warmup_steps, c.train.lr_decay_steps, c.train.min_lr, c.model.pmem_size)
        == (40000, 156250, 5e-5, 2688)
        for c in by_task.values()
    )
    assert all(
        (c.model.dropout, c.model.attn_dropout, c.model.contextual_attn_dropout)
        == (0.05, 0.05, False)
        for c in by_task.values()
    )


def test_regbench_is_table_1():
    sweep = load_sweep(bundled_sweeps()["regbench"])
    sizes = sorted({t.config.task.num_examples for t in sweep.trials})
    assert sizes == [1000, 2500, 5000, 10000, 20000, 40000]
    assert {t.config.model.kernel_params.get("k") for t in sweep.trials} == {None, 16}
    c = sweep.trials[0].config
    assert (c.model.n_embd, c.model.n_head, c.model.n_layer, c.train.lr, c.train.weight_decay) == (
        128,
        8,
        2,
        1e-4,
        0.01,
    )
    assert (c.model.dropout, c.model.attn_dropout, c.model.contextual_attn_dropout) == (
        0.05,
        0.05,
        True,
    )
    # seq_icl's optimiser, precision, DFA sampler and split sizes
    assert (c.train.adam_betas, c.train.weight_decay_on, c.train.precision) == (
        (0.9, 0.999),
        "all",
        "fp32",
    )
    assert (c.task.dfa_filter, c.task.num_val, c.task.num_test) == ("seq_icl", 250, 250)
    for (
        trial
    ) in sweep.trials:  # 200 epochs of ⌈n / 32⌉ steps, 20 of them warmup, an evaluation per epoch
        train, per_epoch = trial.config.train, -(-trial.config.task.num_examples // 32)
        assert (train.max_steps, train.warmup_steps, train.eval_interval) == (
            200 * per_epoch,
            20 * per_epoch,
            per_epoch,
        )


def test_babistories_is_figure_2():
    sweep = load_sweep(bundled_sweeps()["babistories"])
    by_depth = {t.config.model.n_layer: t.config.train for t in sweep.trials}
    assert {depth: (train.lr, train.min_lr) for depth, train in by_depth.items()} == {
        1: (5e-3, 1e-4),
        8: (5e-3, 1e-4),
        12: (1e-3, 5e-5),
    }
    train = by_depth[1]
    assert (train.max_steps, train.batch_size * train.grad_accum_steps, train.warmup_steps) == (
        80000,
        512,
        2000,
    )
    model = sweep.trials[0].config.model
    assert (model.pmem_size, model.dropout, model.attn_dropout, model.contextual_attn_dropout) == (
        2688,
        0.05,
        0.05,
        False,
    )
    task = sweep.trials[0].config.task
    assert task.context == 512 and task.eval_batches * task.eval_batch_size == 5120
    kernels = {(t.config.model.kernel, t.config.model.kernel_params.get("k")) for t in sweep.trials}
    assert ("topk_uniform", 32) in kernels and (
        "topk_softmax",
        32,
    ) in kernels  # Figure 2's kNN curves


def test_the_paper_check_trains_table_2s_sort_model_and_task():
    """The ten-minute check differs from the paper's sort sweep only in its budget: the same
    model and task for each of its kernels, and the paper's 1 000 test sequences at 1×, 2×, 4×."""
    paper = {
        (t.config.model.kernel, t.config.seed): t.config
        for t in load_sweep(bundled_sweeps()["length_generalization"]).trials
        if t.config.task.name == "sort"
    }
    check = load_sweep(bundled_sweeps()["paper_check"])
    assert check.kernel_labels == ["Gaussian", "Epanechnikov (sparsemax)", "Triweight"]
    assert check.planned_seeds == 2
    for trial in check.trials:
        same = paper[(trial.config.model.kernel, trial.config.seed)]
        assert trial.config.model == same.model
        assert trial.config.task == same.task
        assert trial.config.train.batch_size == same.train.batch_size
        assert trial.config.train.max_steps < same.train.max_steps / 50

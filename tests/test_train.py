"""One trial: schedule, reporting, gradient accumulation, failure on a non-finite loss, learning."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_core import train as train_module
from mosaic_core.config import TrainConfig, TrialConfig
from mosaic_core.model import MemoryMosaics
from mosaic_core.train import learning_rate, train_trial


def tiny_config(**train) -> dict:
    return {
        "seed": 0,
        "task": {"name": "sort", "num_symbols": 4, "train_min_length": 2, "train_max_length": 3,
                 "eval_length": 3, "eval_factors": [1, 2], "eval_examples": 40},
        "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "kernel": "sparsemax"},
        "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 4,
                  "eval_interval": 10, **train},
    }


def test_learning_rate_warmup_then_cosine_to_min_lr():
    config = TrainConfig(max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(60, config) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert learning_rate(110, config) == pytest.approx(0.1)


def test_reports_every_eval_interval_with_metrics():
    reports = []
    final = train_trial(tiny_config(), report=lambda metrics, checkpoint: reports.append((metrics, checkpoint)))
    assert [m["step"] for m, _ in reports] == [10, 20]
    assert final == reports[-1][0]
    for metrics, checkpoint in reports:
        assert checkpoint is None
        assert {"train_loss", "lr", "exact_match_1x", "exact_match_2x"} <= set(metrics)
        assert 0 <= metrics["exact_match_2x"] <= 1


def test_same_seed_same_trial_and_other_seed_differs():
    a = train_trial(tiny_config())
    b = train_trial(tiny_config())
    c = train_trial({**tiny_config(), "seed": 1})
    assert a["train_loss"] == b["train_loss"]
    assert a["train_loss"] != c["train_loss"]


def test_gradient_accumulation_draws_a_fresh_micro_batch_each_micro_step(monkeypatch):
    seen = []
    original = train_module.build_task

    def recording_task(config, seed):
        task = original(config, seed)
        draw = task.train_batch
        task.train_batch = lambda index, size: (seen.append(index), draw(index, size))[1]
        return task

    monkeypatch.setattr(train_module, "build_task", recording_task)
    train_trial(tiny_config(max_steps=3, grad_accum_steps=4, eval_interval=3))
    assert seen == list(range(12))


def test_non_finite_loss_stops_the_trial_naming_the_step(monkeypatch):
    forward = MemoryMosaics.forward
    calls = {"n": 0}

    def poisoned(self, idx):
        calls["n"] += 1
        logits = forward(self, idx)
        return logits * math.nan if calls["n"] == 3 else logits

    monkeypatch.setattr(MemoryMosaics, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 3"):
        train_trial(tiny_config())


def test_a_trial_learns_the_task():
    config = tiny_config(max_steps=300, eval_interval=300, lr=1e-2, min_lr=1e-3, warmup_steps=10)
    config["model"]["n_layer"] = 2
    reports = []
    train_trial(config, report=lambda metrics, _: reports.append(metrics))
    assert reports[-1]["exact_match_1x"] > 0.5
    assert reports[-1]["train_loss"] < 0.5


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="Extra inputs"):
        TrialConfig.model_validate({"train": {"max_step": 3}})
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trial_runs_on_cuda_in_bf16():
    metrics = train_trial(tiny_config(device="cuda"))
    assert math.isfinite(metrics["train_loss"])

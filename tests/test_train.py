"""One trial: schedule, reporting, gradient accumulation, failure on a non-finite loss, learning."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from mosaic_core import train as train_module
from mosaic_core.checkpoint import CheckpointError
from mosaic_core.config import TrainConfig, TrialConfig
from mosaic_core.model import MemoryMosaics
from mosaic_core.train import TIMING_METRICS, learning_rate, train_trial, with_selection


def tiny_config(**train) -> dict:
    return {
        "seed": 0,
        "task": {
            "name": "sort",
            "num_symbols": 4,
            "train_min_length": 2,
            "train_max_length": 3,
            "eval_length": 3,
            "eval_factors": [1, 2],
            "eval_examples": 40,
        },
        "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "kernel": "sparsemax"},
        "train": {
            "max_steps": 20,
            "batch_size": 16,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 4,
            "eval_interval": 10,
            **train,
        },
    }


def test_learning_rate_warmup_then_cosine_to_min_lr():
    config = TrainConfig(max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(60, config) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert learning_rate(110, config) == pytest.approx(0.1)


def test_cosine_reaches_min_lr_at_lr_decay_steps_and_stays_there():
    """The reference's schedule for the synthetic tasks: decay over 156 250 steps whatever the run's length."""
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=300, lr_decay_steps=110)
    assert learning_rate(60, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(110, config) == learning_rate(250, config) == pytest.approx(0.1)
    short = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=60, lr_decay_steps=110)
    assert learning_rate(59, short) > 0.5  # a run shorter than the horizon never reaches min_lr


def test_model_selection_reports_the_evaluation_with_the_lowest_validation_loss():
    """Hand-made evaluations: val_loss 2.0, 1.5, 1.7, 1.2 → the selected accuracy is 93 (step 20), then 95 (step 40)."""
    evaluations = [
        (10, {"accuracy": 90.0, "val_loss": 2.0}),
        (20, {"accuracy": 93.0, "val_loss": 1.5}),
        (30, {"accuracy": 96.0, "val_loss": 1.7}),
        (40, {"accuracy": 95.0, "val_loss": 1.2}),
    ]
    previous, selected = {}, []
    for step, evaluated in evaluations:
        previous = with_selection(evaluated, step, previous, ("val_loss", "min"))
        selected.append(
            (previous["best_accuracy"], previous["best_val_loss"], previous["best_step"])
        )
        assert previous["accuracy"] == evaluated["accuracy"]  # the current values stay reported
    assert selected == [(90.0, 2.0, 10), (93.0, 1.5, 20), (93.0, 1.5, 20), (95.0, 1.2, 40)]
    assert with_selection({"accuracy": 1.0}, 5, {}, None) == {"accuracy": 1.0}  # no rule, no best_


def test_a_regbench_trial_reports_its_selected_evaluation():
    config = {
        "seed": 0,
        "task": {"name": "regbench", "num_examples": 16, "num_val": 4, "num_test": 4},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "train": {
            "max_epochs": 3,
            "batch_size": 8,
            "eval_interval": 2,
            "warmup_steps": 0,
            "device": "cpu",
        },
    }
    reports = []
    train_trial(config, lambda metrics, _: reports.append(metrics))
    assert [m["step"] for m in reports] == [2, 4, 6]
    chosen = min(reports, key=lambda m: m["val_loss"])
    assert (
        reports[-1]["best_accuracy"] == chosen["accuracy"]
        and reports[-1]["best_step"] == chosen["step"]
    )


def test_reports_every_eval_interval_with_metrics_and_a_checkpoint():
    reports = []

    def report(metrics, checkpoint_dir):
        saved = torch.load(Path(checkpoint_dir) / "checkpoint.pt", weights_only=True)
        reports.append((metrics, saved["step"], checkpoint_dir))

    final = train_trial(tiny_config(), report=report)
    assert [(m["step"], step) for m, step, _ in reports] == [(10, 10), (20, 20)]
    assert final == reports[-1][0]
    for metrics, _, checkpoint_dir in reports:
        assert {"train_loss", "lr", "exact_match_1x", "exact_match_2x"} <= set(metrics)
        assert 0 <= metrics["exact_match_2x"] <= 1
        assert not Path(
            checkpoint_dir
        ).exists()  # a temporary directory, valid during the call only


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


def run_keeping_checkpoints(config: dict, keep: Path, **kwargs) -> list[dict]:
    """Train, copying each reported checkpoint to keep/step-N; returns the reported metrics."""
    reports = []

    def report(metrics, checkpoint_dir):
        reports.append(metrics)
        shutil.copytree(checkpoint_dir, keep / f"step-{int(metrics['step'])}")

    train_trial(config, report=report, **kwargs)
    return reports


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    config = tiny_config(max_steps=30, eval_interval=10)
    config["model"]["dropout"] = 0.1  # the RNG state must be restored too
    uninterrupted = run_keeping_checkpoints(config, tmp_path / "a")
    resumed = run_keeping_checkpoints(
        config, tmp_path / "b", resume_from=tmp_path / "a" / "step-10"
    )
    assert [m["step"] for m in resumed] == [20, 30]
    for got, want in zip(resumed, uninterrupted[1:]):
        assert {k: v for k, v in got.items() if k not in TIMING_METRICS} == {
            k: v for k, v in want.items() if k not in TIMING_METRICS
        }


def lrs_by_step(config: dict, **kwargs) -> dict[int, float]:
    """The lr of every step a run trains (reported at each step: log_interval 1)."""
    reports = []
    train_trial(config, report=lambda metrics, _: reports.append(metrics), **kwargs)
    return {int(m["step"]): m["lr"] for m in reports}


def test_an_extended_run_keeps_its_schedule_and_then_holds_min_lr(tmp_path):
    """The issue's 200-step run resumed to 400 went lr 3e-4 → 8.2e-4: it must stay at min_lr."""
    run_keeping_checkpoints(tiny_config(max_steps=20), tmp_path / "a")
    extended = lrs_by_step(
        tiny_config(max_steps=40, log_interval=1), resume_from=tmp_path / "a" / "step-20"
    )
    assert sorted(extended) == list(range(21, 41))
    assert all(lr == pytest.approx(3e-4, rel=1e-12) for lr in extended.values())
    # extended once more, from the extended run's checkpoint: the first plan still holds
    run_keeping_checkpoints(
        tiny_config(max_steps=40), tmp_path / "b", resume_from=tmp_path / "a" / "step-20"
    )
    again = lrs_by_step(
        tiny_config(max_steps=60, log_interval=1), resume_from=tmp_path / "b" / "step-40"
    )
    assert max(again.values()) == pytest.approx(3e-4, rel=1e-12)


def test_replan_follows_the_new_schedule_from_the_checkpoint(tmp_path):
    run_keeping_checkpoints(tiny_config(max_steps=20), tmp_path)
    longer = tiny_config(max_steps=40, log_interval=1)
    replanned = lrs_by_step(longer, resume_from=tmp_path / "step-20", replan=True)
    schedule = TrainConfig.model_validate(longer["train"])
    assert replanned == pytest.approx(
        {step: learning_rate(step - 1, schedule) for step in replanned}
    )
    # halfway through a 40-step cosine from 3e-3 (warm-up 4) the lr is well above min_lr
    assert replanned[21] == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * 16 / 36)) * 27e-4)


def test_resuming_a_finished_trial_returns_its_last_metrics_without_training(tmp_path):
    config = tiny_config()
    runs = run_keeping_checkpoints(config, tmp_path)
    assert train_trial(config, resume_from=tmp_path / "step-20") == runs[-1]


def test_corrupt_missing_or_foreign_checkpoints_are_clear_errors(tmp_path):
    config = tiny_config()
    run_keeping_checkpoints(config, tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint.pt in"):
        train_trial(config, resume_from=tmp_path / "nowhere")
    other = {**config, "model": {**config["model"], "n_embd": 64}}
    with pytest.raises(
        CheckpointError, match="belongs to another trial: model.n_embd is 32 there, 64 here"
    ):
        train_trial(other, resume_from=tmp_path / "step-10")
    with pytest.raises(CheckpointError, match="belongs to another trial: seed is 0 there, 1 here"):
        train_trial({**config, "seed": 1}, resume_from=tmp_path / "step-10")
    broken = tmp_path / "step-10" / "checkpoint.pt"
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="is unreadable"):
        train_trial(config, resume_from=tmp_path / "step-10")


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


def test_compile_auto_is_eager_on_the_cpu_and_explicit_settings_win():
    model = torch.nn.Linear(2, 2)
    cpu = torch.device("cpu")
    assert train_module.compiled_forward(model, TrainConfig(), cpu) is model
    assert train_module.compiled_forward(model, TrainConfig(compile=False), cpu) is model
    assert train_module.compiled_forward(model, TrainConfig(compile=True), cpu) is not model
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="sometimes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["softmax", "sparsemax"])
def test_the_compiled_model_trains_like_the_eager_one_on_cuda(kernel):
    """Same seed, no dropout: 20 steps' losses agree to bf16 rounding, compiled or not."""
    losses = {}
    for compile_ in (False, True):
        config = tiny_config(device="cuda", compile=compile_, max_steps=20, eval_interval=20)
        config["model"].update(kernel=kernel, n_embd=64, dropout=0.0, attn_dropout=0.0)
        seen = []
        train_trial(config, on_step=lambda step, loss: seen.append(loss))
        losses[compile_] = torch.tensor(seen)
    assert len(losses[True]) == 20
    assert torch.allclose(losses[True], losses[False], rtol=2e-2, atol=2e-2)


def test_optimizer_betas_and_decay_follow_the_train_settings():
    model = MemoryMosaics(TrialConfig().model, vocab_size=11)
    cpu = torch.device("cpu")
    default = train_module.build_optimizer(model, TrainConfig(weight_decay=0.1), cpu)
    decayed, kept = default.param_groups
    assert decayed["betas"] == (0.9, 0.95) and kept["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in kept["params"])
    seq_icl = TrainConfig(weight_decay=0.01, adam_betas=(0.9, 0.999), weight_decay_on="all")
    (group,) = train_module.build_optimizer(model, seq_icl, cpu).param_groups
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.01
    assert len(group["params"]) == len(list(model.parameters()))
    assert any(p is model.blocks[0].contextual.kernel_beta for p in group["params"])


def test_fp32_precision_turns_autocast_off_on_cuda():
    cuda = torch.device("cuda")
    assert train_module.autocast(TrainConfig(precision="fp32"), cuda)._enabled is False
    assert train_module.autocast(TrainConfig(), torch.device("cpu"))._enabled is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_regbench_steps_compute_in_float32_on_cuda():
    seen = []
    model = MemoryMosaics(TrialConfig().model, vocab_size=11).cuda()
    projection = model.blocks[0].contextual.value
    projection.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for precision in ("fp32", "bf16"):
        with train_module.autocast(TrainConfig(precision=precision), torch.device("cuda")):
            model(torch.randint(0, 11, (2, 8), device="cuda"))
    assert seen == [torch.float32, torch.bfloat16]

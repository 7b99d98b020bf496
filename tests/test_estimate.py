"""`--dry-run --estimate`: the cost of a sweep before it runs, checked by hand-computed arithmetic
and on the steps and evaluations a real trial makes (never on wall-clock time)."""

from __future__ import annotations

import subprocess

import pytest

from mosaic_core.config import TrialConfig
from mosaic_core.tasks import build_task
from mosaic_core.train import train_trial
from orchestrator import estimate as estimate_module
from orchestrator.estimate import (
    BF16_PEAK_FLOPS,
    SWEEP_OVERHEAD_S,
    TRIAL_OVERHEAD_S,
    ShapeCost,
    SweepCost,
    benchmarked_cost,
    distinct_shapes,
    estimate,
    evaluations,
    flops_per_token,
    measured_cost,
    packing_gain,
)
from search_spaces.expand import load_sweep

from helpers import mosaic_sweep_command, tiny_trial


def tiny_sweep(smoke_spec, write_sweep, **resources):
    spec = {**smoke_spec, "name": "tiny_estimate"}
    spec["base"]["train"].update(max_steps=40, eval_interval=20)
    spec["resources"] = {**spec.get("resources", {}), **resources}
    return write_sweep(spec, "tiny_estimate")


def model_row(kernel="softmax", mfu=0.1, config="synthetic L=2 N=131", date="2026-12-07"):
    return {"model": f"MM {kernel}", "config": config, "mfu": mfu, "device": "H100", "date": date}


def packing_row(trials, total, kernel="softmax", config="sort L=2"):
    return {
        "model": f"MM {kernel}",
        "config": config,
        "trials": trials,
        "tokens_per_s_total": total,
    }


def test_wall_time_packs_the_longest_trials_first():
    cost = SweepCost(
        [ShapeCost("a", 3, 10, 60.0, "x"), ShapeCost("b", 1, 10, 100.0, "x")],
        at_once=2,
        device="here",
    )
    assert cost.trial_hours == pytest.approx(280 / 3600)
    # 100 | 60 + 60, then 60 → 160 in one slot
    assert cost.wall_seconds == pytest.approx(160 + SWEEP_OVERHEAD_S)


def test_gpu_hours_count_each_trial_at_its_share_of_a_gpu():
    cost = SweepCost([ShapeCost("a", 4, 10, 100.0, "x", gpu_share=0.25)], at_once=4, device="H100")
    assert cost.gpu_hours == pytest.approx(100 / 3600)  # four trials together hold one GPU 100 s
    assert cost.wall_seconds == pytest.approx(100 + SWEEP_OVERHEAD_S)


def test_distinct_shapes_fold_seeds(smoke_spec, write_sweep):
    sweep = load_sweep(tiny_sweep(smoke_spec, write_sweep))
    shapes = distinct_shapes(sweep)
    assert len(sweep.trials) == 6 and [n for _, n, _ in shapes] == [2, 2, 2]  # 3 kernels × 2 seeds


def test_a_trial_alone_is_priced_at_its_kernels_mfu(smoke_spec, write_sweep):
    """At MFU m, a trial of F FLOPs per token and T tokens takes T·F / (m · peak) seconds."""
    config, n, label = distinct_shapes(load_sweep(tiny_sweep(smoke_spec, write_sweep)))[0]
    cost = benchmarked_cost(config, n, label, [model_row(config.model.kernel)], [], per_gpu=1)
    context = round(cost.tokens / config.train.max_steps / config.train.batch_size)
    flops = flops_per_token(config, build_task(config.task, 0).vocab_size, context)
    assert cost.seconds == pytest.approx(
        cost.tokens * flops / (0.1 * BF16_PEAK_FLOPS) + TRIAL_OVERHEAD_S, rel=1e-9
    )
    assert cost.gpu_share == 1.0 and "2026-12-07" in cost.source


def test_the_newest_row_of_the_same_kernel_prices_and_a_missing_kernel_takes_the_slowest(
    smoke_spec, write_sweep
):
    config, n, label = distinct_shapes(load_sweep(tiny_sweep(smoke_spec, write_sweep)))[0]
    newest_first = [model_row(mfu=0.2, date="2026-12-07"), model_row(mfu=0.05, date="2026-11-22")]
    fresh = benchmarked_cost(config, n, label, newest_first, [], per_gpu=1)
    assert "MFU 0.200" in fresh.source
    slower = [model_row("relumax", 0.05), model_row("sparsemax", 0.02)]
    fallback = benchmarked_cost(config, n, label, slower, [], per_gpu=1)
    assert "no row for softmax" in fallback.source and "MFU 0.020" in fallback.source
    overhead = TRIAL_OVERHEAD_S
    assert fallback.seconds - overhead == pytest.approx((fresh.seconds - overhead) * 0.2 / 0.02)
    with pytest.raises(ValueError, match="no Memory Mosaics benchmark row for synthetic shapes"):
        benchmarked_cost(config, n, label, [model_row(config="LM L=8")], [], per_gpu=1)


def test_packed_trials_are_priced_at_the_measured_packing_gain(smoke_spec, write_sweep):
    """Four trials on one GPU measured at 3× one trial's throughput: each takes 4/3 as long as
    alone and holds a quarter of the GPU, so the sweep costs a third fewer GPU-hours."""
    config, n, label = distinct_shapes(load_sweep(tiny_sweep(smoke_spec, write_sweep)))[0]
    rows = [model_row()]
    packing = [packing_row(1, 1000.0), packing_row(2, 1800.0), packing_row(4, 3000.0)]
    assert packing_gain(config, 4, packing)[0] == pytest.approx(3.0)
    assert packing_gain(config, 3, packing)[0] == pytest.approx(1.8)  # the largest measured ≤ 3
    alone = benchmarked_cost(config, n, label, rows, packing, per_gpu=1)
    packed = benchmarked_cost(config, n, label, rows, packing, per_gpu=4)
    work = alone.seconds - TRIAL_OVERHEAD_S
    assert packed.seconds - TRIAL_OVERHEAD_S == pytest.approx(work * 4 / 3)
    assert packed.gpu_share == 0.25
    assert packed.seconds * packed.gpu_share < alone.seconds * alone.gpu_share


def test_an_estimate_for_a_gpu_honours_the_trials_that_run_at_once(
    smoke_spec, write_sweep, monkeypatch
):
    figures = {"model": [model_row(k) for k in ("softmax", "sparsemax", "entmax")],
               "packing": [packing_row(1, 1000.0), packing_row(2, 1900.0), packing_row(4, 3200.0)]}  # fmt: skip
    monkeypatch.setattr(
        estimate_module, "benchmark_rows", lambda gpu, kind="model", required=True: figures[kind]
    )
    sweep = load_sweep(tiny_sweep(smoke_spec, write_sweep, gpu=0.25))
    four, two = estimate(sweep, 4, "h100"), estimate(sweep, 2, "h100")
    assert "4 per GPU at 3.20×" in four.packing and "2 per GPU at 1.90×" in two.packing
    assert four.wall_seconds < two.wall_seconds
    assert four.gpu_hours == pytest.approx(
        sum(s.trials * (s.seconds - TRIAL_OVERHEAD_S) / 4 for s in four.shapes) / 3600
        + 6 * TRIAL_OVERHEAD_S / 4 / 3600
    )


def test_unknown_gpu_figures_name_what_was_measured():
    with pytest.raises(ValueError, match=r"no model benchmark figures for --gpu-type 'a100'"):
        estimate_module.benchmark_rows("a100")
    assert estimate_module.benchmark_rows("a100", "packing", required=False) == []


def test_max_concurrent_changes_the_wall_time_of_a_gpu_estimate(tmp_path):
    """Through the command line: the bundled paper check (eight trials per GPU) priced from the
    shipped H200 figures with 1 and 2 trials at once (on a machine without that GPU: one of them)."""

    def wall(max_concurrent: str) -> str:
        command = mosaic_sweep_command(
            *("run", "paper_check", "--dry-run", "--gpu-type", "h200"),
            *("--max-concurrent", max_concurrent, "--out", tmp_path / "x"),
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return next(line for line in done.stdout.splitlines() if line.startswith("estimate on"))

    one, two = wall("1"), wall("2")
    assert "at 1 trial(s) at a time" in one and "at 2 trial(s) at a time" in two
    assert one.split("wall time")[1] != two.split("wall time")[1]


def test_a_measured_trial_costs_its_steps_evaluations_and_overhead(monkeypatch):
    """On step counts a real trial has: 7 steps evaluated every 3 evaluate at steps 3, 6 and 7, so
    at 0.5 s a step, 2 s an evaluation and 100 tokens a step the trial costs 7 × 0.5 + 3 × 2 + the
    overhead, and trains 700 tokens."""
    config = TrialConfig.model_validate(tiny_trial(max_steps=7, eval_interval=3, log_interval=0))
    evaluated = []
    train_trial(config, report=lambda metrics, checkpoint: evaluated.append(metrics["step"]))
    assert evaluated == [3, 6, 7] and evaluations(config) == len(evaluated)

    monkeypatch.setattr(estimate_module, "measure_shape", lambda config: (0.5, 2.0, 100.0))
    cost = measured_cost(config, 4, "tiny")
    assert cost.seconds == pytest.approx(7 * 0.5 + 3 * 2.0 + TRIAL_OVERHEAD_S)
    assert (cost.tokens, cost.trials) == (700, 4)

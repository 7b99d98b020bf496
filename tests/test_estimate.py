"""`--dry-run --estimate`: the cost of a sweep before it runs, checked against a real run."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from orchestrator.estimate import (
    SWEEP_OVERHEAD_S,
    ShapeCost,
    SweepCost,
    benchmarked_cost,
    distinct_shapes,
    estimate,
)
from search_spaces.schema import load_sweep


def tiny_sweep(smoke_spec, write_sweep):
    spec = {**smoke_spec, "name": "tiny_estimate"}
    spec["base"]["train"].update(max_steps=40, eval_interval=20)
    return write_sweep(spec, "tiny_estimate")


def test_wall_time_packs_the_longest_trials_first():
    cost = SweepCost(
        [ShapeCost("a", 3, 10, 60.0, "x"), ShapeCost("b", 1, 10, 100.0, "x")],
        at_once=2,
        device="here",
    )
    assert cost.trial_hours == pytest.approx(280 / 3600)
    assert cost.wall_seconds == pytest.approx(
        160 + SWEEP_OVERHEAD_S
    )  # 100 | 60 + 60, then 60 → 160 in one slot


def test_distinct_shapes_fold_seeds(smoke_spec, write_sweep):
    sweep = load_sweep(tiny_sweep(smoke_spec, write_sweep))
    shapes = distinct_shapes(sweep)
    assert len(sweep.trials) == 6 and [n for _, n, _ in shapes] == [2, 2, 2]  # 3 kernels × 2 seeds


def test_a_gpu_type_prices_trials_from_the_benchmark_figures(tmp_path, smoke_spec, write_sweep):
    """At MFU m, a trial of F FLOPs per token and T tokens takes T·F / (m · peak) seconds."""
    config, n, label = distinct_shapes(load_sweep(tiny_sweep(smoke_spec, write_sweep)))[0]
    rows = [
        {
            "model": f"MM {config.model.kernel}",
            "config": "synthetic L=2",
            "mfu": 0.1,
            "device": "H200",
        }
    ]
    cost = benchmarked_cost(config, n, label, rows)
    assert cost.tokens > 0 and 1.0 < cost.seconds < 1.1  # tiny: ~the per-trial overhead
    slower = [
        {**rows[0], "model": "MM relumax", "mfu": 0.05},
        {**rows[0], "model": "MM sparsemax", "mfu": 0.02},
    ]
    fallback = benchmarked_cost(
        config, n, label, slower
    )  # no softmax row: priced at the slowest kernel's MFU
    assert "no row for softmax" in fallback.source and "MFU 0.020" in fallback.source
    assert fallback.seconds - 1.0 == pytest.approx((cost.seconds - 1.0) * 0.1 / 0.02, rel=1e-6)
    with pytest.raises(ValueError, match="no Memory Mosaics benchmark row for synthetic shapes"):
        benchmarked_cost(config, n, label, [{**rows[0], "config": "LM L=8"}])


def test_the_estimate_of_a_tiny_cpu_sweep_is_within_2x_of_its_measured_time(
    smoke_spec, write_sweep, tmp_path
):
    path = tiny_sweep(smoke_spec, write_sweep)
    sweep = load_sweep(path)
    predicted = estimate(sweep, at_once=1).wall_seconds
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "run",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--max-concurrent",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    measured = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert 0.5 < predicted / measured < 2, (predicted, measured)

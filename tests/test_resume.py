"""Crash and resume: SIGKILL the sweep's driver mid-sweep, then `--resume` finishes it with nothing lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from analysis.results_store import read_results

SWEEP = {
    "name": "crash",
    "base": {
        "task": {"name": "sort", "num_symbols": 4, "train_min_length": 2, "train_max_length": 4, "eval_length": 4,
                 "eval_factors": [1, 2], "eval_examples": 20},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "train": {"max_steps": 240, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "eval_interval": 40},
    },
    "kernels": ["softmax", "sparsemax"],
    "grid": {"seed": [0, 1, 2]},
}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "run", "crash.yaml", "--out", "sweeps/crash", *args]


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


@pytest.mark.slow
def test_sigkilled_sweep_resumes_without_rerunning_or_duplicating(tmp_path):
    (tmp_path / "crash.yaml").write_text(yaml.safe_dump(SWEEP))
    driver = subprocess.Popen(command(), cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    sweep_dir = tmp_path / "sweeps" / "crash"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # crash once one trial has finished and others are under way
            results = read_results(sweep_dir) if (sweep_dir / "results.parquet").is_dir() else None
            if results is not None and (results["status"] == "TERMINATED").any():
                break
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        driver.wait()
    before = read_results(sweep_dir)
    finished_before = set(before.loc[before["status"] == "TERMINATED", "trial_id"])
    assert 1 <= len(finished_before) < 6

    again = subprocess.run(command(), cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stderr  # never a silent restart or overwrite

    resumed = subprocess.run(command("--resume"), cwd=tmp_path, env=environment(), capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trials: 6 TERMINATED" in resumed.stdout

    results = read_results(sweep_dir)
    assert results["trial_id"].nunique() == 6 and (results["status"] == "TERMINATED").all()
    keys = ["trial_id", "metric", "length_factor", "step"]
    assert not results.duplicated(keys).any()  # every row exactly once
    exact = results[results["metric"] == "exact_match"]
    assert len(exact) == 6 * 2 * 6  # trials × length factors × evaluations (steps 40 … 240)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crash")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for run in children:  # a finished trial was not run again: one value per evaluation step
        history = client.get_metric_history(run.info.run_id, "exact_match_1x")
        assert sorted(m.step for m in history) == [40, 80, 120, 160, 200, 240], run.data.tags["ray.trial_id"]

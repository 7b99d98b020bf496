"""Trials on two gloo workers through Ray Train: in a sweep beside a one-worker trial, surviving a
killed worker, tracked once; and `mosaic-sweep train --workers 2` against the plain run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from analysis.results_store import read_results
from mosaic_core.train import TIMING_METRICS, train_trial
from orchestrator.tracking.names import PARENT_TAG

from helpers import clean_environment, mosaic_sweep_command, tiny_trial

pytestmark = pytest.mark.slow

# 200 steps: float rounding (the workers' gradient all-reduce adds in another order) grows with
# training; here it is ~3e-5 relative at step 200, past 1e-3 by step 300
BASE = tiny_trial(max_steps=200, eval_interval=20, device="cpu")
EVALUATIONS = list(range(20, 201, 20))
SPEC = {
    "name": "mixed",
    "base": BASE,
    "kernels": ["softmax"],
    "resources": {"cpu": 0.5},
    "cases": [{"seed": 0}, {"seed": 1, "resources.workers": 2}],
}


def environment() -> dict[str, str]:
    # Ray Train's report waits for its controller's poll of the workers (every 2 s by default)
    return clean_environment(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")


def train_workers_under(pid: int) -> list[int]:
    """The Ray Train worker processes among `pid`'s descendants (the Ray this test's sweep started)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int(
                (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            )
        except (ValueError, OSError):
            continue
    family, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - family
        family |= frontier
    workers = []
    for child in family:
        try:
            if b"RayTrainWorker" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            continue
    return workers


def registered_steps(train_dir: Path) -> list[int]:
    """The steps of the checkpoints Ray Train's controller has registered for the trial (it
    rewrites this snapshot on each); a restart goes on from the last. Tune logs them later."""
    try:
        snapshot = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or being written
        return []
    return [result["metrics"]["step"] for result in snapshot["checkpoint_results"]]


def kill_a_worker_after_step(step: int, sweep_dir: Path, driver: subprocess.Popen) -> list[int]:
    """SIGKILL one worker of the sweep's 2-worker trial (seed 1) as soon as a checkpoint at `step`
    is registered; the steps registered by then. The trial trains in ~5 s and the driver's log of
    it lags under load, so the workers are found first and Ray Train's own record polled."""
    deadline = time.time() + 300
    workers, train_dirs = [], []
    while len(workers) != 2 or not train_dirs:
        assert driver.poll() is None and time.time() < deadline, "the 2-worker trial never started"
        workers = train_workers_under(driver.pid)
        train_dirs = list((sweep_dir / "tune").glob("*/train"))
        time.sleep(0.05)
    while max(registered_steps(train_dirs[0]), default=0) < step:
        assert driver.poll() is None and time.time() < deadline, (
            "the sweep ended before a worker could be killed"
        )
        time.sleep(0.02)
    os.kill(workers[1], signal.SIGKILL)
    return registered_steps(train_dirs[0])


def history(rows, metric: str) -> list[float]:
    return rows[rows["metric"] == metric].sort_values("step")["value"].tolist()


def test_a_sweep_mixing_one_and_two_worker_trials_plans_them_survives_a_killed_worker_and_tracks_once(
    tmp_path,
):
    spec_file = tmp_path / "mixed.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    plan = subprocess.run(
        mosaic_sweep_command("run", spec_file, "--dry-run"),
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines()[:3] == [
        "1  seed=0 Gaussian",
        "2  seed=1 Gaussian  (2 workers)",
        "per worker: 0.5 CPU, 0 GPU; 1 trial × 1 worker, 1 trial × 2 workers (Ray Train, placed PACK, each with a "
        f"0.01-CPU driver); this machine (local Ray): 1 node(s), {os.cpu_count()} CPUs, 0 GPUs",
    ]

    sweep_dir = tmp_path / "sweeps" / "mixed"
    driver = subprocess.Popen(
        mosaic_sweep_command("run", spec_file, "--out", sweep_dir),
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        steps_before_the_kill = kill_a_worker_after_step(100, sweep_dir, driver)
        stdout, stderr = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:  # the test failed while the sweep runs: stop it as Ctrl-C would
            driver.send_signal(signal.SIGINT)
            driver.communicate(timeout=120)
    assert driver.returncode == 0, stderr[-3000:]
    assert "trials: 2 TERMINATED" in stdout

    results = read_results(sweep_dir)
    assert not results.duplicated(
        ["trial_id", "metric", "length_factor", "step"]
    ).any()  # rows once, not per worker
    two = results[results["seed"] == 1]
    assert sorted(two["step"].unique()) == EVALUATIONS
    trial_id = two["trial_id"].iloc[0]
    # Ray Train's, in the trial's folder
    assert list((sweep_dir / "tune" / trial_id / "train").glob("checkpoint_*"))
    # Tune's own log of the trial: every evaluation once, and the clock restarted once, in new workers
    # that went on from a checkpoint (from scratch, steps 20 to 100 would come again); the hundred steps
    # before the kill take ~5 times the twenty after it, a margin for a loaded machine
    assert max(steps_before_the_kill) < EVALUATIONS[-1], "the trial ended before the kill"
    lines = [
        json.loads(line)
        for line in (sweep_dir / "tune" / trial_id / "result.json").read_text().splitlines()
    ]
    assert [line["step"] for line in lines] == EVALUATIONS
    elapsed = [line["elapsed_s"] for line in lines]
    assert sum(later < earlier for earlier, later in zip(elapsed, elapsed[1:])) == 1

    # killed, resumed and on two workers, the trial is the one-process trial, evaluation by evaluation
    plain = []
    train_trial({**BASE, "seed": 1}, lambda metrics, directory: plain.append(metrics))
    for metric in ("train_loss", "exact_match", "support_size"):
        expected = [m[f"{metric}_1x" if metric != "train_loss" else metric] for m in plain]
        observed = history(
            two[two["length_factor"].isin([1.0]) | two["length_factor"].isna()], metric
        )
        assert observed == pytest.approx(expected, rel=1e-3), metric

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mixed").experiment_id])
    children = [run for run in runs if PARENT_TAG in run.data.tags]
    assert sorted(run.info.run_name for run in children) == ["seed=0 Gaussian", "seed=1 Gaussian"]
    assert {run.info.status for run in children} == {"FINISHED"}
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == EVALUATIONS, run.info.run_name


def test_train_on_two_workers_matches_the_plain_run_and_keeps_the_same_run_folder(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {**BASE, "seed": 2, "train": {**BASE["train"], "max_steps": 20, "eval_interval": 10}}
        )
    )
    runs = {}
    for name, extra in (("plain", []), ("two", ["--workers", "2"])):
        done = subprocess.run(
            mosaic_sweep_command("train", config, "--out", tmp_path / name, *extra),
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "step 20: train_loss=" in done.stdout
        runs[name] = [
            json.loads(line)
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert (tmp_path / name / "checkpoint" / "checkpoint.pt").is_file()
    assert [m["step"] for m in runs["two"]] == [10, 20]
    for plain, two in zip(runs["plain"], runs["two"]):
        assert {k: v for k, v in two.items() if k not in TIMING_METRICS} == pytest.approx(
            {k: v for k, v in plain.items() if k not in TIMING_METRICS}, rel=1e-3
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_worker_through_ray_train_is_the_plain_trial(tmp_path):
    """`train --workers 1` on a GPU (Ray Train, no DDP for one worker) against `train_trial` in this process."""
    trial = {
        **BASE,
        "seed": 4,
        "train": {**BASE["train"], "max_steps": 20, "eval_interval": 10, "device": "cuda"},
    }
    config = tmp_path / "gpu.yaml"
    config.write_text(yaml.safe_dump(trial))
    done = subprocess.run(
        mosaic_sweep_command("train", config, "--out", tmp_path / "one", "--workers", "1"),
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    through_train = [
        json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    ]
    plain = []
    train_trial(trial, lambda metrics, directory: plain.append(metrics))
    assert [m["step"] for m in through_train] == [m["step"] for m in plain] == [10, 20]
    for ours, reference in zip(through_train, plain):
        assert {k: v for k, v in ours.items() if k not in TIMING_METRICS} == pytest.approx(
            {k: v for k, v in reference.items() if k not in TIMING_METRICS}, rel=1e-3
        )

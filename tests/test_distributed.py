"""Sweeps on Ray clusters, made on this machine: GPU packing (GPUs declared as logical Ray
resources), a second node that goes away mid-sweep, a trial worker killed mid-trial, and an Optuna
search stopped and resumed."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from analysis.results_store import read_results
from orchestrator.tracking.names import PARENT_TAG, RETRIES_TAG, TRIAL_ID_TAG

from helpers import clean_environment, mosaic_sweep_command, tiny_trial

pytestmark = pytest.mark.slow

# log_interval 0: evaluations only, the rows these tests count
TINY = tiny_trial(max_steps=200, eval_interval=40, log_interval=0, device="cpu")


def sweep_command(folder: Path, spec: dict, *args: str) -> list[str]:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return mosaic_sweep_command("run", path, "--out", folder / "sweeps" / spec["name"], *args)


def children(folder: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [run for run in runs if PARENT_TAG in run.data.tags]


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the sweep ended before the event the test waits for"
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def results_of(sweep_dir: Path):
    return read_results(sweep_dir) if (sweep_dir / "results.parquet").is_dir() else None


def assert_every_row_once(results, trials: int, evaluations: int) -> None:
    assert results["trial_id"].nunique() == trials and (results["status"] == "TERMINATED").all()
    assert not results.duplicated(["trial_id", "metric", "length_factor", "step"]).any()
    assert len(results[results["metric"] == "exact_match"]) == trials * 2 * evaluations


@pytest.fixture
def ray_cluster(monkeypatch):
    """Ray's own test cluster: a head and extra nodes as separate raylets on this machine."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster()
    yield cluster
    cluster.shutdown()


def test_quarter_gpus_pack_eight_trials_on_two_gpus(tmp_path, ray_cluster):
    ray_cluster.add_node(num_cpus=2, num_gpus=2)
    spec = {
        "name": "pack",
        "base": TINY,
        "kernels": ["softmax"],
        "grid": {"seed": list(range(8))},
        "resources": {"cpu": 0.25, "gpu": 0.25},
    }
    dry = subprocess.run(
        sweep_command(tmp_path, spec, "--address", ray_cluster.address, "--dry-run"),
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert (
        dry.stdout.splitlines()[-2]
        == "8 trials: 8 at a time (limited by trials), 1 wave(s); 2 GPUs would run them all at once"
    )

    done = subprocess.run(
        sweep_command(tmp_path, spec, "--address", ray_cluster.address),
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = children(tmp_path, "pack")
    assert len(runs) == 8
    # each trial saw one GPU of its own, four trials per GPU
    assert collections.Counter(run.data.tags["ray.cuda_visible_devices"] for run in runs) == {
        "0": 4,
        "1": 4,
    }
    # all eight ran at once: the last to start started before the first to end ended
    assert max(run.info.start_time for run in runs) < min(run.info.end_time for run in runs)


def test_sweep_survives_losing_a_node(tmp_path, ray_cluster):
    ray_cluster.add_node(num_cpus=1)  # the head
    worker = ray_cluster.add_node(num_cpus=1)
    spec = {
        "name": "two",
        "base": {**TINY, "train": {**TINY["train"], "max_steps": 400}},
        "kernels": ["softmax"],
        "grid": {"seed": [0, 1, 2, 3]},
        "max_failures": 3,
    }

    refused = subprocess.run(
        sweep_command(tmp_path, spec, "--address", ray_cluster.address),
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: the Ray cluster at {ray_cluster.address} has 2 nodes: trials need shared storage for their "
        "checkpoints; pass --storage with a path every node sees, or s3://bucket/prefix"
    ]

    shared, sweep_dir = tmp_path / "shared", tmp_path / "sweeps" / "two"
    driver = subprocess.Popen(
        sweep_command(tmp_path, spec, "--address", ray_cluster.address, "--storage", str(shared)),
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def both_nodes_busy() -> (
        bool
    ):  # one CPU per node: two trials reporting means one runs on the worker
        results = results_of(sweep_dir)
        return (
            results is not None
            and results.loc[results["status"] == "RUNNING", "trial_id"].nunique() >= 2
        )

    wait_for(both_nodes_busy, driver)
    ray_cluster.remove_node(worker, allow_graceful=False)
    stdout, stderr = driver.communicate(timeout=500)
    assert driver.returncode == 0, stderr[-3000:]
    assert "trials: 4 TERMINATED" in stdout
    assert_every_row_once(read_results(sweep_dir), trials=4, evaluations=10)
    runs = children(tmp_path, "two")
    assert len(runs) == 4 and {run.info.status for run in runs} == {"FINISHED"}
    # the worker's trial moved
    assert any(int(run.data.tags.get(RETRIES_TAG, 0)) >= 1 for run in runs)
    # checkpoints on shared storage
    assert (shared / "two" / "tune").is_dir() and not (sweep_dir / "tune").exists()


def test_killed_trial_worker_resumes_from_its_checkpoint(tmp_path):
    spec = {
        "name": "killed",
        "base": {**TINY, "train": {**TINY["train"], "max_steps": 400}},
        "kernels": ["softmax"],
        "grid": {"seed": [0, 1]},
    }
    sweep_dir = tmp_path / "sweeps" / "killed"
    driver = subprocess.Popen(
        sweep_command(tmp_path, spec),
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def checkpointed() -> bool:
        results = results_of(sweep_dir)
        return results is not None and bool(len(results)) and results["step"].max() >= 80

    wait_for(checkpointed, driver)
    reported = read_results(sweep_dir)
    trial = reported.loc[reported["step"].idxmax(), "mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    victim = int(client.get_run(trial).data.tags["ray.pid"])  # the process running that trial
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=400)
    assert driver.returncode == 0, stderr[-3000:]
    assert "trials: 2 TERMINATED" in stdout
    assert_every_row_once(read_results(sweep_dir), trials=2, evaluations=10)
    retried = [run for run in children(tmp_path, "killed") if "ray.retries" in run.data.tags]
    assert [run.info.run_id for run in retried] == [trial] and retried[0].info.status == "FINISHED"
    assert retried[0].data.tags["ray.pid"] != str(victim)  # it finished in a new process
    # Tune's own log of the retried trial: its steps never go back, so it went on from a checkpoint
    trial_id = retried[0].data.tags[TRIAL_ID_TAG]
    lines = [
        json.loads(line)
        for line in (sweep_dir / "tune" / trial_id / "result.json").read_text().splitlines()
    ]
    steps = [line["step"] for line in lines]
    restarts = [line for line in lines if line["iterations_since_restore"] == 1]
    assert len(restarts) == 2 and restarts[1]["step"] > 40
    assert steps == sorted(set(steps)) and steps[-1] == 400

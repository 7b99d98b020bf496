"""Crash and resume: SIGKILL the sweep's driver mid-sweep, then `--resume` finishes it with nothing lost or duplicated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from ray.tune.trainable.metadata import _TrainingRunMetadata

from analysis.results_store import read_results
from mosaic_core.checkpoint import FILENAME
from orchestrator.tracking.names import PARENT_TAG, TRIAL_ID_TAG

from helpers import clean_environment, mosaic_sweep_command, tiny_trial

SWEEP = {
    "name": "crash",
    "base": tiny_trial(max_steps=240, eval_interval=40),
    "kernels": ["softmax", "sparsemax"],
    "grid": {"seed": [0, 1, 2]},
}


def command(*args: str, name: str = "crash") -> list[str]:
    return mosaic_sweep_command("run", f"{name}.yaml", "--out", f"sweeps/{name}", *args)


def kill_when(condition, driver: subprocess.Popen, timeout: float = 240) -> None:
    """SIGKILL the driver and the Ray processes it started, once `condition()` holds."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and not condition():
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()


def one_finished(sweep_dir: Path) -> bool:
    results = read_results(sweep_dir) if (sweep_dir / "results.parquet").is_dir() else None
    return results is not None and bool((results["status"] == "TERMINATED").any())


def delete_named_checkpoints(sweep_dir: Path) -> int:
    """Leave the sweep as a driver killed between Tune's checkpoint deletion and its next saved
    experiment state leaves it: for each unfinished trial, the two checkpoints after the one that
    state names were registered (here: copies of it), which deleted it and the one before it.
    Returns how many trials that touched."""
    states = sorted((sweep_dir / "tune").glob("experiment_state-*.json"))
    touched = 0
    for trial_json, metadata_json in json.loads(states[-1].read_text())["trial_data"]:
        latest = _TrainingRunMetadata.from_json_state(metadata_json).checkpoint_manager
        result = latest.latest_checkpoint_result
        if json.loads(trial_json)["status"] == "TERMINATED" or result is None:
            continue
        touched += 1
        named = Path(result.checkpoint.path)
        if not named.exists():  # the kill itself came at that moment
            continue
        index = int(named.name.removeprefix("checkpoint_"))
        for after in (1, 2):
            later = named.parent / f"checkpoint_{index + after:06d}"
            shutil.copytree(named, later, dirs_exist_ok=True)
        for gone in (index - 1, index):
            shutil.rmtree(named.parent / f"checkpoint_{gone:06d}", ignore_errors=True)
    return touched


def checkpoint_step(directory: Path) -> int:
    return torch.load(directory / FILENAME, weights_only=True)["step"]


@pytest.mark.slow
def test_sigkilled_sweep_resumes_without_rerunning_or_duplicating(tmp_path):
    (tmp_path / "crash.yaml").write_text(yaml.safe_dump(SWEEP))
    driver = subprocess.Popen(
        command(),
        cwd=tmp_path,
        env=clean_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sweep_dir = tmp_path / "sweeps" / "crash"
    # crash once one trial has finished and others are under way
    kill_when(lambda: one_finished(sweep_dir), driver)
    before = read_results(sweep_dir)
    finished_before = set(before.loc[before["status"] == "TERMINATED", "trial_id"])
    assert 1 <= len(finished_before) < 6

    again = subprocess.run(
        command(), cwd=tmp_path, env=clean_environment(), capture_output=True, text=True, timeout=60
    )
    # never a silent restart or overwrite
    assert again.returncode == 2 and "--resume" in again.stderr
    # the worst moment to die: the checkpoints Tune's saved state names are deleted
    assert delete_named_checkpoints(sweep_dir) >= 1

    resumed = subprocess.run(
        command("--resume"),
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trials: 6 TERMINATED" in resumed.stdout
    # each trial keeps two checkpoints, the last at its end, named in the order of their steps
    for trial in (sweep_dir / "tune").glob("*_0000*"):
        steps = [checkpoint_step(path) for path in sorted(trial.glob("checkpoint_*"))]
        assert len(steps) == 2 and steps == sorted(steps) and steps[-1] == 240, trial.name

    results = read_results(sweep_dir)
    assert results["trial_id"].nunique() == 6 and (results["status"] == "TERMINATED").all()
    keys = ["trial_id", "metric", "length_factor", "step"]
    assert not results.duplicated(keys).any()  # every row exactly once
    exact = results[results["metric"] == "exact_match"]
    assert len(exact) == 6 * 2 * 6  # trials × length factors × evaluations (steps 40 … 240)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crash")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags[PARENT_TAG] for r in children} == {parents[0].info.run_id}
    for run in children:  # one point per evaluation step, whatever ran twice
        history = client.get_metric_history(run.info.run_id, "exact_match_1x")
        assert sorted(m.step for m in history) == [40, 80, 120, 160, 200, 240], run.data.tags[
            TRIAL_ID_TAG
        ]


SEARCH = {
    "name": "search",
    "base": {**SWEEP["base"], "train": {**SWEEP["base"]["train"], "max_steps": 160}},
    "kernels": [{"name": "entmax", "alpha": 1.5}],
    "search": {
        "metric": "exact_match_1x",
        "mode": "max",
        "n_trials": 3,
        "seeds": 2,
        "sampler_seed": 7,
        "space": {"train.lr": {"loguniform": [1e-3, 3e-2]}, "model.n_embd": {"choice": [8, 16]}},
    },
    "scheduler": {"name": "asha", "grace_period": 40, "reduction_factor": 2},
}


@pytest.mark.slow
def test_optuna_search_stopped_with_ctrl_c_and_resumed_continues_the_same_study(tmp_path):
    import optuna

    (tmp_path / "search.yaml").write_text(yaml.safe_dump(SEARCH))
    driver = subprocess.Popen(
        command(name="search"),
        cwd=tmp_path,
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sweep_dir = tmp_path / "sweeps" / "search"
    deadline = time.time() + 240
    while not one_finished(sweep_dir):
        assert driver.poll() is None and time.time() < deadline, (
            "the sweep ended before it could be interrupted"
        )
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops the trials and saves its state
    stdout, stderr = driver.communicate(timeout=120)
    # the project's own command to continue, not Ray's Tuner.restore advice
    assert driver.returncode == 130 and stdout.endswith(
        "interrupted; continue it (finished trials are kept) with:\n"
        f"  mosaic-sweep run search.yaml --out {Path('sweeps') / 'search'} --resume\n"
    ), stdout[-2000:] + stderr[-2000:]
    assert "Tuner.restore" not in stdout + stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    assert {r.info.status for r in runs if PARENT_TAG not in r.data.tags} == {"KILLED"}
    assert "RUNNING" not in {r.info.status for r in runs}
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert 1 <= len(study.trials) <= 3
    # the trials Ctrl-C stopped are INTERRUPTED in the table made then, never finished
    statuses = read_results(sweep_dir).groupby("trial_id")["status"].last()
    assert set(statuses) <= {"TERMINATED", "STOPPED", "INTERRUPTED"}

    resumed = subprocess.run(
        command("--resume", name="search"),
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # 3 suggestions × 2 seeds, ASHA-stopped ones (STOPPED) included
    counts = dict(
        reversed(part.split(" "))
        for part in resumed.stdout.split("\ntrials: ")[1].splitlines()[0].split(", ")
    )
    assert set(counts) <= {"TERMINATED", "STOPPED"} and sum(map(int, counts.values())) == 6
    assert "search: suggestions by exact_match_1x (max), mean over seeds" in resumed.stdout

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    # the same study went on: suggestions before and after add up to n_trials
    assert len(study.trials) == 3
    results = read_results(sweep_dir)
    statuses = results.groupby("trial_id")["status"].last()
    assert len(statuses) == 6 and set(statuses) <= {"TERMINATED", "STOPPED"}
    assert not results.duplicated(["trial_id", "metric", "length_factor", "step"]).any()
    # each suggestion ran with seeds 0 and 1; Optuna holds the mean of their last exact_match_1x,
    # or PRUNED where ASHA stopped one of them (their last values are from different budgets)
    last = results[(results["metric"] == "exact_match") & (results["length_factor"] == 1)]
    last = last[last["step"] == last.groupby("trial_id")["step"].transform("max")]
    assert [list(seeds) for seeds in last.groupby("searched")["seed"].apply(sorted)] == [[0, 1]] * 3
    stopped = last.groupby("searched")["status"].apply(lambda s: (s == "STOPPED").any())
    means = last.groupby("searched")["value"].mean()[~stopped]
    complete = [trial.value for trial in study.trials if trial.state.name == "COMPLETE"]
    assert sorted(means) == pytest.approx(sorted(complete))
    assert sum(trial.state.name == "PRUNED" for trial in study.trials) == stopped.sum()

    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(children) == 6 and {r.info.status for r in children} == {"FINISHED"}
    assert [r.info.status for r in runs if PARENT_TAG not in r.data.tags] == ["FINISHED"]

"""What a sweep's MLflow runs tell a reviewer: the code's commit and package versions, the moved
parent run of an --overwrite, system metrics in child runs. The end-to-end checks (sweep-file
artifact, experiment kind, run names, the parent's description) are in tests/test_sweep.py's
end-to-end sweep, beside `ui --optuna`'s test."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from orchestrator.launch import new_sweep_folder
from orchestrator.sweep_folder import RunMap, SweepFolder
from orchestrator.tracking.callback import SweepTracker
from orchestrator.tracking.names import GIT_COMMIT_TAG, OVERRIDES_TAG, PARENT_TAG, SWEEP_DIR_TAG
from orchestrator.tracking.runs import (
    child_runs,
    git_commit,
    log_new_points,
    open_parent_run,
    package_versions,
    reopen_run,
)
from orchestrator.trial_configs import VARIANT
from search_spaces.expand import load_sweep

from helpers import SMOKE_YAML


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_package_versions_are_the_installed_ones():
    import mlflow
    import ray
    import torch

    versions = package_versions()
    assert versions["version.torch"] == torch.__version__
    assert (
        versions["version.ray"] == ray.__version__
        and versions["version.mlflow"] == mlflow.__version__
    )
    assert set(versions) <= {
        f"version.{name}" for name in ("torch", "ray", "mlflow", "triton", "adasplash")
    }


def test_git_commit_of_a_checkout_and_nothing_elsewhere(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    assert git_commit(repo) == {
        GIT_COMMIT_TAG: git(repo, "rev-parse", "HEAD"),
        "git.dirty": "false",
    }
    (repo / "new.py").write_text("untracked files do not make it dirty\n")
    assert git_commit(repo)["git.dirty"] == "false"
    (repo / "a.py").write_text("x = 2\n")
    assert git_commit(repo)["git.dirty"] == "true"
    (repo / "sub").mkdir()
    # code inside someone else's checkout is not that checkout
    assert git_commit(repo / "sub") == {}
    assert git_commit(tmp_path / "plain") == {}


def test_overwrite_tags_the_old_parent_run_with_its_backup_folder(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    old_parent = client.create_run(
        client.create_experiment("smoke"), tags={SWEEP_DIR_TAG: "old place"}
    ).info.run_id
    sweep, sweep_dir = load_sweep(SMOKE_YAML), tmp_path / "sweeps" / "smoke"
    new_sweep_folder(sweep, sweep_dir, tracking_uri, None, overwrite=False).save_run_map(
        RunMap(parent=old_parent)
    )

    new_sweep_folder(sweep, sweep_dir, tracking_uri, None, overwrite=True)
    (backup,) = sweep_dir.parent.glob("smoke.bak-*")
    assert client.get_run(old_parent).data.tags[SWEEP_DIR_TAG] == str(backup.resolve())
    assert SweepFolder.open(sweep_dir).run_map() is None  # the new sweep has no parent run yet


def make_tracker(tmp_path: Path) -> tuple[SweepTracker, MlflowClient, str]:
    """A tracker on a SQLite store and one RUNNING child run, without Ray."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("sweep")
    folder = new_sweep_folder(
        load_sweep(SMOKE_YAML), tmp_path / "sweep", tracking_uri, None, overwrite=False
    )
    run_id = client.create_run(experiment).info.run_id
    tracker = SweepTracker(client, experiment, "parent", folder, folder.configs())
    tracker.node_ip = "10.0.0.1"
    return tracker, client, run_id


def test_child_runs_get_system_metrics_until_the_trial_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    tracker, client, run_id = make_tracker(tmp_path)
    tracker._monitor("t1", run_id)
    time.sleep(1.0)
    tracker._stop_monitor("t1")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 for m in cpu)
    assert [m.step for m in cpu] == list(range(len(cpu)))
    assert memory and all(m.value > 0 for m in memory)
    assert tracker.monitors == {}


def test_a_trial_on_another_node_gets_no_system_metrics_of_the_driver(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    tracker, client, run_id = make_tracker(tmp_path)
    tracker._monitor("here", run_id)
    tracker._monitor("there", run_id)
    tracker._place("here", run_id, {"node_ip": "10.0.0.1", "pid": 7})
    tracker._place("there", run_id, {"node_ip": "10.0.0.2", "pid": 8})
    assert set(tracker.monitors) == {"here"}
    # the tags queued for MLflow's writer thread are all written by then
    tracker.on_experiment_end([])
    tags = client.get_run(run_id).data.tags
    assert (
        tags["system_metrics"] == "not sampled: the trial runs on 10.0.0.2, the driver on 10.0.0.1"
    )
    assert tracker.monitors == {}


class Killed(Exception):
    """The driver's SIGKILL, at one chosen line."""


def killed(*args, **kwargs):
    raise Killed


@pytest.fixture
def drivers(tmp_path):
    """(start a driver's tracker, a trial, the parent's child runs) on one sweep, without Ray."""
    tracker, client, _ = make_tracker(tmp_path)
    parent = client.create_run(tracker.experiment_id).info.run_id
    tracker.folder.save_run_map(RunMap(parent=parent))

    def started() -> SweepTracker:  # a driver's tracker, set up as Tune does
        driver = SweepTracker(
            client, tracker.experiment_id, parent, tracker.folder, tracker.configs
        )
        driver.setup()
        return driver

    def children() -> list[str]:
        runs = client.search_runs([tracker.experiment_id])
        return [r.info.run_id for r in runs if r.data.tags.get(PARENT_TAG) == parent]

    trial = SimpleNamespace(trial_id="t1", config={VARIANT: next(iter(tracker.configs))})
    return started, trial, children


def test_a_resumed_sweep_adopts_the_run_a_killed_driver_made_but_never_mapped(drivers, monkeypatch):
    """Killed right after MLflow made a trial's child run (before its params and the run map), the
    driver leaves a run only MLflow knows; the resumed tracker takes it instead of making a second."""
    started, trial, children = drivers
    first = started()
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", killed)
        with pytest.raises(Killed):
            first.on_trial_start(0, [], trial)
    (orphan,) = children()
    assert first.client.get_run(orphan).data.params == {}
    assert first.folder.run_map().trials == {}

    resumed = started()
    resumed.on_trial_start(0, [], trial)
    resumed.on_experiment_end([])
    assert children() == [orphan]
    assert child_runs(first.client, first.experiment_id, first.parent_run_id) == {"t1": orphan}
    assert first.folder.run_map().trials == {"t1": orphan}
    assert first.client.get_run(orphan).data.params["model.kernel"] == str(
        first.configs[trial.config[VARIANT]]["model"]["kernel"]
    )


def test_a_result_logged_to_mlflow_but_not_to_the_results_store_is_not_logged_twice(
    drivers, monkeypatch
):
    """Killed after MLflow took step 80 and before the results store did, then resumed from the
    step-40 checkpoint: the trial reports 80 again, and MLflow keeps one point per step."""
    started, trial, children = drivers
    first = started()
    first.on_trial_start(0, [], trial)
    first.on_trial_result(0, [], trial, {"step": 40, "exact_match_1x": 0.25})
    with monkeypatch.context() as patch:
        patch.setattr(SweepTracker, "_write_rows", killed)
        with pytest.raises(Killed):
            first.on_trial_result(0, [], trial, {"step": 80, "exact_match_1x": 0.5})
    first.on_experiment_end([])

    resumed = started()
    resumed.on_trial_start(0, [], trial)
    for step, value in ((80, 0.5), (120, 0.75)):
        resumed.on_trial_result(0, [], trial, {"step": step, "exact_match_1x": value})
    resumed.on_experiment_end([])
    (run_id,) = children()
    history = first.client.get_metric_history(run_id, "exact_match_1x")
    assert sorted((m.step, m.value) for m in history) == [(40, 0.25), (80, 0.5), (120, 0.75)]


def test_the_parent_run_records_the_command_line_overrides(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    overrides = ["train.lr=1e-3", "grid.seed=[0,1,2]"]
    folder = new_sweep_folder(
        load_sweep(SMOKE_YAML), tmp_path / "smoke", tracking_uri, None, False, overrides
    )
    _, parent = open_parent_run(client, folder, "smoke", "a sweep", None, [])
    assert client.get_run(parent).data.tags[OVERRIDES_TAG] == "train.lr=1e-3 grid.seed=[0,1,2]"


def test_the_chart_view_groups_a_configurations_seeds_and_draws_its_numeric_params():
    """A search over lr and an optimizer name: the groups are kernel × lr × optimizer (their seeds
    averaged), the parallel coordinates draw lr (MLflow draws no averaged text), then train_loss
    and the headline metric."""
    from orchestrator.mlflow_ui import charts_view, trials_view

    table = trials_view("p", ["exact_match_1x"], False, ["seed", "train.lr", "train.optimizer"])
    view = charts_view(table, ["exact_match_1x"], {"train.lr": True, "train.optimizer": False})
    assert {key: view[key] for key in table} == table
    parallel, *curves = view["compareRunCharts"]
    assert parallel["selectedParams"] == ["train.lr"]
    assert parallel["selectedMetrics"] == ["train_loss", "exact_match_1x"]
    assert [curve["metricKey"] for curve in curves] == ["train_loss", "exact_match_1x"]
    assert view["groupBy"]["groupByKeys"] == [
        {"mode": "tag", "groupByData": "kernel_label"},
        {"mode": "param", "groupByData": "train.lr"},
        {"mode": "param", "groupByData": "train.optimizer"},
    ]


def test_a_repeated_evaluation_keeps_one_diagnostics_row_per_head(tmp_path):
    """A restarted trial repeats the steps since its checkpoint: its diagnostics table of such a
    step keeps a row per layer and head (MLflow appends the rows of a table logged again), also
    when a new driver reopens the run."""
    import json

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    evaluation = {
        "step": 40,
        "exact_match": 0.5,
        "support_size/l0h0": 3.0,
        "support_size/l0h1": 2.0,
    }
    logged: set[tuple[str, int]] = set()
    log_new_points(client, run_id, evaluation, 40, logged)
    log_new_points(client, run_id, evaluation, 40, logged)  # the same driver, a retried trial
    log_new_points(client, run_id, evaluation, 40, reopen_run(client, run_id))  # a resumed sweep
    table = json.loads(
        Path(client.download_artifacts(run_id, "diagnostics/step_000040.json")).read_text()
    )
    assert table["data"] == [[0, 0, 3.0], [0, 1, 2.0]]
    assert [m.step for m in client.get_metric_history(run_id, "exact_match")] == [40]

"""The `mosaic-sweep run` command: dry runs, validation before Ray, the sweep folder, MLflow and the results store."""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Experiment, Run

from analysis.results_store import read_results
from analysis.tables import rendered_markdown
from orchestrator.sweep import SweepOutcome
from orchestrator.sweep_folder import (
    LaunchRecord,
    SweepFolder,
    SweepFolderError,
    default_tracking_uri,
)
from orchestrator.tracking.names import (
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_TAG,
    MODEL_TRAINING,
    NOTE_TAG,
    PARENT_TAG,
    RESOURCE_PLAN_TAG,
    SHARED_VIEW_TAG_PREFIX,
    SWEEP_DIR_TAG,
    TRIAL_ID_TAG,
    VERSION_TAG_PREFIX,
)
from orchestrator.tracking.runs import git_commit, package_versions

from helpers import (
    SMOKE_YAML,
    clean_environment,
    invoke,
    mosaic_sweep,
    mosaic_sweep_command,
    tiny_trial,
)

# the kernels as the paper labels them, wherever a person reads a trial's name
SMOKE_LINES = [
    "1  Gaussian seed=0",
    "2  Gaussian seed=1",
    "3  Epanechnikov (sparsemax) seed=0",
    "4  Epanechnikov (sparsemax) seed=1",
    "5  Biweight seed=0",
    "6  Biweight seed=1",
]


def smoke_plan() -> list[str]:
    """The resource plan of the smoke sweep (1 CPU per trial) on whatever machine runs the tests."""
    import math

    import torch

    cpus, at_once = os.cpu_count(), min(6, os.cpu_count())
    return [
        f"per trial: 1 CPU, 0 GPU; this machine (local Ray): 1 node(s), {cpus} CPUs, {torch.cuda.device_count()} GPUs",
        f"6 trials: {at_once} at a time (limited by {'trials' if at_once == 6 else 'CPUs'}), {math.ceil(6 / at_once)} wave(s)",
    ]


LABELS = ["Gaussian", "Epanechnikov (sparsemax)", "Biweight"]
# mean^(max), best ones marked
CELL = re.compile(r"(\*\*)?\d\.\d\d(\*\*)?\^\((<u>)?\d\.\d\d(</u>)?\)")


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# --dry-run and validation, through the real command line


@pytest.mark.parametrize("spec", [str(SMOKE_YAML), "smoke"], ids=["path", "bundled-name"])
def test_dry_run_lists_trials_and_starts_nothing(tmp_path, spec):
    done = mosaic_sweep("run", spec, "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == SMOKE_LINES + smoke_plan() + [
        "this machine (local Ray) can run this sweep"
    ]
    assert done.stderr == ""
    assert files_under(tmp_path) == []  # no sweeps/ folder, no mlflow.db, no Ray session here


def test_dry_run_of_a_bigger_sweep_pads_the_numbers(tmp_path, write_sweep, smoke_spec):
    smoke_spec["grid"] = {"seed": [0, 1, 2, 3]}
    done = mosaic_sweep("run", write_sweep(smoke_spec), "--dry-run", cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 15
    assert lines[0] == " 1  Gaussian seed=0" and lines[11] == "12  Biweight seed=3"
    assert (
        lines[-2].startswith("12 trials: ")
        and lines[-1] == "this machine (local Ray) can run this sweep"
    )


def bad_specs(smoke_spec: dict) -> dict[str, tuple[dict, str]]:
    """name -> (sweep file contents, text the error must contain)."""

    def variant(edit) -> dict:
        spec = copy.deepcopy(smoke_spec)
        edit(spec)
        return spec

    return {
        "top-key": (
            variant(lambda s: s.update(seeds=[0, 1])),
            "unknown key 'seeds'; allowed: name, description, base, kernels",
        ),
        "base-key": (
            variant(lambda s: s["base"]["model"].update(n_lyer=1)),
            "unknown key 'base.model.n_lyer'; allowed: n_layer,",
        ),
        "kernel": (
            variant(lambda s: s.update(kernels=["softmax", "sparsmax"])),
            "unknown kernel 'sparsmax'; allowed: softmax, sparsemax, entmax",
        ),
        "alpha": (
            variant(lambda s: s.update(kernels=[{"name": "entmax", "alpha": 1}])),
            "kernels[0]: entmax alpha must be > 1",
        ),
        "grid-key": (
            variant(lambda s: s["grid"].update({"model.layers": [1]})),
            "unknown grid key 'model.layers'; allowed: seed,",
        ),
    }


@pytest.mark.parametrize(
    ("case", "dry_run"),
    [
        ("top-key", True),
        ("base-key", True),
        ("kernel", True),
        ("alpha", True),
        ("grid-key", True),
        ("base-key", False),
        ("kernel", False),  # without --dry-run: still refused before Ray starts
    ],
)
def test_bad_sweep_file_is_one_line_error_exit_2_before_anything_starts(
    tmp_path, write_sweep, smoke_spec, case, dry_run
):
    spec, expected = bad_specs(smoke_spec)[case]
    path = write_sweep(spec, "bad")
    before = files_under(tmp_path)
    done = mosaic_sweep("run", path, *(["--dry-run"] if dry_run else []), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: bad.yaml: ")
    assert expected in lines[0]
    # validated before Ray or MLflow: no sweeps/, no mlflow.db
    assert files_under(tmp_path) == before


def test_unknown_spec_is_exit_2(tmp_path):
    done = mosaic_sweep("run", "no-such-sweep", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: no-such-sweep: no such sweep file, nor a bundled sweep; bundled: "
        "babistories, babistories_smoke, length_generalization, length_generalization_smoke, "
        "paper_check, regbench, regbench_smoke, search_smoke, smoke"
    ]
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# what the command passes to run_sweep: the default folder and the tracking URI's precedence


@pytest.fixture
def fake_run_sweep(monkeypatch, tmp_path):
    """Replace run_sweep with a recorder; the command runs in an empty tmp_path."""
    import orchestrator.sweep

    calls: list[dict] = []
    sweeps: list = []
    statuses = {"TERMINATED": 6}

    def fake(sweep, folder, *, address=None, verbose=False, max_concurrent=None, sweep_file=None):
        sweeps.append(sweep)
        calls.append(
            dict(
                name=sweep.name,
                trials=len(sweep.trials),
                sweep_dir=folder.path,
                tracking_uri=folder.launch.tracking_uri,
                configs=len(folder.configs()),
            )
        )
        return SweepOutcome(
            folder.path, "| Kernel |\n", "parent123", folder.launch.tracking_uri, dict(statuses)
        )

    monkeypatch.setattr(orchestrator.sweep, "run_sweep", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    fake.calls, fake.statuses, fake.sweeps = calls, statuses, sweeps
    return fake


def test_default_folder_and_tracking_uri(fake_run_sweep, tmp_path):
    result = invoke("run", "smoke")
    assert result.exit_code == 0, result.output
    (call,) = fake_run_sweep.calls
    assert call == dict(
        name="smoke",
        trials=6,
        sweep_dir=Path("sweeps") / "smoke",
        tracking_uri=f"sqlite:///{tmp_path.resolve() / 'sweeps' / 'mlflow.db'}",
        configs=6,
    )
    assert "MLflow: sqlite:///" in result.stdout and "parent run parent123" in result.stdout
    assert "trials: 6 TERMINATED" in result.stdout


def test_tracking_uri_beside_a_chosen_folder(fake_run_sweep, tmp_path):
    assert invoke("run", "smoke", "--out", "elsewhere/mine", "--overwrite").exit_code == 0
    (call,) = fake_run_sweep.calls
    assert call["sweep_dir"] == Path("elsewhere/mine")
    assert call["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'elsewhere' / 'mlflow.db'}"


def test_tracking_uri_from_environment_then_flag(fake_run_sweep, monkeypatch):
    """Two servers that answer (a tracking server's must, within seconds, or the run is refused)."""
    with (
        socket.create_server(("127.0.0.1", 0)) as env,
        socket.create_server(("127.0.0.1", 0)) as flag,
    ):
        uris = [f"http://127.0.0.1:{server.getsockname()[1]}" for server in (env, flag)]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uris[0])
        assert invoke("run", "smoke", "--out", "a").exit_code == 0
        assert invoke("run", "smoke", "--out", "b", "--mlflow-uri", uris[1]).exit_code == 0
    assert [c["tracking_uri"] for c in fake_run_sweep.calls] == uris


def test_failed_trials_make_exit_1(fake_run_sweep):
    fake_run_sweep.statuses.update({"TERMINATED": 5, "ERROR": 1})
    result = invoke("run", "smoke")
    assert result.exit_code == 1
    assert "trials: 1 ERROR, 5 TERMINATED" in result.stdout


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        default_tracking_uri(tmp_path / "sweeps")
        == f"sqlite:///{tmp_path.resolve() / 'sweeps' / 'mlflow.db'}"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///somewhere")
    assert default_tracking_uri(tmp_path / "sweeps") == "file:///somewhere"


# ---------------------------------------------------------------------------------------------
# the sweep folder: never mixed, never deleted


LAUNCH_RECORD = LaunchRecord(
    tracking_uri="sqlite:///mlflow.db", storage_path="/somewhere", trials=3
)


def test_new_or_empty_folder_is_used(tmp_path):
    SweepFolder.create(tmp_path / "a" / "b", LAUNCH_RECORD, {"softmax": {}})
    assert files_under(tmp_path) == [
        tmp_path / "a",
        tmp_path / "a" / "b",
        tmp_path / "a" / "b" / "launch.json",
        tmp_path / "a" / "b" / "trials.json",
    ]
    assert SweepFolder.open(tmp_path / "a" / "b").launch == LAUNCH_RECORD
    assert SweepFolder.open(tmp_path / "a" / "b").configs() == {"softmax": {}}


def test_non_empty_folder_is_refused_without_overwrite(tmp_path):
    old = tmp_path / "sweeps" / "s"
    SweepFolder.create(old, LAUNCH_RECORD, {"softmax": {}})
    (old / "results.parquet").mkdir()
    (old / "results.parquet" / "part-x.parquet").write_text("old")
    with pytest.raises(SweepFolderError) as info:
        SweepFolder.create(old, LAUNCH_RECORD, {"sparsemax": {}})
    assert "--overwrite" in str(info.value) and "\n" not in str(info.value)
    assert (old / "results.parquet" / "part-x.parquet").read_text() == "old"
    assert SweepFolder.open(old).configs() == {"softmax": {}}


def test_overwrite_moves_the_old_folder_to_a_backup(tmp_path):
    old = tmp_path / "sweeps" / "s"
    SweepFolder.create(old, LAUNCH_RECORD, {"softmax": {}})
    (old / "table.md").write_text("old table")
    SweepFolder.create(old, LAUNCH_RECORD, {"sparsemax": {}}, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["launch.json", "trials.json"]
    (backup,) = [p for p in old.parent.iterdir() if p != old]
    assert re.fullmatch(r"s\.bak-\d{8}-\d{6}", backup.name)
    assert (backup / "table.md").read_text() == "old table"
    assert SweepFolder.open(backup).configs() == {"softmax": {}}


def test_overwrite_never_moves_a_folder_that_is_not_a_sweep(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(
            SweepFolderError, match="is not the folder of a sweep and is left alone"
        ):
            SweepFolder.create(mine, LAUNCH_RECORD, {"softmax": {}}, overwrite=overwrite)
    assert files_under(tmp_path) == [mine, mine / "chapter1.tex"]


# ---------------------------------------------------------------------------------------------
# one real sweep: Ray Tune, MLflow, the results store and the table


def tiny_smoke(smoke_spec: dict) -> dict:
    spec = dict(smoke_spec, name="tiny_smoke")
    spec["base"]["task"]["eval_examples"] = 20
    spec["base"]["model"].update(n_layer=1, n_embd=16, n_head=2)
    spec["base"]["train"].update(max_steps=20, eval_interval=10, warmup_steps=5, batch_size=8)
    assert spec["kernels"] == ["softmax", "sparsemax", {"name": "entmax", "alpha": 1.5}]
    assert spec["grid"] == {"seed": [0, 1]}
    return spec


def mlflow_runs(client, experiment_id: str) -> tuple[list, list]:
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return parents, children


@dataclass(frozen=True)
class TinySweep:
    """The tiny smoke sweep's first run: where it ran, what it printed, and what it left in MLflow
    and the results store."""

    folder: Path
    spec: Path
    sweep_dir: Path
    done: subprocess.CompletedProcess[str]
    client: MlflowClient
    experiments: dict[str, Experiment]
    parent: Run
    children: list[Run]
    table: str
    results: pd.DataFrame

    @property
    def experiment_id(self) -> str:
        return self.experiments["tiny_smoke"].experiment_id


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> TinySweep:
    """The tiny smoke sweep run once for this module's tests, in the default folder
    sweeps/<name> with the default tracking URI beside it. The last test (--overwrite) replaces it:
    the tests before it read it as the first run left it."""
    folder = tmp_path_factory.mktemp("tiny_sweep")
    spec = tiny_smoke(yaml.safe_load(SMOKE_YAML.read_text()))
    spec["base"]["train"]["log_interval"] = 5  # progress between the evaluations at 10 and 20
    path = folder / "specs" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    # trials of a second or two get system-metric samples
    done = mosaic_sweep("run", path, cwd=folder, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.1")
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = folder / "sweeps" / "tiny_smoke"
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'sweeps' / 'mlflow.db'}")
    experiments = {e.name: e for e in client.search_experiments()}
    parents, children = mlflow_runs(client, experiments["tiny_smoke"].experiment_id)
    assert len(parents) == 1 and len(children) == 6
    table = (sweep_dir / "table.md").read_text()
    return TinySweep(
        folder,
        path,
        sweep_dir,
        done,
        client,
        experiments,
        parents[0],
        children,
        table,
        read_results(sweep_dir),
    )


@pytest.mark.slow
def test_the_run_prints_progress_and_the_table(tiny_sweep):
    done = tiny_sweep.done
    assert "starting Ray on this machine…" in done.stderr
    assert re.search(
        r"step 5/20  Gaussian seed=0  train_loss=\S+  \S+k tokens/s  ETA", done.stderr
    ), done.stderr
    for label in LABELS:
        assert re.search(rf"^\| {re.escape(label)} \| .+ \| .+ \|$", done.stdout, re.M), done.stdout
    assert "| Kernel | sort 1× | sort 2× |" in done.stdout
    assert "trials: 6 TERMINATED" in done.stdout


@pytest.mark.slow
def test_the_table_has_a_row_per_kernel_in_the_file_order(tiny_sweep):
    rows = [
        line
        for line in tiny_sweep.table.splitlines()
        if line.startswith("| ") and not line.startswith("| Kernel")
    ]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == LABELS
    for row in rows:
        cells = row.strip("|").split(" | ")[1:]
        assert len(cells) == 2 and all(CELL.fullmatch(cell.strip()) for cell in cells), row
    assert "\\toprule" in (tiny_sweep.sweep_dir / "table-length_factor.tex").read_text()


@pytest.mark.slow
def test_the_parent_run_describes_the_sweep(tiny_sweep):
    """Its folder, sweep file, tables, plots, commit, package versions, resource plan and table,
    in the sweep's own model-training experiment beside the default one."""
    client, parent = tiny_sweep.client, tiny_sweep.parent
    assert set(tiny_sweep.experiments) == {"Default", "tiny_smoke"}
    assert tiny_sweep.experiments["tiny_smoke"].tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[SWEEP_DIR_TAG] == str(tiny_sweep.sweep_dir.resolve())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    tables = {"table.md", "table-length_factor.tex", "table-length_factor.csv"}
    assert tables | {"plots", "tiny.yaml"} <= artifacts
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/exact_match_vs_length.png", "plots/support_size_vs_length.png"} <= figures
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True, text=True
    )
    tags = parent.data.tags
    assert tags[GIT_COMMIT_TAG] == commit.stdout.strip() and git_commit()
    assert package_versions().items() <= tags.items() and f"{VERSION_TAG_PREFIX}torch" in tags
    assert tags[RESOURCE_PLAN_TAG] == "\n".join(smoke_plan())
    # the table as its description, as MLflow renders it: mean (max), the best max in italics
    assert tags[NOTE_TAG].endswith(rendered_markdown(tiny_sweep.table.strip()))
    assert "^(" not in tags[NOTE_TAG] and "<u>" not in tags[NOTE_TAG]


@pytest.mark.slow
def test_a_child_run_per_trial_with_its_params_and_metric_curves(tiny_sweep):
    client, children = tiny_sweep.client, tiny_sweep.children
    assert sorted(c.info.run_name for c in children) == sorted(
        line.split("  ", 1)[1] for line in SMOKE_LINES
    )
    assert all(c.data.tags[PARENT_TAG] == tiny_sweep.parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(
        client.get_metric_history(c.info.run_id, "system/cpu_utilization_percentage")
        for c in children
    )
    variants = sorted((c.data.params["model.kernel"], c.data.params["seed"]) for c in children)
    assert variants == [
        (kernel, seed) for kernel in ("entmax", "softmax", "sparsemax") for seed in "01"
    ]
    for child in children:
        params = child.data.params
        assert (params["task.name"], params["model.n_layer"], params["train.max_steps"]) == (
            "sort",
            "1",
            "20",
        )
        assert "model.kernel_params" not in params  # never logged as `{}`
        alpha = {"model.kernel_params.alpha": "1.5"} if params["model.kernel"] == "entmax" else {}
        assert {k: v for k, v in params.items() if k.startswith("model.kernel_params.")} == alpha
        for metric in ("exact_match_1x", "exact_match_2x"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert sorted(m.step for m in history) == [10, 20]
            assert all(0.0 <= m.value <= 1.0 for m in history)
        for metric in ("train_loss", "tokens_per_s", "lr"):  # every log_interval and evaluation
            history = client.get_metric_history(child.info.run_id, metric)
            assert sorted(m.step for m in history) == [5, 10, 15, 20]


@pytest.mark.slow
def test_a_child_runs_per_head_diagnostics_are_a_table_per_evaluation(tiny_sweep):
    """No `support_size/l0h1` metric (MLflow 3.17 would chart each group before train_loss): a
    table per evaluation, a row per layer and head, holding what the results store holds."""
    results = tiny_sweep.results
    for child in tiny_sweep.children:
        model_metrics = [key for key in child.data.metrics if not key.startswith("system/")]
        assert "train_loss" in model_metrics and not [key for key in model_metrics if "/" in key]
        for step in (10, 20):
            path = f"diagnostics/step_{step:06d}.json"
            table = json.loads(
                Path(tiny_sweep.client.download_artifacts(child.info.run_id, path)).read_text()
            )
            rows = [dict(zip(table["columns"], row)) for row in table["data"]]
            assert [(row["layer"], row["head"]) for row in rows] == [(0, 0), (0, 1)]
            mine = results[
                (results["mlflow_run_id"] == child.info.run_id) & (results["step"] == step)
            ]
            stored = mine.set_index("metric")["value"]
            # MLflow writes a table's numbers with 10 significant digits
            assert [row["support_size"] for row in rows] == pytest.approx(
                [stored["support_size/l0h0"], stored["support_size/l0h1"]], rel=1e-9
            )


@pytest.mark.slow
def test_the_results_store_holds_every_evaluation_of_every_trial(tiny_sweep):
    results = tiny_sweep.results
    columns = {"trial_id", "kernel", "alpha", "k", "b", "n_layer", "seed", "task", "metric"}
    assert columns | {"length_factor", "value", "status", "mlflow_run_id"} <= set(results.columns)
    assert results["trial_id"].nunique() == 6
    assert (results["status"] == "TERMINATED").all()
    run_of_trial = {c.data.tags[TRIAL_ID_TAG]: c.info.run_id for c in tiny_sweep.children}
    assert set(results["mlflow_run_id"]) == set(run_of_trial.values())
    assert all(run_of_trial[t] == r for t, r in zip(results["trial_id"], results["mlflow_run_id"]))
    exact = results[results["metric"] == "exact_match"]
    assert len(exact) == 6 * 2 * 2
    assert sorted(exact.groupby(["trial_id", "length_factor", "step"]).size().tolist()) == [1] * 24
    assert set(exact["length_factor"]) == {1.0, 2.0} and set(exact["step"]) == {10, 20}
    assert exact.groupby("kernel")["trial_id"].nunique().to_dict() == {
        "entmax": 2,
        "softmax": 2,
        "sparsemax": 2,
    }
    assert (results["task"] == "sort").all() and (results["n_layer"] == 1).all()
    assert set(results["seed"]) == {0, 1}
    entmax_rows = results["kernel"] == "entmax"
    assert (results.loc[entmax_rows, "alpha"] == 1.5).all()
    assert results.loc[~entmax_rows, "alpha"].isna().all()
    assert results["k"].isna().all() and results["b"].isna().all()


@pytest.mark.slow
def test_the_ui_link_opens_on_the_sweeps_trials(tiny_sweep):
    assert_link_opens_on_the_trials(
        tiny_sweep.client, tiny_sweep.experiment_id, tiny_sweep.sweep_dir, tiny_sweep.children
    )


@pytest.mark.slow
def test_resuming_a_finished_sweep_runs_nothing(tiny_sweep):
    finished = mosaic_sweep("run", tiny_sweep.spec, "--resume", cwd=tiny_sweep.folder, timeout=120)
    assert finished.returncode == 0
    assert "all 6 trials had finished; nothing was left to run" in finished.stdout
    assert "starting Ray" not in finished.stderr


@pytest.mark.slow
def test_the_same_command_again_is_refused_and_touches_nothing(tiny_sweep):
    sweep_dir = tiny_sweep.sweep_dir
    before = {p: p.stat().st_mtime_ns for p in files_under(sweep_dir) if p.is_file()}
    again = mosaic_sweep("run", tiny_sweep.spec, cwd=tiny_sweep.folder, timeout=120)
    assert again.returncode == 2
    (line,) = again.stderr.splitlines()
    assert line.startswith("error: ") and "--overwrite" in line
    assert {p: p.stat().st_mtime_ns for p in files_under(sweep_dir) if p.is_file()} == before
    # no parent run for a refused invocation
    assert len(mlflow_runs(tiny_sweep.client, tiny_sweep.experiment_id)[0]) == 1


@pytest.mark.slow
def test_overwrite_starts_afresh_and_keeps_the_old_sweep_as_a_backup(tiny_sweep):
    """Last of the module's tests: it replaces the sweep the others read."""
    client, sweep_dir, old_parent = tiny_sweep.client, tiny_sweep.sweep_dir, tiny_sweep.parent
    redo = mosaic_sweep(
        "run", tiny_sweep.spec, "--out", sweep_dir, "--overwrite", cwd=tiny_sweep.folder
    )
    assert redo.returncode == 0, redo.stdout + redo.stderr
    (backup,) = sweep_dir.parent.glob("tiny_smoke.bak-*")
    order = ["trial_id", "metric", "length_factor", "step"]
    backed_up = read_results(backup).sort_values(order).reset_index(drop=True)
    assert backed_up.equals(tiny_sweep.results.sort_values(order).reset_index(drop=True))
    assert (backup / "table.md").read_text() == tiny_sweep.table

    # the same experiment, reused: a second parent run, the first one tagged with its backup
    assert {e.name for e in client.search_experiments()} == {"Default", "tiny_smoke"}
    parents, children = mlflow_runs(client, tiny_sweep.experiment_id)
    assert len(parents) == 2 and len(children) == 12
    assert all(p.info.status == "FINISHED" for p in parents)
    assert client.get_run(old_parent.info.run_id).data.tags[SWEEP_DIR_TAG] == str(backup.resolve())
    new_parent = next(p.info.run_id for p in parents if p.info.run_id != old_parent.info.run_id)
    new_children = {c.info.run_id for c in children if c.data.tags[PARENT_TAG] == new_parent}
    assert len(new_children) == 6
    new_results = read_results(sweep_dir)
    assert new_results["trial_id"].nunique() == 6
    assert set(new_results["mlflow_run_id"]) == new_children


def test_status_counts_trials_by_state_and_names_the_best(tmp_path):
    from analysis.results_store import write_trial_rows

    sweep_dir = tmp_path / "sweeps" / "s"
    SweepFolder.create(sweep_dir, LAUNCH_RECORD, {"softmax": {}})
    common = {"task": "sort", "kernel": "softmax", "n_layer": 1, "metric": "exact_match"}
    write_trial_rows(
        sweep_dir,
        "t1",
        [
            {
                **common,
                "kernel_label": "Gaussian",
                "seed": 0,
                "length_factor": 1.0,
                "step": 10,
                "value": 0.9,
                "status": "TERMINATED",
            },
            {
                **common,
                "kernel_label": "Gaussian",
                "seed": 0,
                "length_factor": 2.0,
                "step": 10,
                "value": 0.95,
                "status": "TERMINATED",
            },
        ],
    )
    write_trial_rows(
        sweep_dir,
        "t2",
        [
            {
                **common,
                "kernel_label": "Biweight",
                "seed": 1,
                "length_factor": 1.0,
                "step": 5,
                "value": 0.97,
                "status": "RUNNING",
            },
            {
                **common,
                "kernel_label": "Biweight",
                "seed": 1,
                "length_factor": 1.0,
                "step": 10,
                "value": 0.93,
                "status": "RUNNING",
            },
        ],
    )
    error = "Traceback (most recent call last):\n  ...\nValueError: n_embd (17) must be divisible by n_head (2)\n"
    write_trial_rows(
        sweep_dir,
        "t3",
        [{**common, "kernel_label": "Gaussian", "seed": 2, "status": "ERROR", "error": error}],
    )
    done = invoke("status", sweep_dir)
    assert done.exit_code == 0, done.output
    assert (
        done.output.splitlines()
        == [
            f"{sweep_dir}: 3 trials — 1 ERROR, 1 RUNNING, 1 TERMINATED",
            # a failed trial's reason: the last line of its error
            "failed: Gaussian, seed 2 (trial t3): ValueError: n_embd (17) must be divisible by n_head (2)",
            "best exact_match at 1×: 0.93  Biweight, seed 1, sort (trial t2, step 10)",  # last evaluations only
        ]
    )
    missing = invoke("status", tmp_path)
    assert missing.exit_code == 2 and "is not a sweep folder" in missing.output


@pytest.mark.slow
def test_a_failing_trial_ends_failed_with_its_error_and_the_sweep_goes_on(tmp_path, write_sweep):
    """A trial that fails on every attempt (its model cannot hold the task's vocabulary): retried
    `max_failures` times, then FAILED in MLflow with the error, and in results.parquet even though it
    never reported; the other trial finishes and the table is written."""
    from mlflow import MlflowClient

    from analysis.results_store import read_results

    spec = {
        "name": "failing",
        "max_failures": 1,
        "base": tiny_trial(
            eval_examples=10, max_steps=20, batch_size=4, warmup_steps=2, eval_interval=10
        ),
        "kernels": ["softmax"],
        "grid": {"model.vocab_size": [None, 2]},
    }
    done = mosaic_sweep("run", write_sweep(spec, "failing"), cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "trials: 1 ERROR, 1 TERMINATED" in done.stdout
    # the progress line names it
    assert "failed" in done.stderr and "model.vocab_size=2" in done.stderr
    # an expected failure: its traceback is in MLflow, not on the terminal
    assert "Traceback" not in done.stderr

    error = "ValueError: model.vocab_size (2) is smaller than the task's vocabulary (8)"
    results = read_results(tmp_path / "sweeps" / "failing")
    failed = results[results["status"] == "ERROR"]
    assert (
        len(failed) == 1 and failed["error"].iloc[0] == error and pd.isna(failed["metric"].iloc[0])
    )
    assert (results.loc[results["status"] == "TERMINATED", "error"].isna()).all()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    run = next(r for r in runs if r.info.run_id == failed["mlflow_run_id"].iloc[0])
    assert run.info.status == "FAILED" and run.data.tags["error"] == error
    assert run.data.tags["ray.retries"] == "1"  # one retry (max_failures: 1), then given up
    # the whole traceback
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["error.txt"]
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    assert parent.info.status == "FAILED"
    status = invoke("status", tmp_path / "sweeps" / "failing")
    assert status.output.splitlines()[0].endswith("2 trials — 1 ERROR, 1 TERMINATED")


def served_json(ui_args: list[str | Path], path: str) -> object:
    """`mosaic-sweep ui ARGS` on a free port: the JSON its server answers at `path`, once it is up."""
    import json
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        mosaic_sweep_command("ui", *ui_args, "--port", port),
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}{path}", timeout=5
                ) as response:
                    return json.load(response)
            except OSError:
                assert server.poll() is None and time.time() < deadline, (
                    server.stdout.read() if server.poll() else "timeout"
                )
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        _check_closed(port)


def _check_closed(port: int) -> None:
    """Nothing listens on `port` any more: stopping `mosaic-sweep ui` stopped its server."""
    import socket
    import time

    deadline = time.time() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return
        assert time.time() < deadline, f"a server still listens on {port} after `ui` stopped"
        time.sleep(0.5)


def test_ui_serves_the_sweeps_tracking_store_on_localhost(tmp_path):
    from mlflow import MlflowClient

    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    MlflowClient(tracking_uri=default_tracking_uri(sweeps)).create_experiment("mine")
    answer = served_json([sweeps], "/api/2.0/mlflow/experiments/get-by-name?experiment_name=mine")
    assert answer["experiment"]["name"] == "mine"

    missing = mosaic_sweep("ui", tmp_path / "nothing-here", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        f"error: {tmp_path / 'nothing-here'} holds no mlflow.db and is not a sweep "
        "folder; give the folder that `mosaic-sweep run` wrote"
    ]


def test_ui_optuna_serves_the_search_study_on_localhost(tmp_path):
    import optuna

    sweep_dir = tmp_path / "search"
    sweep_dir.mkdir()
    study = optuna.create_study(study_name="mine", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    studies = served_json([sweep_dir, "--optuna"], "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["mine"]

    missing = mosaic_sweep("ui", tmp_path, "--optuna", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith(
        f"error: {tmp_path} holds no optuna.db"
    )


@pytest.mark.slow
def test_a_suggestion_that_makes_an_invalid_config_fails_alone(tmp_path, write_sweep):
    """n_embd in [16, 18] with 2 heads: both ends are valid, 17 is not. Its trial fails with the
    reason (one line), its MLflow run and results row say so, the other suggestions run; no
    numpy or Optuna warning about its missing value reaches the console."""
    from analysis.results_store import read_results

    spec = {
        "name": "odd",
        "base": tiny_trial(
            eval_examples=10, max_steps=10, batch_size=4, warmup_steps=2, eval_interval=10
        ),
        "kernels": ["softmax"],
        "max_failures": 0,
        "search": {
            "metric": "train_loss",
            "mode": "min",
            "n_trials": 3,
            "sampler": "random",
            "sampler_seed": 1,
            "space": {"model.n_embd": {"int": [16, 18]}},
        },
    }
    done = mosaic_sweep("run", write_sweep(spec, "odd"), cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "Mean of empty slice" not in console and "is not acceptable" not in console
    results = read_results(tmp_path / "sweeps" / "odd")
    by_status = results.groupby("status")["searched"].agg(set).to_dict()
    assert by_status["ERROR"] == {'{"model.n_embd": 17}'}
    assert by_status["TERMINATED"] and '{"model.n_embd": 17}' not in by_status["TERMINATED"]
    errors = set(results.loc[results["status"] == "ERROR", "error"])
    assert errors == {
        "ValueError: the suggested config: model: n_embd (17) must be divisible by n_head (2)"
    }


def assert_link_opens_on_the_trials(client, experiment_id, sweep_dir, children):
    """`mosaic-sweep ui`'s link: the model-training runs page opening the view it saved in the
    experiment, filtered to this sweep's trials and ordered by exact match at 1x, best first, as
    MLflow's own search applies its filter and order, with the columns that tell trials apart."""
    from orchestrator.mlflow_ui import sweep_links

    (links,) = sweep_links(sweep_dir.parent, client.tracking_uri, "http://127.0.0.1:5000").values()
    link = links.trials
    page, query = urlsplit(link).fragment.split("?")
    query = parse_qs(query)
    assert page == f"/experiments/{experiment_id}/runs"
    assert query["workflowType"] == ["machine_learning"]
    (key,) = query["viewStateShareKey"]
    tags = client.get_experiment(experiment_id).tags
    view = json.loads(tags[f"{SHARED_VIEW_TAG_PREFIX}{key}"])
    assert view["orderByKey"] == "metrics.`exact_match_1x`" and view["orderByAsc"] is False
    assert view["selectedColumns"] == [
        "tags.`kernel_label`",
        "params.`model.kernel_params.alpha`",
        "params.`seed`",
        "metrics.`exact_match_1x`",
        "metrics.`exact_match_2x`",
        "metrics.`train_loss`",
        "attributes.`Duration`",
    ]
    found = client.search_runs(
        [experiment_id], view["searchFilter"], order_by=["metrics.`exact_match_1x` DESC"]
    )
    assert sorted(run.info.run_id for run in found) == sorted(c.info.run_id for c in children)
    values = [run.data.metrics["exact_match_1x"] for run in found]
    assert values == sorted(values, reverse=True)
    assert_charts_link_opens_the_comparison(links.charts, tags, view)


def assert_charts_link_opens_the_comparison(link, tags, trials_view):
    """The same trials in MLflow's chart view, the seeds of each kernel grouped (one colour each;
    the smoke sweep varies nothing else every trial has: α only the α-entmax trials have):
    first a parallel-coordinates chart over train_loss and the headline metric per length, then
    each of them per step."""
    page, query = urlsplit(link).fragment.split("?")
    query = parse_qs(query)
    assert query["workflowType"] == ["machine_learning"] and query["compareRunsMode"] == ["CHART"]
    (key,) = query["viewStateShareKey"]
    view = json.loads(tags[f"{SHARED_VIEW_TAG_PREFIX}{key}"])
    assert {name: view[name] for name in trials_view} == trials_view
    parallel, *curves = view["compareRunCharts"]
    assert parallel["type"] == "PARALLEL"
    assert parallel["selectedParams"] == []
    assert parallel["selectedMetrics"] == ["train_loss", "exact_match_1x", "exact_match_2x"]
    assert [(chart["type"], chart["metricKey"]) for chart in curves] == [
        ("LINE", "train_loss"),
        ("LINE", "exact_match_1x"),
        ("LINE", "exact_match_2x"),
    ]
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "kernel_label"}]


def test_overrides_change_the_sweep_and_are_recorded(fake_run_sweep, tmp_path):
    """train.lr lands in base, grid.seed in the grid, kernels replaces the list; launch.json keeps them."""
    overrides = ["train.lr=1e-3", "grid.seed=[0,1,2]", "kernels=[softmax,biweight]"]
    assert invoke("run", "smoke", *overrides).exit_code == 0
    (sweep,) = fake_run_sweep.sweeps
    assert [(t.config.model.kernel, t.config.seed) for t in sweep.trials] == [
        (kernel, seed) for kernel in ("softmax", "entmax") for seed in (0, 1, 2)
    ]
    assert {t.config.train.lr for t in sweep.trials} == {0.001}
    launch = json.loads((tmp_path / "sweeps" / "smoke" / "launch.json").read_text())
    assert launch["overrides"] == overrides


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr=abc", "smoke.yaml train.lr=abc: base.train.lr: Input should be a valid number"),
        ("train.lrr=1", "unknown key 'base.train.lrr'; allowed: max_steps"),
        ("kernels=[softmax,gausian]", "kernels[1]: unknown kernel 'gausian'"),
        ("kernels.alpha=1", "kernels.alpha=1: kernels is not a mapping in the sweep file"),
        ("train.lr", "train.lr: an override is KEY=VALUE"),
        ("train.lr=.nan", "override: train.lr: nan is not a finite number"),
        ("train.lr=[1", "train.lr=[1: the value is not YAML"),
    ],
)
def test_a_bad_override_is_refused_in_one_line(fake_run_sweep, tmp_path, override, named):
    done = invoke("run", "smoke", override)
    assert done.exit_code == 2 and named in done.stderr
    assert done.stderr.count("\n") == 1 and not fake_run_sweep.calls
    assert not (tmp_path / "sweeps").exists()


def test_resume_keeps_the_overrides_and_refuses_others(fake_run_sweep, tmp_path):
    import orchestrator.launch

    assert invoke("run", "smoke", "train.lr=1e-3").exit_code == 0
    refused = invoke("run", "smoke", "train.lr=5e-4", "--resume")
    assert refused.exit_code == 2
    assert "ran with the overrides train.lr=1e-3, not train.lr=5e-4" in refused.stderr
    # given none, a resume runs the sweep with the ones it was launched with
    sweep_dir = Path("sweeps") / "smoke"
    orchestrator.launch.check_flags(
        sweep_dir, resume=True, overwrite=False, storage=None, mlflow_uri=None, overrides=[]
    )
    assert orchestrator.launch.recorded_overrides(sweep_dir) == ["train.lr=1e-3"]


@pytest.mark.slow
def test_a_sweep_on_a_tracking_server_prints_only_model_training_links(tmp_path):
    """Logged to a tracking server (`mlflow ui` on a store of its own), the run prints the link to
    its trials in model-training mode and none of MLflow's own run links (GenAI pages)."""
    import socket
    import time
    import urllib.request

    from orchestrator.mlflow_ui import ui_command

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = f"sqlite:///{tmp_path / 'server.db'}"
    server = subprocess.Popen(ui_command(store, port), cwd=tmp_path, env=clean_environment())
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline
                time.sleep(0.5)
        spec = tmp_path / "tiny.yaml"
        spec.write_text(yaml.safe_dump(tiny_smoke(yaml.safe_load(SMOKE_YAML.read_text()))))
        uri = f"http://127.0.0.1:{port}"
        done = mosaic_sweep("run", spec, "--mlflow-uri", uri, cwd=tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "View run" not in done.stdout + done.stderr
    (link,) = [line for line in done.stdout.splitlines() if line.startswith("its trials in MLflow")]
    assert link.startswith(f"its trials in MLflow: {uri}/#/experiments/")
    assert "workflowType=machine_learning&viewStateShareKey=" in link
    assert "&compareRunsMode=CHART" in done.stdout


def test_a_resume_names_the_trials_that_restart_from_scratch(fake_run_sweep, monkeypatch):
    """Trials interrupted (t1) or killed (t2, still RUNNING) before their first evaluation, and
    with it their first checkpoint, start again from step 0: one line names them; a trial that
    evaluated (t3) continues from its checkpoint, a finished one (t4) is not run."""
    from analysis.results_store import write_trial_rows
    from orchestrator import launch

    assert invoke("run", "smoke").exit_code == 0
    base = {"task": "sort", "kernel": "softmax", "kernel_label": "Gaussian", "step": 5}
    for trial_id, seed, status, metric in [
        ("t1", 0, "INTERRUPTED", "train_loss"),
        ("t2", 1, "RUNNING", "train_loss"),
        ("t3", 2, "INTERRUPTED", "exact_match"),
        ("t4", 3, "TERMINATED", "train_loss"),
    ]:
        row = {**base, "trial_id": trial_id, "seed": seed, "status": status, "metric": metric}
        write_trial_rows(Path("sweeps/smoke"), trial_id, [row])
    monkeypatch.setattr(launch, "holds_tune_state", lambda launch_record: True)
    resumed = invoke("run", "smoke", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stderr.splitlines()[0] == (
        "restarting from scratch (interrupted before their first checkpoint): "
        "Gaussian seed=0, Gaussian seed=1"
    )

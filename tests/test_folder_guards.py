"""What guards a sweep or run folder: every file the tool writes there replaces a symlink planted in
its place instead of writing through it, and one driver at a time runs a sweep folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.results_store import write_trial_rows
from orchestrator.driver_lock import hold_driver_lock
from orchestrator.run_folder import METRICS, record_evaluation
from orchestrator.sweep import write_tables
from orchestrator.sweep_folder import (
    DRIVER_LOCK,
    LAUNCH,
    PLOTS,
    RUN_MAP,
    TABLE,
    RunMap,
    SweepFolder,
    SweepFolderError,
    comparison_file,
)
from search_spaces.expand import validate_sweep

from helpers import SMOKE_YAML, invoke, mosaic_sweep

PRECIOUS = "precious: not the tool's to write"


def sweep_with_results(folder: Path) -> Path:
    """A sweep folder of sort results at 1× and 2×, two kernels, two seeds each."""
    for number, (label, seed, value) in enumerate(
        [("Gaussian", 0, 0.9), ("Gaussian", 1, 0.8), ("Triweight", 0, 0.7), ("Triweight", 1, 0.6)]
    ):
        rows = [
            dict(task="sort", kernel_label=label, seed=seed, metric="exact_match",
                 length_factor=factor, step=10, value=value / factor, status="TERMINATED")
            for factor in (1.0, 2.0)
        ]  # fmt: skip
        write_trial_rows(folder, f"t{number}", rows)
    return folder


def plant(link: Path, outside: Path) -> Path:
    """A symlink at `link` to a file outside the folder that holds something of the user's."""
    outside.write_text(PRECIOUS)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    return outside


def assert_replaced_not_followed(link: Path, outside: Path) -> None:
    assert outside.read_text() == PRECIOUS
    assert not link.is_symlink() and link.is_file()


def test_compare_table_and_plot_replace_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    sweep = sweep_with_results(tmp_path / "sweep")
    outside = tmp_path / "outside"
    outside.mkdir()
    links = {
        "compare": [sweep / comparison_file("table2", suffix) for suffix in (".md", ".csv")],
        "table": [sweep / TABLE],
        "plot": [sweep / "plots" / "exact_match_vs_length.png"],
    }
    commands = {
        "compare": ["compare", sweep, "--paper", "table2"],
        "table": ["table", sweep, "--out", sweep / TABLE],
        "plot": ["plot", sweep],
    }
    for name, paths in links.items():
        targets = [plant(path, outside / f"{path.name}.mine") for path in paths]
        done = invoke(*commands[name])
        assert done.exit_code == 0, done.output
        for path, target in zip(paths, targets):
            assert_replaced_not_followed(path, target)
    assert len(list(outside.iterdir())) == 4


def test_the_sweep_folders_records_replace_a_planted_symlink(tmp_path):
    folder = SweepFolder(tmp_path, None)  # type: ignore[arg-type]
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"
    link = tmp_path / RUN_MAP
    plant(link, outside)
    folder.save_run_map(RunMap(parent="p", trials={"t": "r"}))
    assert_replaced_not_followed(link, outside)
    assert json.loads(link.read_text())["parent"] == "p"


def test_a_run_folders_metrics_never_append_through_a_symlink(tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    plant(tmp_path / METRICS, outside)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(OSError):
        record_evaluation(tmp_path, {"step": 1.0}, str(tmp_path / "ckpt"))
    assert outside.read_text() == PRECIOUS


def test_write_tables_replaces_planted_symlinks(tmp_path):
    """The tables a run ends with (table.md, table-<layout>.tex/.csv)."""
    sweep = validate_sweep(yaml.safe_load(SMOKE_YAML.read_text()), "smoke.yaml")
    results = pd.concat(
        [pd.read_parquet(part) for part in (sweep_with_results(tmp_path / "s")).rglob("*.parquet")]
    )
    outside = tmp_path / "outside.md"
    link = tmp_path / "s" / TABLE
    plant(link, outside)
    _, written = write_tables(sweep, results, tmp_path / "s")
    assert link in written
    assert_replaced_not_followed(link, outside)


HOLD = """
import sys
from pathlib import Path
from orchestrator.driver_lock import hold_driver_lock
hold_driver_lock(Path(sys.argv[1]))
print((Path(sys.argv[1]) / "driver.lock").read_text(), flush=True)
sys.stdin.read()
"""


def first_driver(sweep_dir: Path) -> subprocess.Popen[str]:
    """A process holding the sweep folder's lock as a running driver does, until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(sweep_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().split() == [socket.gethostname(), str(process.pid)]
    return process


@pytest.mark.parametrize("how", [["--resume"], ["--overwrite"], []])
def test_a_second_driver_on_a_running_sweep_folder_is_refused_naming_the_first(tmp_path, how):
    sweep_dir = tmp_path / "sweeps" / "smoke"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / LAUNCH).write_text(PRECIOUS)
    first = first_driver(sweep_dir)
    try:
        second = mosaic_sweep("run", "smoke", "--out", sweep_dir, *how, cwd=tmp_path)
    finally:
        first.communicate(timeout=30)
    assert second.returncode == 2, second.stderr
    assert second.stdout == ""
    assert second.stderr.splitlines() == [
        f"error: {sweep_dir} is being run by pid {first.pid} on {socket.gethostname()} (it holds "
        f"its {DRIVER_LOCK}); one driver per sweep folder: wait for it to end, or stop it "
        "and then --resume"
    ]
    assert sorted(path.name for path in tmp_path.rglob("*")) == [
        DRIVER_LOCK,
        LAUNCH,
        "smoke",
        "sweeps",
    ]
    assert (sweep_dir / LAUNCH).read_text() == PRECIOUS


def test_the_lock_of_a_driver_that_died_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / DRIVER_LOCK).write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")
    # the probe before Ray lets the next driver through: this refusal is the next check's
    refused = mosaic_sweep("run", "smoke", "--out", tmp_path, "--resume", cwd=tmp_path)
    assert "holds no sweep to resume" in refused.stderr
    first_driver(tmp_path).communicate(timeout=30)


def test_while_a_driver_runs_a_sweep_a_second_one_is_refused(tmp_path, monkeypatch):
    """The first driver is this process's `run` (its trials replaced by a second `run --resume`
    of the same folder, as a user starts it in another terminal): refused, naming this process."""
    import orchestrator.sweep

    seconds = []

    def run_sweep(sweep, folder, **how):
        seconds.append(mosaic_sweep("run", "smoke", "--out", folder.path, "--resume", cwd=tmp_path))
        return orchestrator.sweep.SweepOutcome(folder.path, "", "parent", "uri", {"TERMINATED": 6})

    monkeypatch.setattr(orchestrator.sweep, "run_sweep", run_sweep)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    first = invoke("run", "smoke", "--out", "sweeps/smoke")
    assert first.exit_code == 0, first.output
    (second,) = seconds
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.startswith(
        f"error: sweeps/smoke is being run by pid {os.getpid()} on {socket.gethostname()} "
    )
    assert len(second.stderr.splitlines()) == 1


def test_a_symlink_planted_as_the_lock_is_refused_not_followed(tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.lock"
    plant(tmp_path / DRIVER_LOCK, outside)
    with pytest.raises(SweepFolderError, match="cannot lock .*driver.lock"):
        hold_driver_lock(tmp_path)
    assert outside.read_text() == PRECIOUS


def test_a_symlink_planted_as_the_plots_folder_is_replaced_by_a_real_one(tmp_path):
    sweep = sweep_with_results(tmp_path / "sweep")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (sweep / PLOTS).symlink_to(outside)
    done = invoke("plot", sweep)
    assert done.exit_code == 0, done.output
    assert not (sweep / PLOTS).is_symlink() and list((sweep / PLOTS).glob("*.png"))
    assert list(outside.iterdir()) == []

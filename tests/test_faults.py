"""Faults a sweep meets and `--resume` heals: a corrupt results part, a lost MLflow store, a corrupt
checkpoint, a locked MLflow store, a full disk. Each ends with the table an uninterrupted sweep
gives, every trial once in the results store and in MLflow, no run left RUNNING."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from ray.train import Checkpoint, CheckpointConfig
from ray.train._internal.session import _TrainingResult
from ray.train._internal.storage import StorageContext
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial

from analysis.results_store import read_results
from mosaic_core.checkpoint import FILENAME, first_loadable, save_checkpoint
from mosaic_core.config import TrialConfig
from mosaic_core.model import MemoryMosaics
from orchestrator.checkpoint_records import repair_checkpoint_record, surviving_checkpoint
from orchestrator.faults import DiskFullError, disk_full, stop_for
from orchestrator.sweep_folder import TUNE, TUNE_STATE_BACKUP
from orchestrator.tracking import runs
from orchestrator.tracking.names import ERROR_TAG, PARENT_TAG, TRIAL_ID_TAG
from orchestrator.trainables import resume_point

from helpers import clean_environment, mosaic_sweep, mosaic_sweep_command, tiny_trial

NAME = "fault"
TRIALS = 4
SWEEP = {
    "name": NAME,
    "base": tiny_trial(max_steps=120, eval_interval=40),
    "kernels": ["softmax", "sparsemax"],
    "grid": {"seed": [0, 1]},
}


def run_command(*args: str) -> list[str]:
    return mosaic_sweep_command("run", f"{NAME}.yaml", "--out", f"sweeps/{NAME}", *args)


_DRIVERS: list[subprocess.Popen[str]] = []


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """The sweep's driver, in its own process group (to be stopped with the Ray it starts)."""
    (cwd / f"{NAME}.yaml").write_text(yaml.safe_dump(SWEEP))
    driver = subprocess.Popen(
        run_command(*args),
        cwd=cwd,
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _DRIVERS.append(driver)
    return driver


@pytest.fixture(autouse=True)
def no_driver_left() -> Iterator[None]:
    """A test that fails half-way leaves no sweep running."""
    yield
    while _DRIVERS:
        driver = _DRIVERS.pop()
        if driver.poll() is None:
            kill(driver)


def resume(cwd: Path) -> subprocess.CompletedProcess[str]:
    return mosaic_sweep(
        "run", f"{NAME}.yaml", "--out", f"sweeps/{NAME}", "--resume", cwd=cwd, timeout=400
    )


def wait_for(condition: Callable[[], bool], driver: subprocess.Popen[str]) -> None:
    deadline = time.time() + 240
    while not condition():
        assert driver.poll() is None, "the sweep ended before the fault: " + driver.stderr.read()
        assert time.time() < deadline, "the sweep never got there"
        time.sleep(0.2)


def kill(driver: subprocess.Popen[str]) -> None:
    """SIGKILL the driver and the Ray processes it started."""
    os.killpg(driver.pid, signal.SIGKILL)
    driver.communicate()


def finished_trials(sweep_dir: Path) -> set[str]:
    if not (sweep_dir / "results.parquet").is_dir():
        return set()
    results = read_results(sweep_dir)
    return set(results.loc[results["status"] == "TERMINATED", "trial_id"])


def first_checkpoint_only(sweep_dir: Path) -> set[str]:
    """The trials with their first checkpoint (step 40) and not yet a second in Tune's storage."""
    tune = sweep_dir / "tune"
    return {
        path.parent.name
        for path in tune.glob("*/checkpoint_000000")
        if not (path.parent / "checkpoint_000001").exists()
    }


def saved_as_finished(sweep_dir: Path) -> set[str]:
    """The trials Tune's newest saved experiment state holds as TERMINATED (it saves it every few
    seconds, so a trial can finish in the results before it does there)."""
    states = sorted((sweep_dir / "tune").glob("experiment_state-*.json"))
    try:
        trials = [
            json.loads(entry[0]) for entry in json.loads(states[-1].read_text())["trial_data"]
        ]
    except (IndexError, ValueError, OSError):
        return set()
    return {trial["trial_id"] for trial in trials if trial.get("status") == "TERMINATED"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The table of the sweep run without a fault."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    driver = start(cwd)
    stdout, stderr = driver.communicate(timeout=400)
    assert driver.returncode == 0, stderr[-3000:]
    return (cwd / "sweeps" / NAME / "table.md").read_text()


def assert_whole(
    cwd: Path, table: str, tracking_uri: str | None = None, last_only: frozenset[str] = frozenset()
) -> None:
    """The sweep in `cwd` ended as an uninterrupted one: its table, each trial once in the results
    store and in MLflow, every run FINISHED; every evaluation of each trial, but the last alone of
    those in `last_only` (rebuilt from their checkpoints)."""
    sweep_dir = cwd / "sweeps" / NAME
    assert (sweep_dir / "table.md").read_text() == table
    results = read_results(sweep_dir)
    assert results["trial_id"].nunique() == TRIALS and set(results["status"]) == {"TERMINATED"}
    assert not results.duplicated(["trial_id", "metric", "length_factor", "step"]).any()
    evaluations = results[(results["metric"] == "exact_match") & (results["length_factor"] == 1)]
    steps = evaluations.groupby("trial_id")["step"].apply(sorted)
    assert {trial: steps[trial] for trial in last_only} == {trial: [120] for trial in last_only}
    assert steps.drop(list(last_only)).tolist() == [[40, 80, 120]] * (TRIALS - len(last_only))
    client = MlflowClient(tracking_uri or f"sqlite:///{cwd / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    children = [run for run in runs if PARENT_TAG in run.data.tags]
    assert [run.info.status for run in parents] == ["FINISHED"]
    assert sorted(run.data.tags[TRIAL_ID_TAG] for run in children) == sorted(
        results["trial_id"].unique()
    )
    assert {run.info.status for run in children} == {"FINISHED"}
    # each run the one its rows name, with one point per evaluation
    assert set(results["mlflow_run_id"]) == {run.info.run_id for run in children}
    for run in children:
        history = client.get_metric_history(run.info.run_id, "exact_match_1x")
        assert sorted(m.step for m in history) == steps[run.data.tags[TRIAL_ID_TAG]]


# torch's first sentence about a truncated checkpoint
CORRUPT = "PytorchStreamReader failed reading zip archive: failed finding central directory"


@pytest.mark.slow
def test_corrupt_results_parts_and_checkpoints_are_set_aside_and_rebuilt(tmp_path, uninterrupted):
    """A corrupt part file is moved aside and its trial's rows rebuilt from its MLflow run; a
    corrupt checkpoint gives way to the one Tune kept before it, or to a start from scratch."""
    sweep_dir = tmp_path / "sweeps" / NAME
    driver = start(tmp_path)
    # one trial finished, one with its first checkpoint only: 80 steps from its end, so still
    # under way when Ctrl-C lands
    wait_for(
        lambda: bool(finished_trials(sweep_dir)) and bool(first_checkpoint_only(sweep_dir)), driver
    )
    # Ctrl-C: Tune saves which checkpoint each trial is at
    driver.send_signal(signal.SIGINT)
    driver.communicate(timeout=120)
    finished = finished_trials(sweep_dir)
    # the checkpoint each unfinished trial resumes from, as Tune recorded it
    corrupted = {
        Path(trial.checkpoint.path) / FILENAME: int(trial.checkpoint.path[-6:])
        for trial in ExperimentAnalysis(str(sweep_dir / "tune")).trials
        if trial.checkpoint is not None and trial.trial_id not in finished
    }
    if not corrupted:
        # Tune registers a checkpoint after the trial wrote it; Ctrl-C can land in between
        pytest.skip("Ctrl-C landed before Tune had registered a checkpoint of an unfinished trial")
    # which of the two repairs each gets (the one before, or step 0) is asserted below; both
    # are also tested without Ray (test_a_restarted_trial_resumes_from_its_newest_readable_…)
    for path in corrupted:
        path.write_bytes(path.read_bytes()[:100])
    # the part of a finished trial and of one under way
    under_way = next(path.parent.parent.name for path in corrupted)
    parts = [
        sweep_dir / "results.parquet" / f"part-{trial}.parquet"
        for trial in (min(finished), under_way)
    ]
    for part in parts:
        part.write_bytes(b"not parquet")

    resumed = resume(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for part in parts:
        aside = part.with_name(f"_{part.name}.corrupt")
        said = f"{part.relative_to(tmp_path)}: not a readable results file"
        assert said in resumed.stderr and f"moved aside to {aside.name}" in resumed.stderr
        assert aside.read_bytes() == b"not parquet"
    for path, index in corrupted.items():
        instead = (
            f"continues from checkpoint_{index - 1:06d}"
            if index >= 1
            else "starts again from step 0"
        )
        said = [line for line in resumed.stderr.splitlines() if str(path) in line]
        assert len(said) == 1 and said[0].endswith(
            f" is unreadable: {CORRUPT}; the trial {instead}"
        ), resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert_whole(tmp_path, uninterrupted)


@pytest.mark.slow
def test_an_mlflow_store_deleted_mid_sweep_stops_it_and_resume_makes_it_again(
    tmp_path, uninterrupted
):
    """The store deleted while the sweep runs: the sweep stops in one paragraph; `--resume` makes
    the store again and logs every trial's run from its rows; a finished trial whose part file is
    lost too is rebuilt from its checkpoint (its last evaluation, which the table reads)."""
    sweep_dir = tmp_path / "sweeps" / NAME
    driver = start(tmp_path)
    # a trial finished in the results and in Tune's saved state, so the resume does not run it
    wait_for(lambda: bool(finished_trials(sweep_dir) & saved_as_finished(sweep_dir)), driver)
    lost = min(finished_trials(sweep_dir) & saved_as_finished(sweep_dir))
    (tmp_path / "sweeps" / "mlflow.db").unlink()
    stdout, stderr = driver.communicate(timeout=240)
    assert driver.returncode == 1, stderr[-3000:]
    assert "stopped: its MLflow store failed" in stdout and "--resume" in stdout
    assert "Traceback" not in stderr
    (sweep_dir / "results.parquet" / f"part-{lost}.parquet").write_bytes(b"")

    resumed = resume(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "holds no run" in resumed.stderr
    assert "logged again from the results store" in resumed.stderr
    assert "its step-120 evaluation is rebuilt from its checkpoint" in resumed.stderr
    assert re.search(r"\bRun\b.*not found", resumed.stderr + resumed.stdout) is None
    assert_whole(tmp_path, uninterrupted, last_only=frozenset([lost]))


def test_first_loadable_skips_unreadable_checkpoints_newest_first(tmp_path):
    config = TrialConfig.model_validate(tiny_trial(max_steps=10))
    model = MemoryMosaics(config.model, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path / f"checkpoint_{step}",
            config=config,
            step=step,
            model=model,
            optimizer=optimizer,
            metrics={},
        )
    newest_first = [tmp_path / f"checkpoint_{step}" for step in (3, 2, 1)]
    (newest_first[0] / FILENAME).write_bytes(b"")
    usable, reasons = first_loadable(newest_first, config)
    assert usable == newest_first[1] and len(reasons) == 1
    assert reasons[0].startswith(f"checkpoint {newest_first[0] / FILENAME} is unreadable")
    for directory in newest_first:
        (directory / FILENAME).write_bytes(b"junk")
    usable, reasons = first_loadable(newest_first, config)
    assert usable is None
    assert [reason.split(" is ")[0] for reason in reasons] == [
        f"checkpoint {directory / FILENAME}" for directory in newest_first
    ]


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    config = TrialConfig.model_validate(tiny_trial(max_steps=10))
    model = MemoryMosaics(config.model, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    saved = dict(config=config, model=model, optimizer=optimizer, metrics={})
    path = save_checkpoint(tmp_path, step=1, **saved)
    before = path.read_bytes()

    def disk_full(state, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, step=2, **saved)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


LOCK_S = 30


@pytest.mark.slow
def test_an_mlflow_store_locked_for_30_seconds_is_waited_out(tmp_path, uninterrupted):
    """Results keep reaching the results store while MLflow's waits, and the sweep ends whole."""
    sweep_dir = tmp_path / "sweeps" / NAME
    driver = start(tmp_path)
    wait_for(lambda: (sweep_dir / "results.parquet").is_dir(), driver)
    hold = (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        f"time.sleep({LOCK_S})\n"
        "db.execute('ROLLBACK')\n"
    )
    database = tmp_path / "sweeps" / "mlflow.db"
    locker = subprocess.Popen(
        [sys.executable, "-c", hold, str(database)], stdout=subprocess.PIPE, text=True
    )
    assert locker.stdout.readline() == "locked\n"
    rows_when_locked = len(read_results(sweep_dir))
    time.sleep(LOCK_S - 5)
    rows_before_unlocked = len(read_results(sweep_dir))
    assert locker.wait(timeout=60) == 0
    assert rows_before_unlocked > rows_when_locked
    stdout, stderr = driver.communicate(timeout=400)
    assert driver.returncode == 0, stderr[-3000:]
    assert "the MLflow store is locked by another process" in stderr
    assert "Traceback" not in stderr
    assert_whole(tmp_path, uninterrupted)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/sweeps` on a tmpfs of its own, which a test can fill; skipped where mounting is
    not permitted (not root, or a container without the capability)."""
    disk = tmp_path / "sweeps"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """A file that takes all the space left on `disk`."""
    filler = disk / "filler"
    with filler.open("wb") as file:
        try:
            while True:
                file.write(b"\0" * (1 << 20))
                file.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_in_one_paragraph_and_resume_continues(
    tmp_path, small_disk, uninterrupted
):
    sweep_dir = small_disk / NAME
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = start(tmp_path, "--mlflow-uri", tracking_uri)
    wait_for(lambda: bool(finished_trials(sweep_dir)), driver)
    filler = fill(small_disk)
    stdout, stderr = driver.communicate(timeout=240)
    assert driver.returncode == 1, stderr[-3000:]
    assert "stopped: a disk the sweep writes to is full" in stdout
    assert "No space left on device" in stdout, stdout[-1500:] + stderr[-3000:]
    assert f"--out {Path('sweeps') / NAME} --resume" in stdout
    assert f"{NAME}: " in stdout  # the table so far
    assert "Traceback" not in stderr
    client = MlflowClient(tracking_uri)
    children = [
        run
        for run in client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
        if PARENT_TAG in run.data.tags
    ]
    assert "RUNNING" not in {run.info.status for run in children}
    stopped = [run for run in children if run.info.status == "FAILED"]
    assert stopped and all("No space left" in run.data.tags[ERROR_TAG] for run in stopped)

    filler.unlink()
    # the race a full disk makes likely: Tune's copy of its state over the old one cut short; with
    # no whole copy kept, the resume is refused in a line, before anything changes
    backup = small_disk / NAME / TUNE_STATE_BACKUP
    kept = backup.read_bytes()
    backup.unlink()
    state = newest_tune_state(sweep_dir)
    torn = tear(state)
    refused = resume(tmp_path)
    assert refused.returncode == 2
    assert re.fullmatch(
        f"error: {re.escape(str(state))} is torn \\(JSONDecodeError: .+\\); no whole copy is "
        "kept: start the sweep under another --out",
        refused.stderr.strip(),
    ), refused.stderr
    assert state.read_bytes() == torn
    # with the copy the sweep keeps, put back: the sweep ends as if never stopped
    backup.write_bytes(kept)
    resumed = resume(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"put back from {TUNE_STATE_BACKUP}" in resumed.stderr
    assert_whole(tmp_path, uninterrupted, tracking_uri)


def newest_tune_state(sweep_dir: Path) -> Path:
    """The experiment state file Tune resumes from (the newest by name)."""
    return max((sweep_dir / TUNE).glob("experiment_state-*.json"))


def tear(path: Path) -> bytes:
    """`path` cut to half its length, as a copy over it stopped by a full disk leaves it."""
    torn = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(torn)
    return torn


def test_a_busy_store_is_tried_again_and_any_other_error_raised_at_once(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    calls = []

    @runs.retried
    def write(outcome: list[Exception | None]) -> str:
        calls.append(1)
        error = outcome.pop(0)
        if error is not None:
            raise error
        return "written"

    locked = MlflowException("(sqlite3.OperationalError) database is locked")
    assert write([locked, locked, None]) == "written" and waits == [1.0, 2.0]
    full = MlflowException("(sqlite3.OperationalError) database or disk is full")
    calls.clear()
    with pytest.raises(MlflowException, match="disk is full"):
        write([full, None])
    assert len(calls) == 1
    # a lock that outlasts the patience ends the wait
    monkeypatch.setattr(runs, "BUSY_STORE_PATIENCE_S", 5.0)
    with pytest.raises(MlflowException, match="locked"):
        write([locked] * 10)


def test_a_full_disk_is_told_by_the_line_that_says_so():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device")) == (
        "OSError: [Errno 28] No space left on device"
    )
    trial_error = (
        "Traceback (most recent call last):\n  File …\n"
        "OSError: [Errno 28] No space left on device: 'tune/x'"
    )
    try:
        try:
            raise DiskFullError(trial_error)
        except DiskFullError as error:
            raise RuntimeError("Tune stopped") from error
    except RuntimeError as error:
        assert disk_full(error) == "OSError: [Errno 28] No space left on device: 'tune/x'"
    store = MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: …]")
    assert disk_full(store) == "(sqlite3.OperationalError) database or disk is full"
    assert disk_full(ValueError("database is locked")) is None


def test_a_failed_mlflow_store_stops_a_sweep_and_a_bug_keeps_its_traceback():
    lost = MlflowException(
        "(raised as a result of Query-invoked autoflush)\n"
        "(sqlite3.OperationalError) attempt to write a readonly database\n(Background …)"
    )
    stop = stop_for(lost)
    assert stop is not None and stop.what == "its MLflow store failed"
    assert stop.line == "(sqlite3.OperationalError) attempt to write a readonly database"
    full = stop_for(OSError(errno.ENOSPC, "No space left on device"))
    assert full is not None and full.what == "a disk the sweep writes to is full"
    assert stop_for(KeyError("trial_id")) is None


def test_a_restarted_trial_resumes_from_its_newest_readable_checkpoint(tmp_path):
    config = TrialConfig.model_validate(tiny_trial(max_steps=10))
    model = MemoryMosaics(config.model, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    kept = [tmp_path / f"checkpoint_{index:06d}" for index in range(3)]
    for step, directory in enumerate(kept):
        save_checkpoint(
            directory, config=config, step=step, model=model, optimizer=optimizer, metrics={}
        )
    with resume_point(Checkpoint.from_directory(kept[2]), config) as (resume_from, fallback):
        assert (resume_from, fallback) == (str(kept[2]), None)
    (kept[2] / FILENAME).write_bytes(b"")
    with resume_point(Checkpoint.from_directory(kept[2]), config) as (resume_from, fallback):
        assert resume_from == str(kept[1])
        assert fallback.endswith("; the trial continues from checkpoint_000001")
    for directory in kept[:2]:
        (directory / FILENAME).write_bytes(b"")
    with resume_point(Checkpoint.from_directory(kept[2]), config) as (resume_from, fallback):
        assert resume_from is None
        assert fallback == (
            f"checkpoint {kept[2] / FILENAME} is unreadable: EOFError; "
            "the trial starts again from step 0"
        )


def registered(trial: Trial) -> None:
    """A checkpoint the trial's process wrote under the name Tune counts on to (a resumed trial's
    take the names they had), registered as Tune registers it."""
    index = trial.storage.current_checkpoint_index + 1
    path = Path(trial.storage.trial_fs_path) / f"checkpoint_{index:06d}"
    path.mkdir(parents=True, exist_ok=True)
    trial.on_checkpoint(_TrainingResult(Checkpoint.from_directory(path), {"step": 40 * index}))


def trial_with_checkpoints(tmp_path: Path, count: int) -> tuple[Trial, Path]:
    """A Tune trial keeping two checkpoints that registered `count`, and its folder."""
    storage = StorageContext(str(tmp_path), experiment_dir_name="tune", trial_dir_name="t")
    trial = Trial("fn", stub=True, storage=storage, checkpoint_config=CheckpointConfig(2))
    for _ in range(count):
        registered(trial)
    return trial, Path(storage.trial_fs_path)


def test_a_record_naming_checkpoints_tune_deleted_is_made_to_match_the_trials_folder(tmp_path):
    trial, folder = trial_with_checkpoints(tmp_path, 4)
    assert sorted(path.name for path in folder.iterdir()) == [
        "checkpoint_000002",
        "checkpoint_000003",
    ]
    assert repair_checkpoint_record(trial) is None  # the record matches: left alone
    # what the killed driver's newer record had done after it saved this one: 4 and 5 written,
    # 2 and 3 deleted
    for index in (4, 5):
        (folder / f"checkpoint_{index:06d}").mkdir()
    for index in (2, 3):
        (folder / f"checkpoint_{index:06d}").rmdir()
    line = repair_checkpoint_record(trial)
    assert line == (
        "Tune had deleted checkpoint_000003, the checkpoint it saved; "
        "the trial continues from checkpoint_000004"  # the oldest after it, whose results were seen
    )
    assert trial.checkpoint.path == str(folder / "checkpoint_000004")
    for _ in range(2):  # numbered on from the survivor; Tune's deletions find what they delete
        registered(trial)
    assert sorted(path.name for path in folder.iterdir()) == [
        "checkpoint_000005",
        "checkpoint_000006",
    ]


def test_a_record_naming_an_older_checkpoint_tune_deleted_drops_it_and_keeps_its_latest(tmp_path):
    trial, folder = trial_with_checkpoints(tmp_path, 2)
    # what the killed driver's newer record had done after it saved this one: 2 written, 0 deleted
    (folder / "checkpoint_000002").mkdir()
    (folder / "checkpoint_000000").rmdir()
    assert repair_checkpoint_record(trial) is None  # its latest is there: it goes on from it
    assert trial.checkpoint.path == str(folder / "checkpoint_000001")
    for _ in range(2):  # Tune deletes what its record holds, 0 no more (it raised before)
        registered(trial)
    assert sorted(path.name for path in folder.iterdir()) == [
        "checkpoint_000002",
        "checkpoint_000003",
    ]


def test_the_surviving_checkpoint_is_the_oldest_after_the_deleted_one_else_the_newest_before(
    tmp_path,
):
    def surviving(index: int) -> str | None:
        checkpoint = surviving_checkpoint(
            Checkpoint.from_directory(tmp_path / f"checkpoint_{index:06d}")
        )
        return checkpoint and Path(checkpoint.path).name

    assert surviving(3) is None  # an empty folder
    for index in (1, 10, 11):  # 10 after 9: by index, not by name alone
        (tmp_path / f"checkpoint_{index:06d}").mkdir()
    assert surviving(10) == "checkpoint_000010"  # there: itself
    assert surviving(3) == "checkpoint_000010"
    assert surviving(12) == "checkpoint_000011"

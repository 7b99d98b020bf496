"""Tune's driver state kept whole (`orchestrator.tune_state`): a save kept once Tune has written it
whole, never a torn one; put back over a torn or mixed state before a resume; a torn state with
no whole copy refused."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray import cloudpickle

from orchestrator.sweep_folder import TUNE_STATE_SET_ASIDE, SweepFolderError
from orchestrator.tune_state import TuneStateBackup, check_whole, restore, torn

OLD, SESSION, LATER = "2026-12-07_10-00-00", "2026-12-07_11-00-00", "2026-12-07_12-00-00"


def save(folder: Path, session: str, trials: int) -> dict[str, bytes]:
    """The files one save of Tune's writes (as Tune writes them: its state JSON, its searcher's
    and callbacks' pickles), for a sweep of `trials` trials."""
    files = {
        f"experiment_state-{session}.json": json.dumps(
            {"trial_data": [{"trial_id": f"t{i}"} for i in range(trials)]}
        ).encode(),
        f"basic-variant-state-{session}.json": cloudpickle.dumps({"_counter": trials}),
        f"callback-states-{session}.pkl": cloudpickle.dumps({0: None, 1: {"done": trials}}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, contents in files.items():
        (folder / name).write_bytes(contents)
    return files


def kept(backup: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(backup) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_a_whole_file_passes_and_a_cut_one_is_told_by_its_reader():
    state = json.dumps({"trial_data": [1, 2, 3]}).encode()
    searcher = cloudpickle.dumps({"_counter": 3})
    assert torn(f"experiment_state-{SESSION}.json", state) is None
    assert torn(f"basic-variant-state-{SESSION}.json", searcher) is None
    assert torn(f"experiment_state-{SESSION}.json", state[:-1]).startswith("JSONDecodeError: ")
    assert (
        torn(f"basic-variant-state-{SESSION}.json", searcher[:-1])
        == "ValueError: pickle exhausted before seeing STOP"
    )


def test_each_new_whole_save_is_kept_once_and_a_torn_one_never(tmp_path):
    staging, backup = tmp_path / "staging", tmp_path / "tune-state.zip"
    trials = [SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))]
    callback = TuneStateBackup(str(backup))
    callback.on_step_end(0, [])  # no trial yet: nothing known, nothing kept
    assert not backup.exists()

    save(staging, OLD, 1)  # the save this sweep was resumed from (Tune copies it down)
    first = save(staging, SESSION, 2)
    (staging / f".1234-tmp-searcher-state-{SESSION}.pkl").write_bytes(b"half")  # being written
    callback.on_step_end(1, trials)
    assert kept(backup) == first
    inode = backup.stat().st_ino
    callback.on_step_end(2, trials)  # a step without a save: not written again
    assert backup.stat().st_ino == inode

    second = save(staging, SESSION, 3)
    state = staging / f"experiment_state-{SESSION}.json"
    state.write_bytes(second[state.name][:-5])  # Tune's staging disk full while it wrote
    callback.on_step_end(3, trials)
    assert kept(backup) == first
    state.write_bytes(second[state.name])
    callback.on_experiment_end(trials)
    assert kept(backup) == second


def test_a_torn_or_mixed_state_is_put_back_from_the_last_whole_save(tmp_path):
    tune, backup = tmp_path / "tune", tmp_path / "tune-state.zip"
    whole = save(tune, SESSION, 3)
    callback = TuneStateBackup(str(backup))
    callback.on_experiment_end(
        [SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(tune)))]
    )
    assert restore(backup, tune) is None  # the same: left alone

    # a copy over the stored state stopped half-way: one file torn, one of an older save
    state = tune / f"experiment_state-{SESSION}.json"
    state.write_bytes(whole[state.name][:10])
    save(tmp_path / "older", SESSION, 2)
    searcher = f"basic-variant-state-{SESSION}.json"
    (tune / searcher).write_bytes((tmp_path / "older" / searcher).read_bytes())
    # and a later driver's first save, torn
    later = tune / f"experiment_state-{LATER}.json"
    later.write_bytes(b'{"trial_da')
    line = restore(backup, tune)
    assert line == (
        f"Tune's saved state in {tune} was cut short (a full disk, or a driver killed while it "
        f"saved): its last whole save ({SESSION}) put back from tune-state.zip, 1 file(s) of a "
        f"later one moved to {TUNE_STATE_SET_ASIDE}/"
    )
    assert {path.name: path.read_bytes() for path in tune.iterdir()} == whole
    assert (tmp_path / TUNE_STATE_SET_ASIDE / later.name).read_bytes() == b'{"trial_da'
    check_whole(tune)
    assert restore(backup, tune) is None


def test_a_torn_state_without_a_whole_copy_is_refused_in_a_line(tmp_path, caplog):
    tune = tmp_path / "tune"
    files = save(tune, SESSION, 3)
    save(tune, OLD, 1)
    check_whole(tune)
    callbacks = tune / f"callback-states-{SESSION}.pkl"
    callbacks.write_bytes(files[callbacks.name][:-1])
    with pytest.raises(SweepFolderError) as refused:
        check_whole(tune)
    assert str(refused.value) == (
        f"{callbacks} is torn (ValueError: pickle exhausted before seeing STOP); the sweep keeps "
        "no whole copy: start it again with --overwrite"
    )
    backup = tmp_path / "tune-state.zip"
    assert restore(backup, tune) is None  # none kept: nothing to put back
    backup.write_bytes(b"PK\x03\x04 not a zip")  # one that cannot be read: said, then as none
    assert restore(backup, tune) is None
    assert f"{backup} is unreadable (File is not a zip file)" in caplog.text

"""Tune's driver state kept whole (`orchestrator.tune_state`): a save kept once Tune has written it
whole, never a torn or mixed one; put back over a torn or mixed state before a resume, else the
newest whole save in `tune/`; a torn state with no whole copy refused."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray import cloudpickle

from orchestrator.sweep_folder import TUNE_STATE_SET_ASIDE, SweepFolderError
from orchestrator.tune_state import TUNER, TuneStateBackup, check_whole, restore, torn

OLD, SESSION, LATER = "2026-12-07_10-00-00", "2026-12-07_11-00-00", "2026-12-07_12-00-00"
TUNER_BYTES = cloudpickle.dumps({"_param_space": {"variant": ["a", "b"]}})


def save(folder: Path, session: str, trials: int) -> dict[str, bytes]:
    """The files one save of Tune's writes (as Tune writes them: its state JSON first, then its
    searcher's pickle), for a sweep of `trials` trials."""
    files = {
        f"experiment_state-{session}.json": json.dumps(
            {"trial_data": [{"trial_id": f"t{i}"} for i in range(trials)]}
        ).encode(),
        f"basic-variant-state-{session}.json": cloudpickle.dumps({"_counter": trials}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, contents in files.items():
        (folder / name).write_bytes(contents)
    return files


def kept(backup: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(backup) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def on_trials(staging: Path) -> list[SimpleNamespace]:
    """Trials as the callback sees them: their storage names Tune's staging folder."""
    return [SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))]


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


def test_each_new_whole_save_is_kept_once_and_a_torn_or_mixed_one_never(tmp_path):
    staging, tune, backup = tmp_path / "staging", tmp_path / "tune", tmp_path / "tune-state.zip"
    tune.mkdir()
    (tune / TUNER).write_bytes(TUNER_BYTES)
    callback = TuneStateBackup(str(backup), str(tune))
    callback.on_step_end(0, [])  # no trial yet: nothing known, nothing kept
    assert not backup.exists()

    save(staging, OLD, 1)  # the save this sweep was resumed from (Tune copies it down)
    first = save(staging, SESSION, 2)
    (staging / f".1234-tmp-basic-variant-state-{SESSION}.json").write_bytes(b"half")  # under way
    callback.on_step_end(1, on_trials(staging))
    assert kept(backup) == {TUNER: TUNER_BYTES, **first}
    inode = backup.stat().st_ino
    callback.on_step_end(2, on_trials(staging))  # a step without a save: not written again
    assert backup.stat().st_ino == inode

    second = save(staging, SESSION, 3)
    state = staging / f"experiment_state-{SESSION}.json"
    state.write_bytes(second[state.name][:-5])  # Tune's staging disk full while it wrote
    callback.on_step_end(3, on_trials(staging))
    assert kept(backup) == {TUNER: TUNER_BYTES, **first}
    # the state written whole, then the searcher's write failed: the older searcher file is left
    state.write_bytes(second[state.name])
    searcher = staging / f"basic-variant-state-{SESSION}.json"
    searcher.write_bytes(first[searcher.name])
    os.utime(searcher, ns=(state.stat().st_mtime_ns - 10**9,) * 2)
    callback.on_step_end(4, on_trials(staging))
    assert kept(backup) == {TUNER: TUNER_BYTES, **first}
    second = save(staging, SESSION, 3)
    callback.on_experiment_end(on_trials(staging))
    assert kept(backup) == {TUNER: TUNER_BYTES, **second}


def test_a_torn_or_mixed_state_is_put_back_from_the_last_whole_save(tmp_path):
    tune, backup = tmp_path / "tune", tmp_path / "tune-state.zip"
    whole = {TUNER: TUNER_BYTES, **save(tune, SESSION, 3)}
    (tune / TUNER).write_bytes(TUNER_BYTES)
    TuneStateBackup(str(backup), str(tune)).on_experiment_end(on_trials(tune))
    assert restore(backup, tune) is None  # the same: left alone

    # a copy over the stored state stopped half-way: one file torn, one of an older save
    state = tune / f"experiment_state-{SESSION}.json"
    state.write_bytes(whole[state.name][:10])
    searcher = f"basic-variant-state-{SESSION}.json"
    (tune / searcher).write_bytes(save(tmp_path / "older", SESSION, 2)[searcher])
    # and a later driver's first save, torn
    later = tune / f"experiment_state-{LATER}.json"
    later.write_bytes(b'{"trial_da')
    assert restore(backup, tune) == (
        f"Tune's state in {tune} was not its last whole save ({SESSION}): a full disk, or a "
        "driver killed while Tune copied it; 2 file(s) put back from tune-state.zip, 1 file(s) "
        f"of a later save moved to {TUNE_STATE_SET_ASIDE}/"
    )
    assert {path.name: path.read_bytes() for path in tune.iterdir()} == whole
    assert (tmp_path / TUNE_STATE_SET_ASIDE / later.name).read_bytes() == b'{"trial_da'
    check_whole(tune)
    assert restore(backup, tune) is None


def test_without_a_kept_copy_the_newest_whole_save_in_tune_serves(tmp_path, caplog):
    tune, backup = tmp_path / "tune", tmp_path / "tune-state.zip"
    older = save(tune, OLD, 2)
    save(tune, SESSION, 3)
    (tune / TUNER).write_bytes(TUNER_BYTES)
    newest = tune / f"basic-variant-state-{SESSION}.json"
    newest.write_bytes(newest.read_bytes()[:-1])
    backup.write_bytes(b"PK\x03\x04 not a zip")  # one that cannot be read: said, then as none
    assert restore(backup, tune) == (
        f"Tune's state in {tune} was not its last whole save ({OLD}): a full disk, or a driver "
        f"killed while Tune copied it; 2 file(s) of a later save moved to {TUNE_STATE_SET_ASIDE}/"
    )
    assert f"{backup} is unreadable (File is not a zip file)" in caplog.text
    assert {path.name: path.read_bytes() for path in tune.iterdir()} == {
        TUNER: TUNER_BYTES,
        **older,
    }
    check_whole(tune)


def test_a_torn_state_with_no_whole_save_is_refused_in_a_line(tmp_path):
    tune = tmp_path / "tune"
    files = save(tune, SESSION, 3)
    (tune / TUNER).write_bytes(TUNER_BYTES)
    check_whole(tune)
    searcher = tune / f"basic-variant-state-{SESSION}.json"
    searcher.write_bytes(files[searcher.name][:-1])
    assert restore(tmp_path / "tune-state.zip", tune) is None  # nothing whole to put back
    with pytest.raises(SweepFolderError) as refused:
        check_whole(tune)
    assert str(refused.value) == (
        f"{searcher} is torn (ValueError: pickle exhausted before seeing STOP); no whole copy "
        "is kept: start the sweep under another --out"
    )
    searcher.write_bytes(files[searcher.name])
    (tune / TUNER).write_bytes(TUNER_BYTES[:-1])  # a resumed driver's copy of the Tuner, cut
    with pytest.raises(SweepFolderError, match=f"{tune / TUNER} is torn"):
        check_whole(tune)

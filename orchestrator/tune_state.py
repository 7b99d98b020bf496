"""Ray Tune's driver state (its Tuner, trials and searcher), kept whole for `--resume`.

Tune saves its trials and searcher as a few files named by its driver's session in a local staging
folder, then copies them (and, after a resume, `tuner.pkl`) over the ones in the sweep's storage in
place. A full disk or a kill during that copy leaves a torn file, or files of two saves: on resume
Tune then fails, logs an error and starts the sweep afresh, or loses the trials its older state
lacks. `TuneStateBackup` keeps each save, once Tune has written it whole, as one zip file beside
`tune/`, replaced atomically (`mosaic_core.files`); `restore` puts it back before a resume, else
falls back on the newest whole save in `tune/`. Only file-system storage is kept (on s3:// or gs://
a file is never torn). Not covered: a resume on a Ray cluster that outlived the killed driver
keeps Tune's staging folder, whose files of a later torn save are not set aside.
"""

from __future__ import annotations

import json
import logging
import pickletools
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from mosaic_core.files import replacing
from orchestrator.sweep_folder import TUNE_STATE_SET_ASIDE, SweepFolderError

log = logging.getLogger(__name__)
TUNER = "tuner.pkl"  # Tune's Tuner, written at the start (Ray's `_TUNER_PKL`)
EXPERIMENT_STATE = "experiment_state-"  # a save's trials; its searcher's files beside it
# Tune names a save's files by its driver's start: `basic-variant-state-2026-12-07_22-43-56.json`
_SESSION = re.compile(r"-(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.\w+$")


def _session(name: str) -> str | None:
    found = _SESSION.search(name)
    return None if name.startswith(".") or found is None else found.group(1)


def _sessions(folder: Path) -> list[str]:
    """The sessions of the saves in `folder`, oldest first (Tune resumes from the newest)."""
    return sorted({_session(p.name) for p in folder.glob(f"{EXPERIMENT_STATE}*.json")} - {None})


def _save(folder: Path, session: str) -> dict[str, bytes]:
    """The files of `session`'s save in `folder`: name -> contents."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if _session(p.name) == session}


def torn(name: str, contents: bytes) -> str | None:
    """Why a file of Tune's state is not whole (its JSON, or its pickle stream, cut short), or
    None. Pickles are read opcode by opcode, never loaded."""
    try:
        if name.startswith(EXPERIMENT_STATE):
            json.loads(contents)
        else:
            for _ in pickletools.genops(contents):
                pass
    except ValueError as error:  # JSONDecodeError is a ValueError
        return f"{type(error).__name__}: {' '.join(str(error).split())[:40]}"
    return None


def _whole(files: dict[str, bytes]) -> bool:
    return not any(torn(name, contents) for name, contents in files.items())


def back_up(save: dict[str, bytes], backup: Path) -> None:
    """`save` as the zip file `backup`, which it replaces whole or not at all."""
    with replacing(backup) as file, zipfile.ZipFile(file, "w") as archive:
        for name, contents in save.items():
            archive.writestr(name, contents)


class TuneStateBackup(Callback):
    """After each controller step that saved Tune's state, and at the end, the save with the
    Tuner as `backup` (`back_up`); a save Tune could not write whole is not kept."""

    def __init__(self, backup: str, tune_dir: str) -> None:
        self.backup, self.tune_dir = backup, tune_dir
        self.tuner: bytes | None = None  # the Tuner, once read whole
        # the experiment state of the last save looked at: name, mtime, size
        self.seen: tuple[str, int, int] | None = None

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._keep(trials)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._keep(trials)

    def _keep(self, trials: list[Trial]) -> None:
        if not trials:  # the staging folder is known from a trial's storage
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        sessions = _sessions(staging)
        if not sessions:
            return
        state = staging / f"{EXPERIMENT_STATE}{sessions[-1]}.json"
        found = state.stat()
        if (state.name, found.st_mtime_ns, found.st_size) == self.seen:  # a step without a save
            return
        self.seen = (state.name, found.st_mtime_ns, found.st_size)
        save = _save(staging, sessions[-1])
        if _written_together(staging, save) and _whole(save) and self._read_tuner():
            back_up({TUNER: self.tuner, **save}, Path(self.backup))

    def _read_tuner(self) -> bool:
        """Whether the Tuner is read whole (a resumed driver's copy of it may be under way)."""
        if self.tuner is None:
            contents = _contents(Path(self.tune_dir) / TUNER) or b""
            self.tuner = None if torn(TUNER, contents) else contents
        return self.tuner is not None


def _written_together(staging: Path, save: dict[str, bytes]) -> bool:
    """Tune writes a save's experiment state first, then its searcher's files: one older than the
    state is an earlier save's (its write failed, and Tune went on)."""
    written = {name: (staging / name).stat().st_mtime_ns for name in save}
    state = next(name for name in save if name.startswith(EXPERIMENT_STATE))
    return all(mtime >= written[state] for mtime in written.values())


def restore(backup: Path, tune_dir: Path) -> str | None:
    """Tune's state in `tune_dir` made its last whole save (the backup's, else the newest whole one
    in `tune_dir`) where they differ, the files of later saves moved to `TUNE_STATE_SET_ASIDE`; a
    line saying so, or None when nothing differed (or no save is whole: `check_whole` refuses)."""
    save, source = _read_backup(backup), backup.name
    if not save:
        save, source = _newest_whole_save(tune_dir), f"{tune_dir.name}/"
    if not save:
        return None
    session = next(_session(name) for name in save if _session(name))
    differing = [name for name, data in save.items() if _contents(tune_dir / name) != data]
    later = [p for p in tune_dir.iterdir() if (_session(p.name) or "") > session and p.is_file()]
    for name in differing:
        with replacing(tune_dir / name) as file:
            file.write(save[name])
    aside = backup.parent / TUNE_STATE_SET_ASIDE
    for path in later:
        aside.mkdir(exist_ok=True)
        shutil.move(path, aside / path.name)
    done = [f"{len(differing)} file(s) put back from {source}"] if differing else []
    done += [f"{len(later)} file(s) of a later save moved to {aside.name}/"] if later else []
    if not done:
        return None
    return (
        f"Tune's state in {tune_dir} was not its last whole save ({session}): a full disk, or a "
        f"driver killed while Tune copied it; {', '.join(done)}"
    )


def _read_backup(backup: Path) -> dict[str, bytes]:
    """The save in `backup`; none where it is missing or unreadable (said in a line)."""
    if not backup.is_file():
        return {}
    try:
        with zipfile.ZipFile(backup) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as error:
        log.warning("%s is unreadable (%s): Tune's state is resumed without it", backup, error)
        return {}


def _newest_whole_save(tune_dir: Path) -> dict[str, bytes]:
    """The newest save in `tune_dir` whose files are all whole; none where none is."""
    for session in reversed(_sessions(tune_dir)):
        save = _save(tune_dir, session)
        if _whole(save):
            return save
    return {}


def check_whole(tune_dir: Path) -> None:
    """Refuse a resume from a torn state: Tune would fail, or log an error and start afresh."""
    sessions = _sessions(tune_dir)
    tuner = _contents(tune_dir / TUNER)  # there when Tune can restore (`launch.holds_tune_state`)
    files = {TUNER: tuner} if tuner is not None else {}
    files |= _save(tune_dir, sessions[-1]) if sessions else {}
    for name, contents in files.items():
        if reason := torn(name, contents):
            raise SweepFolderError(
                f"{tune_dir / name} is torn ({reason}); no whole copy is kept: "
                "start the sweep under another --out"
            )


def _contents(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None

"""Ray Tune's driver state (its trials, searcher and callbacks), kept whole for `--resume`.

Tune saves that state as a few files in a local staging folder, then copies them over the ones in
the sweep's storage in place. A full disk or a kill during that copy leaves a torn file, or files of
two saves: on resume Tune then logs an error and starts the sweep afresh (its searcher without its
trials), or loses the trials its older state lacks. `TuneStateBackup` keeps each save, once Tune has
written it, as one zip file beside `tune/`, replaced atomically (`mosaic_core.files`); `restore`
puts it back before a resume. Only file-system storage is kept: object stores (s3://, gs://) write
whole objects.
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
# Tune's own file of a save; its searcher's and callbacks' beside it
EXPERIMENT_STATE = "experiment_state-"
# Tune names a save's files by the time its driver started: `basic-variant-state-2026-12-07_22-43-56.json`
_SESSION = re.compile(r"-(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.\w+$")


def _session(name: str) -> str | None:
    found = _SESSION.search(name)
    return None if name.startswith(".") or found is None else found.group(1)


def _newest_state(folder: Path) -> Path | None:
    """The experiment state of the newest save in `folder` (Tune reads the newest by name)."""
    states = sorted(p for p in folder.glob(f"{EXPERIMENT_STATE}*.json") if _session(p.name))
    return states[-1] if states else None


def newest_save(folder: Path) -> dict[str, bytes]:
    """The files of the newest save in `folder` (name -> contents); empty when there is none."""
    state = _newest_state(folder)
    if state is None:
        return {}
    session = _session(state.name)
    return {p.name: p.read_bytes() for p in folder.iterdir() if _session(p.name) == session}


def torn(name: str, contents: bytes) -> str | None:
    """Why a file of a save is not whole (its JSON, or its pickle stream, cut short), or None.
    Pickles are read opcode by opcode, never loaded."""
    try:
        if name.startswith(EXPERIMENT_STATE):
            json.loads(contents)
        else:
            for _ in pickletools.genops(contents):
                pass
    except ValueError as error:  # JSONDecodeError is a ValueError
        return f"{type(error).__name__}: {' '.join(str(error).split())[:60]}"
    return None


def back_up(save: dict[str, bytes], backup: Path) -> None:
    """`save` as the zip file `backup`, which it replaces whole or not at all."""
    with replacing(backup) as file, zipfile.ZipFile(file, "w") as archive:
        for name, contents in save.items():
            archive.writestr(name, contents)


class TuneStateBackup(Callback):
    """After each controller step that saved Tune's state, and at the end, the save as `backup`
    (`back_up`); a save with a torn file (Tune's staging disk full) is not kept."""

    def __init__(self, backup: str) -> None:
        self.backup = backup
        # the experiment state of the last save looked at: name, mtime, size
        self.kept: tuple[str, int, int] | None = None

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._keep(trials)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._keep(trials)

    def _keep(self, trials: list[Trial]) -> None:
        if not trials:  # the staging folder is known from a trial's storage
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        state = _newest_state(staging)
        if state is None:
            return
        found = state.stat()
        stamp = (state.name, found.st_mtime_ns, found.st_size)
        if stamp == self.kept:  # a step without a save
            return
        save = newest_save(staging)
        if not any(torn(name, data) for name, data in save.items()):
            back_up(save, Path(self.backup))
        self.kept = stamp


def restore(backup: Path, tune_dir: Path) -> str | None:
    """Tune's state in `tune_dir` made the backup's save where they differ, the files of later
    saves moved to `TUNE_STATE_SET_ASIDE`; a line saying so, or None when they agree (or no
    backup can be read)."""
    save = _read_backup(backup)
    if not save:
        return None
    session = _session(next(iter(save)))
    differing = [name for name, data in save.items() if _contents(tune_dir / name) != data]
    later = [p for p in tune_dir.iterdir() if (_session(p.name) or "") > session and p.is_file()]
    if not differing and not later:
        return None
    for name in differing:
        with replacing(tune_dir / name) as file:
            file.write(save[name])
    aside = backup.parent / TUNE_STATE_SET_ASIDE
    for path in later:
        aside.mkdir(exist_ok=True)
        shutil.move(path, aside / path.name)
    moved = f", {len(later)} file(s) of a later one moved to {aside.name}/" if later else ""
    return (
        f"Tune's saved state in {tune_dir} was cut short (a full disk, or a driver killed while it "
        f"saved): its last whole save ({session}) put back from {backup.name}{moved}"
    )


def _read_backup(backup: Path) -> dict[str, bytes]:
    """The save in `backup`; none where it is missing or unreadable (said in a line: the state in
    `tune/` is then resumed from as it is, if whole)."""
    if not backup.is_file():
        return {}
    try:
        with zipfile.ZipFile(backup) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as error:
        log.warning("%s is unreadable (%s): Tune's state is resumed from as it is", backup, error)
        return {}


def check_whole(tune_dir: Path) -> None:
    """Refuse a resume from a torn save: Tune would log an error and start the sweep afresh."""
    for name, contents in newest_save(tune_dir).items():
        if reason := torn(name, contents):
            raise SweepFolderError(
                f"{tune_dir / name} is torn ({reason}); the sweep keeps no whole copy: "
                "start it again with --overwrite"
            )


def _contents(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None

"""Tune's record of each trial's checkpoints, made to match the trial's folder before a resumed
sweep runs.

Tune deletes a trial's older checkpoints (`num_to_keep`) as soon as it registers a newer one, but
saves its experiment state only every few seconds. A driver killed in between leaves a state that
names deleted checkpoints: Ray refuses the trial's restore on every retry, and would delete the
missing folders again later (an error each). Ray Train's own runs save their state first.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
import ray.train
from ray.train._internal.session import _TrainingResult
from ray.tune.experiment import Trial

PREFIX = "checkpoint_"


def _index(path: str) -> int:
    return int(Path(path).name.removeprefix(PREFIX))


def _exists(checkpoint: ray.train.Checkpoint) -> bool:
    info = checkpoint.filesystem.get_file_info(checkpoint.path)
    return info.type != pyarrow.fs.FileType.NotFound


def _trial_checkpoints(checkpoint: ray.train.Checkpoint) -> list[str]:
    """The checkpoint folders beside `checkpoint` in its trial's folder, in the order of their index."""
    folder = pyarrow.fs.FileSelector(str(Path(checkpoint.path).parent), allow_not_found=True)
    return sorted(
        (
            info.path
            for info in checkpoint.filesystem.get_file_info(folder)
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(PREFIX)
        ),
        key=_index,
    )


def surviving_checkpoint(checkpoint: ray.train.Checkpoint) -> ray.train.Checkpoint | None:
    """`checkpoint` where it exists; else the oldest one after it (Tune deleted it on registering
    two newer ones, so that one's results reached the tracker: a later one's may not have), else
    the newest before it; None where the trial's folder holds none."""
    if _exists(checkpoint):
        return checkpoint
    named, paths = _index(checkpoint.path), _trial_checkpoints(checkpoint)
    after = [path for path in paths if _index(path) > named]
    before = [path for path in paths if _index(path) < named]
    chosen = after[0] if after else (before[-1] if before else None)
    return (
        None if chosen is None else ray.train.Checkpoint(chosen, filesystem=checkpoint.filesystem)
    )


def repair_checkpoint_record(trial: Trial) -> str | None:
    """Make `trial`'s checkpoint record match its folder (Ray 2.60's `Trial`, whose version the
    project pins): a deleted latest checkpoint replaced by a surviving one (`_point_at_survivor`),
    records of deleted ones dropped (else Tune's deletion of one raises when it comes). Returns a
    line where the trial's latest checkpoint changed; None otherwise."""
    manager = trial.run_metadata.checkpoint_manager
    latest = manager.latest_checkpoint_result
    line = None
    if latest is not None and not _exists(latest.checkpoint):
        line = _point_at_survivor(trial, latest)
    records = manager._checkpoint_results
    manager._checkpoint_results = [r for r in records if _exists(r.checkpoint)]
    if line is not None or len(manager._checkpoint_results) != len(records):
        trial.invalidate_json_state()
        trial.run_metadata.invalidate_cache()
    return line


def _point_at_survivor(trial: Trial, latest: _TrainingResult) -> str:
    """The trial's latest checkpoint record, whose folder Tune deleted, pointed at the surviving
    one, and the next numbered right after it, as Tune numbers them after any checkpoint it
    resumes from (the resumed trial writes each step's checkpoint under the name it had)."""
    named, survivor = latest.checkpoint, surviving_checkpoint(latest.checkpoint)
    if survivor is None:
        trial.run_metadata.checkpoint_manager._latest_checkpoint_result = None
    else:
        latest.checkpoint = survivor
    # the index of the last checkpoint: Tune counts on from it
    trial.storage.current_checkpoint_index = -1 if survivor is None else _index(survivor.path)
    instead = (
        "starts again from step 0"
        if survivor is None
        else f"continues from {Path(survivor.path).name}"
    )
    return f"Tune had deleted {Path(named.path).name}, the checkpoint it saved; the trial {instead}"

"""The results store: `SWEEP_DIR/results.parquet`, a directory with one Parquet part file per trial
(or, written by other tools, a single Parquet file).

One file per trial lets a trial that reports again, or re-runs after a resume, replace its own
rows without touching (or losing) anyone else's, and the directory is still a single dataset for
`pandas.read_parquet` and `pyarrow.dataset`. A part that cannot be read is set aside as
`_<part>.corrupt` (`set_aside_unreadable`), a name every reader skips, so that the rest reads again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.schema import RESULT_COLUMNS, RESULTS_SCHEMA, TrialStatus
from mosaic_core.files import replacing

STORE_NAME = "results.parquet"
log = logging.getLogger(__name__)


def store_path(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / STORE_NAME


def _part_name(trial_id: str) -> str:
    """A safe, stable file name for a trial; a hash keeps sanitised ids from colliding."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", trial_id)[:100]
    if safe != trial_id:
        safe += "-" + hashlib.sha1(trial_id.encode()).hexdigest()[:8]
    return f"part-{safe}.parquet"


def write_trial_rows(sweep_dir: str | Path, trial_id: str, rows: list[dict]) -> Path:
    """Write all rows of one trial, replacing its earlier part file; returns the part file's path.

    The file is written under a hidden temporary name (ignored by pyarrow's dataset discovery)
    and then renamed, so a crash never leaves a half-written part file in the dataset.
    """
    for row in rows:
        unknown = sorted(set(row) - set(RESULT_COLUMNS))
        if unknown:
            raise ValueError(f"unknown result column {unknown[0]!r}; allowed: {RESULT_COLUMNS}")
        if row.get("trial_id", trial_id) != trial_id:
            raise ValueError(f"row has trial_id {row['trial_id']!r}, expected {trial_id!r}")
    table = pa.Table.from_pylist(
        [{**row, "trial_id": trial_id} for row in rows], schema=RESULTS_SCHEMA
    )

    store = store_path(sweep_dir)
    store.mkdir(parents=True, exist_ok=True)
    part = store / _part_name(trial_id)
    with replacing(part) as file:
        pq.write_table(table, file)
    return part


class ResultsStoreError(ValueError):
    """A results store that cannot be read; the message is one line naming the file."""


def _conformed(table: pa.Table) -> pa.Table:
    """The table with exactly RESULTS_SCHEMA's columns: ones an older writer did not know are null."""
    columns = [
        table[field.name].cast(field.type)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in RESULTS_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=RESULTS_SCHEMA)


def _read_part(path: Path) -> pa.Table:
    """One part, read from one open of the file: a writer renames a new version over it while a
    sweep runs, and a reader that opened it twice could mix two versions."""
    try:
        return _conformed(pq.read_table(pa.BufferReader(path.read_bytes())))
    except (pa.ArrowException, OSError) as error:
        # the path is named once
        reason = " ".join(str(error).replace(str(path), "the file").split())[:80]
        raise ResultsStoreError(f"{path}: not a readable results file ({reason})") from None


def _parts(store: Path) -> list[Path]:
    """The store's files: itself when it is one Parquet file, else its part files, without the
    hidden temporary ones a writer may have left (as pyarrow's dataset discovery skips them)."""
    if store.is_file():
        return [store]
    if not store.is_dir():
        return []
    return sorted(
        path for path in store.iterdir() if path.is_file() and not path.name.startswith((".", "_"))
    )


def read_results(sweep_dir: str | Path, *, skip_bad: bool = False) -> pd.DataFrame:
    """All rows of a sweep, with the same columns and dtypes whether or not anything was written.

    The store is `results.parquet`, a folder of part files or a single Parquet file. A part that
    cannot be read raises ResultsStoreError naming it; with `skip_bad`, it is left out with a
    warning and the other parts are read. Integer columns come back as pandas' nullable Int64, so
    a null `k` stays an integer column.
    """
    tables = []
    for part in _parts(store_path(sweep_dir)):
        try:
            tables.append(_read_part(part))
        except ResultsStoreError as error:
            if not skip_bad:
                raise ResultsStoreError(
                    f"{error}; pass --skip-bad to read the other parts"
                ) from None
            log.warning("skipped %s", error)
    table = pa.concat_tables(tables) if tables else RESULTS_SCHEMA.empty_table()
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def set_aside_unreadable(sweep_dir: str | Path) -> list[str]:
    """Move every part file that cannot be read out of the dataset (renamed `_<part>.corrupt`, kept
    beside the others, where readers skip it), so the rest reads again; one line for each, saying
    where it went. The trials' rows are then rebuilt by whoever owns them (the sweep's tracker,
    from their MLflow runs)."""
    store = store_path(sweep_dir)
    if not store.is_dir():
        return []
    lines = []
    for part in _parts(store):
        try:
            _read_part(part)
        except ResultsStoreError as error:
            aside = _free_name(store / f"_{part.name}.corrupt")
            os.replace(part, aside)
            lines.append(f"{error}: moved aside to {aside.name}; its trial's rows are rebuilt")
    return lines


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, … where an earlier one exists: nothing set aside is overwritten."""
    free, n = path, 1
    while free.exists():
        free, n = path.with_name(f"{path.name}.{n}"), n + 1
    return free


def read_trial_rows(sweep_dir: str | Path, trial_id: str) -> list[dict]:
    """The rows one trial has written so far (none yet: an empty list), e.g. to extend after a restart."""
    part = store_path(sweep_dir) / _part_name(trial_id)
    if not part.is_file():
        return []
    return _read_part(part).to_pylist()


def mark_interrupted(sweep_dir: str | Path) -> list[str]:
    """Rewrite the rows of every trial still RUNNING as INTERRUPTED (after Ctrl-C, when nothing
    runs any more), so the table made then marks them; returns their ids. `--resume` continues
    them, and their next report makes them RUNNING again."""
    results = read_results(sweep_dir)
    last = results.groupby("trial_id", sort=False)["status"].last()
    running = [str(trial_id) for trial_id in last[last == TrialStatus.RUNNING.value].index]
    for trial_id in running:
        rows = read_trial_rows(sweep_dir, trial_id)
        write_trial_rows(
            sweep_dir, trial_id, [{**row, "status": TrialStatus.INTERRUPTED.value} for row in rows]
        )
    return running


def trial_states(results: pd.DataFrame) -> dict[str, int]:
    """How many trials are in each state (RUNNING, TERMINATED, ERROR), from their rows' last status."""
    if results.empty:
        return {}
    return results.groupby("trial_id")["status"].last().value_counts().to_dict()

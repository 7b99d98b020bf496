"""The sweep folder: the one owner of the names of the files a sweep keeps beside its results.

| file | what |
| --- | --- |
| `launch.json` | the launch record: MLflow store, Tune storage, planned trials (what `--resume` reuses) |
| `trials.json` | the expanded trial configs, as first expanded (an edited sweep file cannot derail a resume) |
| `mlflow_runs.json` | the parent MLflow run and which child run belongs to which Ray trial |
| `results.parquet/` | the results store (`analysis.results_store`) |
| `table.md`, `table-<layout>.tex/.csv`, `table-search.csv` | the tables the run ends with |
| `plots/` | the figures the run ends with (`mosaic-sweep plot`'s default folder) |
| `compare-<paper table>.md/.csv` | `mosaic-sweep compare`'s comparison with the paper |
| `optuna.db` | a search's Optuna study (unless `search.storage` names another database) |
| `tune/` | Ray Tune's state (under `--storage` when given) |
| `tune-state.zip` | beside `tune/`: Tune's last whole save of its state, which `--resume` puts back (`orchestrator.tune_state`) |
| `tune-state-set-aside/` | beside `tune/`: the files of a later save that `--resume` replaced with the last whole one |
| `driver.lock` | held by the driver running the sweep, naming its host and pid (`orchestrator.driver_lock`) |

Beside the sweep folders: `mlflow.db` (the default MLflow store) and `mlartifacts/` (its artifacts).

`SweepFolder.create` starts a new folder, `SweepFolder.open` reads back one that exists; every
other module goes through them. Every file the tool writes here goes through
`mosaic_core.files`, which never writes through a symlink planted in the folder. A sweep
folder is trusted input: `--resume` unpickles Ray Tune's state from it, so resume only folders you
wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mosaic_core.files import write_file
from orchestrator.locations import LocationError, check_reachable, check_sqlite_file, check_writable

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

LAUNCH = "launch.json"
TRIALS = "trials.json"
RUN_MAP = "mlflow_runs.json"
TABLE = "table.md"
SEARCH_TABLE = "table-search.csv"
PLOTS = "plots"
OPTUNA_DB = "optuna.db"
DRIVER_LOCK = "driver.lock"
TUNE = "tune"  # Tune's experiment name (RunConfig name) under the storage path
TUNE_STATE_BACKUP = "tune-state.zip"  # beside TUNE
TUNE_STATE_SET_ASIDE = "tune-state-set-aside"  # beside TUNE
MLFLOW_DB = "mlflow.db"  # beside the sweep folders
MLFLOW_ARTIFACTS = "mlartifacts"  # beside the sweep folders


def layout_table(layout: str, suffix: str) -> str:
    """`table-length_factor.tex`: a layout's table of a sweep, as LaTeX or CSV."""
    return f"table-{layout}{suffix}"


def comparison_file(paper: str, suffix: str) -> str:
    """`compare-table2.md`: `mosaic-sweep compare`'s comparison with one of the paper's tables."""
    return f"compare-{paper}{suffix}"


def default_tracking_uri(sweeps_dir: Path) -> str:
    """`--mlflow-uri`, else MLFLOW_TRACKING_URI, else a SQLite file beside the sweep folders."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{sweeps_dir.resolve() / MLFLOW_DB}"


def sqlite_uri(database: Path) -> str:
    """The SQLAlchemy URL of a SQLite file, absolute."""
    return f"sqlite:///{database.resolve()}"


class SweepFolderError(LocationError):
    """A sweep folder that cannot be used as asked; the message is one line meant for the user."""


class LaunchRecord(BaseModel):
    """How a sweep was launched: where its MLflow runs and Tune state live, how many trials it plans."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tracking_uri: str = Field(min_length=1)
    storage_path: str = Field(
        min_length=1, description="Tune's storage_path: the sweep folder, or shared storage"
    )
    trials: int = Field(ge=1)
    workers: dict[str, int] = Field(
        default_factory=dict, description="variant -> its Ray Train workers (as first launched)"
    )
    overrides: list[str] = Field(
        default_factory=list, description="the KEY=VALUE overrides of the sweep file it ran with"
    )

    @property
    def tune_path(self) -> str:
        """Tune's experiment folder (RunConfig name `TUNE`) under the storage path."""
        return f"{self.storage_path}/{TUNE}"

    @property
    def tune_state_backup(self) -> Path | None:
        """Where Tune's last whole save is kept (`orchestrator.tune_state`): beside `TUNE` on a
        file system; None on an object store, where a file is never torn."""
        return None if "://" in self.storage_path else Path(self.storage_path) / TUNE_STATE_BACKUP


class RunMap(BaseModel):
    """The sweep's parent MLflow run, and trial id -> child run id."""

    model_config = ConfigDict(extra="forbid")
    parent: str
    trials: dict[str, str] = Field(default_factory=dict)


def storage_path(storage: str | None, sweep_dir: Path) -> str:
    """Tune's storage_path: the sweep folder locally; `<storage>/<sweep folder name>` on shared storage."""
    if storage is None:
        return str(sweep_dir.resolve())
    if "://" in storage:
        return f"{storage.rstrip('/')}/{sweep_dir.name}"
    return str(Path(storage).resolve() / sweep_dir.name)


@dataclass(frozen=True)
class SweepFolder:
    path: Path
    launch: LaunchRecord

    @classmethod
    def create(
        cls,
        path: Path,
        launch: LaunchRecord,
        configs: dict[str, dict[str, Any]],
        *,
        overwrite: bool = False,
    ) -> SweepFolder:
        """A new sweep folder holding its launch record and trial configs (an old sweep there is moved aside
        with `overwrite`, refused without)."""
        prepare_output_dir(path, overwrite, marker=LAUNCH, what="a sweep")
        # first: whatever follows, the folder is known as a sweep's
        _write_json(path / LAUNCH, launch.model_dump())
        _write_json(path / TRIALS, configs)
        return cls(path, launch)

    @classmethod
    def open(cls, path: Path) -> SweepFolder:
        """The sweep in `path`, its launch record checked."""
        return cls(
            path,
            _read_model(path / LAUNCH, LaunchRecord, f"{path} is not a sweep folder (no {LAUNCH})"),
        )

    def configs(self) -> dict[str, dict[str, Any]]:
        """Variant name -> full trial config, as the sweep was first expanded."""
        return read_configs(self.path)

    def run_map(self) -> RunMap | None:
        """The MLflow runs of this sweep; None before its parent run exists."""
        if not (self.path / RUN_MAP).is_file():
            return None
        return _read_model(self.path / RUN_MAP, RunMap, "")

    def save_run_map(self, run_map: RunMap) -> None:
        _write_json(self.path / RUN_MAP, run_map.model_dump())


def prepare_output_dir(path: Path, overwrite: bool, *, marker: str, what: str) -> None:
    """Refuse to mix two runs in one folder; with `overwrite`, move an old one (a folder holding `marker`)
    aside, never delete it, and never move a folder that is not one of ours."""
    if check_output_dir(path, overwrite, marker=marker, what=what):
        backup = _backup_name(path)
        shutil.move(path, backup)
        log.warning("moved the existing %s to %s", path, backup)
    path.mkdir(parents=True, exist_ok=True)


def check_output_dir(path: Path, overwrite: bool, *, marker: str, what: str) -> bool:
    """Whether `path` holds an old run that `overwrite` moves aside; SweepFolderError when it holds
    something else, or an old run without `overwrite`."""
    if not (path.exists() and any(path.iterdir())):
        return False
    if not (path / marker).is_file():
        raise SweepFolderError(
            f"{path} is not empty and has no {marker}, so it is not the folder of {what} "
            "and is left alone; give --out a new or empty folder"
        )
    if not overwrite:
        raise SweepFolderError(
            f"{path} already holds {what}; pass --resume to continue it, --overwrite to start again "
            f"(the old folder is kept as a backup), or --out another folder"
        )
    return True


def _backup_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = path.with_name(f"{path.name}.bak-{stamp}"), 1
    while backup.exists():
        backup, n = path.with_name(f"{path.name}.bak-{stamp}-{n}"), n + 1
    return backup


def _write_json(path: Path, data: Any) -> None:
    write_file(path, json.dumps(data, indent=1))


def _read_json(path: Path, missing: str) -> Any:
    if not path.is_file():
        raise SweepFolderError(missing)
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise SweepFolderError(
            f"{path} is corrupt ({' '.join(str(error).split())[:120]}); "
            "start the sweep again with --overwrite"
        ) from None


def _read_model(path: Path, model: type[M], missing: str) -> M:
    data = _read_json(path, missing)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"])) or "(top level)"
        raise SweepFolderError(
            f"{path} is corrupt ({where}: {first['msg']}); start the sweep again with --overwrite"
        ) from None


# ---------------------------------------------------------------------------------------------
# where a sweep may be written: checked from the flags alone, before anything is made

# MLflow's stores: a database (SQLAlchemy's schemes) or a tracking server; MLflow 3 refuses file stores
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
# the port a server of each scheme listens on when the URI names none
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "http": 80, "https": 443}


def check_new_folder(path: Path, flag: str) -> None:
    """`path` can be made (or is a folder) and written: no name too long, no file on the way, and a
    file can really be made in the nearest folder that exists."""
    path = Path(os.path.abspath(path))
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    limit = os.pathconf("/", "PC_NAME_MAX")
    if len(os.fsencode(longest)) > limit:
        raise SweepFolderError(
            f"{flag}: the name '{longest[:40]}…' is {len(os.fsencode(longest))} bytes long; "
            f"at most {limit}"
        )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under the file {existing}"
        raise SweepFolderError(f"{flag}: {path} {where}; give a folder")
    check_writable(existing, flag)


def check_overwrite(path: Path) -> None:
    """--overwrite moves the old folder aside: never the working folder or one that holds it."""
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise SweepFolderError(
            f"--out {path} --overwrite would move aside the folder you are working in; "
            "give --out a subfolder"
        )


def check_storage(storage: str, flag: str) -> None:
    """A --storage that Tune can open: a local folder, or a URI of a filesystem pyarrow knows (s3://, gs://, …)."""
    if "://" not in storage:
        return check_new_folder(Path(storage), flag)
    # pyarrow knows the filesystems: imported for a --storage URI alone
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(storage)
    # pyarrow raises ArrowInvalid for unknown schemes, OSError for unreachable ones
    except Exception as error:
        raise SweepFolderError(f"{flag} {storage}: {' '.join(str(error).split())[:160]}") from None


def check_tracking_uri(uri: str, what: str = "--mlflow-uri", *, reading: bool = False) -> None:
    """A tracking URI MLflow 3 accepts: its server answers, its SQLite file is a database in a folder
    that can be written; with `reading`, a SQLite file that exists (never made by a look)."""
    where = f"{what} {uri}"
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("", "file"):
        raise SweepFolderError(
            f"{where}: MLflow 3 refuses file stores; give a database such as "
            f"sqlite:///{MLFLOW_DB}, or a tracking server http(s)://host:port"
        )
    if scheme not in TRACKING_SCHEMES:
        raise SweepFolderError(
            f"{where}: unknown scheme '{scheme}'; allowed: "
            f"{', '.join(f'{s}:' for s in TRACKING_SCHEMES)}"
        )
    if scheme == "sqlite":
        return _check_sqlite_uri(uri, what, reading)
    if scheme in DEFAULT_PORTS:
        try:
            port = parsed.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise SweepFolderError(f"{where}: the port is not a number") from None
        hint = "start the server, or give another URI"
        check_reachable(parsed.hostname or "localhost", port, where, hint)


def _check_sqlite_uri(uri: str, what: str, reading: bool) -> None:
    if not uri.startswith("sqlite:///"):
        raise SweepFolderError(
            f"{what} {uri}: write a SQLite store as sqlite:///relative.db or sqlite:////absolute.db"
        )
    database = Path(uri.removeprefix("sqlite:///"))
    if reading and not database.exists():
        raise SweepFolderError(f"{what} {uri}: no such database {database}")
    if database.exists():
        check_sqlite_file(database, f"{what} {uri}")
    if not reading:
        check_new_folder(database.parent, what)


def read_configs(path: Path) -> dict[str, dict[str, Any]]:
    """The trial configs of the sweep folder `path` (also of one whose launch record is gone)."""
    file = path / TRIALS
    configs = _read_json(file, f"{path} has no {TRIALS}")
    if not isinstance(configs, dict) or not configs:
        raise SweepFolderError(
            f"{file} is corrupt (not a mapping of trial configs); start the sweep again with --overwrite"
        )
    return configs

"""Everything `mosaic-sweep run` decides before Ray starts: the sweep file, the flags, the folders and
stores, the data the trials read, where the trials are placed, and the folder the sweep runs in
(new, resumed, or already finished); or, with `--dry-run`, the plan and the estimate.

Every refusal is one of `REFUSALS`, with a one-line message. The checks that need neither the
expanded sweep nor the machine come first and import neither torch, Ray nor MLflow, so they answer
at once; those modules are imported where a step needs them (the comments say which).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mosaic_core.metrics import BETWEEN_EVALUATIONS
from orchestrator.driver_lock import check_no_driver
from orchestrator.locations import LocationError, check_reachable
from orchestrator.resources import (
    Cluster,
    PlacementError,
    check_fits,
    check_shared_storage,
    concurrency,
    connect,
    local_machine,
    placement,
    resource_plan,
)
from orchestrator.sweep_folder import (
    LAUNCH,
    LaunchRecord,
    SweepFolder,
    SweepFolderError,
    check_new_folder,
    check_output_dir,
    check_overwrite,
    check_storage,
    check_tracking_uri,
    default_tracking_uri,
    storage_path,
)
from search_spaces import bundled_sweeps
from search_spaces.schema import SWEEP_NAME, Resources, Sweep
from search_spaces.yaml_io import SweepError

log = logging.getLogger(__name__)
RAY_GCS_PORT = 6379  # where a Ray head listens when --address names no port
INT64_BYTES = 8


class LaunchError(ValueError):
    """A run that cannot start as asked; the message is one line meant for the user."""


REFUSALS = (LaunchError, SweepError, LocationError, PlacementError)


def sweep_file(spec: str) -> Path:
    """A sweep file path, or the file of a sweep that ships with the package (`smoke`)."""
    path = Path(spec)
    path = bundled_sweeps()[spec] if not path.is_file() and spec in bundled_sweeps() else path
    if path.is_dir():
        raise LaunchError(f"{spec} is a directory; give a sweep file (YAML) or a bundled sweep")
    if not path.is_file():
        raise LaunchError(
            f"{spec}: no such sweep file, nor a bundled sweep; bundled: {', '.join(bundled_sweeps())}"
        )
    return path


def default_sweep_dir(raw: dict[str, Any]) -> Path | None:
    """`sweeps/<sweep name>`, read from the sweep file before it is validated; None when its name
    is not a valid one (the validation will say so)."""
    name = raw.get("name")
    if not (isinstance(name, str) and re.match(SWEEP_NAME, name)):
        return None
    limit = os.pathconf("/", "PC_NAME_MAX")
    if len(name.encode()) > limit:
        raise LaunchError(
            f"name: '{name[:40]}…' is {len(name.encode())} bytes long; a sweep's name is its "
            f"folder's, at most {limit}"
        )
    return Path("sweeps") / name


def check_address(address: str | None) -> None:
    """--address answers within a few seconds (Ray itself would wait a minute before failing)."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        # a bare host: Ray's GCS port, 6379
        host, port = address.removeprefix("ray://"), str(RAY_GCS_PORT)
    hint = "is the Ray head running there (ray start --head)?"
    check_reachable(host, int(port), f"--address {address}", hint)


def check_flags(
    sweep_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    storage: str | None,
    mlflow_uri: str | None,
    overrides: list[str],
) -> None:
    """Flags that cannot work together, folders and stores that cannot be written, and a sweep
    folder that cannot be used as asked: all from the flags and the file system alone."""
    if resume and overwrite:
        raise LaunchError(
            "--resume continues the sweep in the folder, --overwrite starts it again: give one of them"
        )
    check_new_folder(sweep_dir, "--out")
    check_no_driver(sweep_dir)
    if overwrite:
        check_overwrite(sweep_dir)
    if storage is not None:
        check_storage(storage, "--storage")
    if resume:
        folder = _recorded_sweep(sweep_dir)
        check_resumed_overrides(folder, overrides)
        check_recorded_locations(folder)
    else:
        check_tracking_uri(tracking_uri(sweep_dir, mlflow_uri), _tracking_flag(mlflow_uri))
        check_output_dir(sweep_dir, overwrite, marker=LAUNCH, what="a sweep")


def _tracking_flag(mlflow_uri: str | None) -> str:
    """Where the tracking URI came from, as its refusal names it."""
    if mlflow_uri is not None:
        return "--mlflow-uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the MLflow store"


def check_recorded_locations(folder: SweepFolder) -> None:
    """--resume reuses the MLflow store and storage of the launch record: checked as the flags are."""
    record = folder.path / LAUNCH
    check_tracking_uri(folder.launch.tracking_uri, f"{record}: tracking_uri")
    storage = folder.launch.storage_path
    if "://" in storage:
        check_storage(storage, f"{record}: storage_path")
    else:
        check_new_folder(Path(storage), f"{record}: storage_path")


def check_resumed_overrides(folder: SweepFolder, overrides: list[str]) -> None:
    """--resume runs the sweep as it was launched: the same KEY=VALUE overrides, or none given."""
    if overrides and overrides != folder.launch.overrides:
        first = " ".join(folder.launch.overrides) or "none"
        raise LaunchError(
            f"--resume: the sweep in {folder.path} ran with the overrides {first}, not "
            f"{' '.join(overrides)}; give the same ones (or none), or start it again with --overwrite"
        )


def recorded_overrides(sweep_dir: Path | None) -> list[str]:
    """The overrides a sweep folder was launched with (none when it holds no readable record)."""
    if sweep_dir is None or not (sweep_dir / LAUNCH).is_file():
        return []
    try:
        return SweepFolder.open(sweep_dir).launch.overrides
    except SweepFolderError:
        return []


def load(source: str, raw: dict[str, Any], gpus: float | None, cpus: float | None) -> Sweep:
    """The sweep file's mapping validated and expanded (its errors name `source`), with
    --gpus-per-trial / --cpus-per-trial validated like the file's own resources."""
    # the expansion validates every trial's config: torch from here on
    from pydantic import ValidationError

    from mosaic_core.config import describe_validation_error
    from search_spaces.expand import validate_sweep

    sweep = validate_sweep(raw, source)
    overrides = {key: value for key, value in (("gpu", gpus), ("cpu", cpus)) if value is not None}
    if overrides:
        try:
            resources = Resources.model_validate({**sweep.resources.model_dump(), **overrides})
        except ValidationError as error:
            where = "--gpus-per-trial/--cpus-per-trial"
            raise LaunchError(describe_validation_error(error, Resources, where)) from None
        sweep = dataclasses.replace(sweep, resources=resources)
    check_devices(sweep, source)
    return sweep


def check_devices(sweep: Sweep, source: str) -> None:
    """A trial that trains on CUDA needs a GPU from Ray: without one it could only fail."""
    for trial in sweep.trials:
        if trial.config.train.device == "cuda" and not sweep.trial_resources(trial).gpu:
            raise LaunchError(
                f"{source}: trial '{trial.title()}' has train.device cuda but resources.gpu 0, "
                "so Ray gives it no GPU; set resources.gpu (or --gpus-per-trial), or train.device auto"
            )


def check_memory(sweep: Sweep, cluster: Cluster) -> None:
    """A trial whose test sets alone cannot fit in a node's memory is refused, not OOM-killed."""
    memory = cluster.largest("memory") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for trial in sweep.trials:
        needed = largest_test_set_bytes(trial.config.task)
        if needed > memory:
            raise LaunchError(
                f"trial '{trial.title()}': task.eval_examples × its longest evaluation length "
                f"needs at least {needed / 2**30:.3g} GiB for its test set, more than the "
                f"{memory / 2**30:.3g} GiB of {cluster.where}; lower task.eval_examples"
            )


def largest_test_set_bytes(task: Any) -> int:
    """The least memory a length task's largest test set takes: each example holds a source and a
    target of its length as int64 (MQMTAR's contexts vary in length: not counted)."""
    if task.name not in ("sort", "reverse", "copy"):
        return 0
    longest = max(round(task.eval_length * factor) for factor in task.eval_factors)
    return task.eval_examples * 2 * longest * INT64_BYTES


def missing_data(sweep: Sweep) -> list[str]:
    """Files the trials read that are not there (a language-model corpus not yet prepared)."""
    files = {str(path) for trial in sweep.trials for path in trial.config.task.required_files()}
    return sorted(path for path in files if not Path(path).is_file())


def tracking_uri(sweep_dir: Path, mlflow_uri: str | None) -> str:
    return mlflow_uri or default_tracking_uri(sweep_dir.parent)


def open_folder(
    sweep: Sweep,
    sweep_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    storage: str | None,
    mlflow_uri: str | None,
    overrides: list[str],
    address: str | None,
    verbose: bool,
) -> SweepFolder:
    """The folder to run in, once the data is there and the trials fit where they are sent: the
    sweep's own to resume (its MLflow store and storage), or a new one."""
    if missing := missing_data(sweep):
        raise LaunchError(
            f"{len(missing)} data file(s) a trial reads are missing, e.g. {missing[0]}; "
            "write them with `mosaic-sweep prepare`"
        )
    cluster = placement(sweep.widest, address, verbose)
    check_memory(sweep, cluster)
    if not resume:
        check_shared_storage(cluster, storage)
        uri = tracking_uri(sweep_dir, mlflow_uri)
        return new_sweep_folder(sweep, sweep_dir, uri, storage, overwrite, overrides)
    folder = resumable_sweep_folder(sweep_dir)
    for flag, given, used in (
        ("--mlflow-uri", mlflow_uri, folder.launch.tracking_uri),
        ("--storage", storage, folder.launch.storage_path),
    ):
        if given is not None and given != used:
            log.warning("%s: resuming with the sweep's own %s", flag, used)
    return folder


def new_sweep_folder(
    sweep: Sweep,
    sweep_dir: Path,
    tracking_uri: str,
    storage: str | None,
    overwrite: bool,
    overrides: Sequence[str] = (),
) -> SweepFolder:
    """The folder of a new sweep, holding its launch record and its expanded trials."""
    launch = LaunchRecord(
        tracking_uri=tracking_uri,
        storage_path=storage_path(storage, sweep_dir),
        trials=sweep.num_trials,
        workers={trial.describe(): sweep.trial_resources(trial).workers for trial in sweep.trials},
        overrides=list(overrides),
    )
    if storage is not None and holds_tune_state(launch):
        raise SweepFolderError(
            f"{launch.storage_path} already holds the Tune state of a sweep named like "
            f"{sweep_dir.name}; give --out another folder name, or pass --resume to continue that sweep"
        )
    configs = {
        trial.describe(): with_absolute_paths(trial.config.model_dump()) for trial in sweep.trials
    }
    replaced = _sweep_in(sweep_dir) if overwrite else None
    # again just before a running sweep's folder could be moved aside
    check_no_driver(sweep_dir)
    backups = set(sweep_dir.parent.glob(f"{sweep_dir.name}.bak-*"))
    folder = SweepFolder.create(sweep_dir, launch, configs, overwrite=overwrite)
    moved = set(sweep_dir.parent.glob(f"{sweep_dir.name}.bak-*")) - backups
    if replaced is not None and moved:
        # MLflow only when a sweep was moved aside
        from orchestrator.tracking.runs import tag_moved_parent

        tag_moved_parent(replaced, moved.pop())
    return folder


def with_absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Data folders relative to where the sweep was launched: Tune runs trials in other folders."""
    task = dict(config["task"])
    for key in ("data_dir", "ood_data_dir"):
        if task.get(key):
            task[key] = str(Path(task[key]).resolve())
    return {**config, "task": task}


def _sweep_in(sweep_dir: Path) -> SweepFolder | None:
    """The sweep an --overwrite is about to move aside, if the folder holds one."""
    try:
        return SweepFolder.open(sweep_dir) if (sweep_dir / LAUNCH).is_file() else None
    except SweepFolderError:
        return None


def _recorded_sweep(sweep_dir: Path) -> SweepFolder:
    """The sweep folder to resume with its launch record and trials, read without Ray."""
    if not (sweep_dir / LAUNCH).is_file():
        raise SweepFolderError(
            f"{sweep_dir} holds no sweep to resume (no {LAUNCH}); run it without --resume first"
        )
    folder = SweepFolder.open(sweep_dir)
    folder.configs()  # read now: a missing or corrupt trials.json is refused before Ray starts
    return folder


def resumable_sweep_folder(sweep_dir: Path) -> SweepFolder:
    """The folder of a sweep to resume: its launch record, its trials and its Tune state are all there."""
    folder = _recorded_sweep(sweep_dir)
    if not holds_tune_state(folder.launch):
        raise SweepFolderError(
            f"{sweep_dir} holds no Tune state to resume ({folder.launch.tune_path}); "
            "start it again with --overwrite"
        )
    return folder


def repaired_tune_state(folder: SweepFolder) -> str | None:
    """Tune's state of the sweep to resume made whole (`tune_state.restore`), under the driver
    lock; a line when it was repaired. Refused when it is torn and no whole save is left."""
    backup = folder.launch.tune_state_backup
    if backup is None:
        return None
    # Ray: the state is Tune's
    from orchestrator import tune_state

    tune_dir = Path(folder.launch.tune_path)
    try:
        repaired = tune_state.restore(backup, tune_dir)
        tune_state.check_whole(tune_dir)
    except OSError as error:
        raise SweepFolderError(
            f"Tune's state in {tune_dir} cannot be read or mended: {error}"
        ) from None
    return repaired


def holds_tune_state(launch: LaunchRecord) -> bool:
    """Whether the sweep's Tune experiment folder holds state `Tuner.restore` can resume."""
    # Ray only once a folder's Tune state is asked about: the refusals before it go without
    from ray import tune

    return tune.Tuner.can_restore(launch.tune_path)


def finished(folder: SweepFolder) -> bool:
    """Every planned trial of the folder's sweep ended (finished or failed after its retries)? Failed
    ones are retried by --resume, so only finished ones (and those ASHA stopped) count."""
    # pandas reads the results: only when resuming, so that `--help` and refusals go without it
    from analysis.results_store import read_results, trial_states
    from analysis.schema import TrialStatus

    states = trial_states(read_results(folder.path))
    ended = states.get(TrialStatus.TERMINATED, 0) + states.get(TrialStatus.STOPPED, 0)
    return ended >= folder.launch.trials


def restarting_from_scratch(folder: SweepFolder) -> str | None:
    """The line naming the trials `--resume` trains again from step 0: interrupted (or killed)
    before their first evaluation, which is when a trial keeps its first checkpoint."""
    # pandas reads the results: only when resuming, so that `--help` and refusals go without it
    from analysis.configurations import describe_config
    from analysis.results_store import read_results
    from analysis.schema import TrialStatus

    results = read_results(folder.path)
    last = results.groupby("trial_id", sort=False).tail(1)
    unfinished = last[last["status"].isin([TrialStatus.RUNNING, TrialStatus.INTERRUPTED])]
    evaluated = set(results.loc[~results["metric"].isin(BETWEEN_EVALUATIONS), "trial_id"])
    names = [
        f"{describe_config(row)} seed={row['seed']}"
        for _, row in unfinished.iterrows()
        if row["trial_id"] not in evaluated
    ]
    if not names:
        return None
    return (
        f"restarting from scratch (interrupted before their first checkpoint): {', '.join(names)}"
    )


# ---------------------------------------------------------------------------------------------
# --dry-run: the plan, and what the sweep will cost


def dry_run(
    sweep: Sweep,
    address: str | None,
    verbose: bool,
    max_concurrent: int | None,
    *,
    estimate: bool,
    gpu_type: str | None,
) -> Iterator[str]:
    """The lines of `--dry-run`: the trials and the resource plan, whether this machine (or the
    cluster) can run them, missing data, and with `estimate` what the sweep will cost. Only a real
    run refuses."""
    # the estimate's module trains a few steps: torch, only for --dry-run
    from orchestrator.estimate import one_gpu_slots

    cluster = local_machine() if address is None else connect(address, verbose)
    yield from plan_lines(sweep, resource_plan(sweep, cluster, max_concurrent))
    try:
        check_fits(sweep.widest, cluster)
        yield f"{cluster.where} can run this sweep"
    except PlacementError as error:
        yield f"{cluster.where} cannot run this sweep: {error}"
    for path in missing_data(sweep):
        yield f"missing data: {path} (write it with `mosaic-sweep prepare`)"
    if estimate:
        at_once = concurrency(sweep, cluster.nodes, max_concurrent)[0]
        if gpu_type is not None and not at_once:
            # priced for a GPU this machine does not have: what one of them runs at once
            at_once = min(
                sweep.num_trials, one_gpu_slots(sweep), max_concurrent or sweep.num_trials
            )
        yield from estimate_lines(sweep, at_once, gpu_type)


def plan_lines(sweep: Sweep, plan: list[str]) -> Iterator[str]:
    """The expanded trials, numbered, then the resource plan."""
    width = len(str(len(sweep.trials)))
    for number, trial in enumerate(sweep.trials, 1):
        count = sweep.trial_resources(trial).workers
        workers = f"  ({count} workers)" if count > 1 else ""
        yield f"{number:>{width}}  {trial.title()}{workers}"
    yield from plan


def estimate_lines(sweep: Sweep, at_once: int, gpu_type: str | None) -> Iterator[str]:
    """What the sweep will cost: timed here, or priced from a GPU's benchmark figures."""
    # the estimate trains a few steps: torch
    from orchestrator.estimate import describe, estimate

    if not at_once:
        raise LaunchError(
            "no trial fits on this machine to be timed; pass --gpu-type to price the sweep from the "
            "benchmark figures of a GPU"
        )
    yield (
        "estimating: a few training steps of each distinct trial…"
        if gpu_type is None
        else "estimating…"
    )
    try:
        cost = estimate(sweep, at_once, gpu_type)
    except (ValueError, FileNotFoundError) as error:
        raise LaunchError(str(error)) from None
    yield from describe(cost, on_gpu=bool(gpu_type or sweep.resources.gpu))

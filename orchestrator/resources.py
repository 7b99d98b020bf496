"""Where a sweep runs and whether its trials fit: the local machine or a Ray cluster, the
per-trial resources, and the plan `--dry-run` prints (how many trials run at once).

A trial asks Ray for one bundle of resources; a trial on several workers for one bundle per worker
and a sliver of CPU for its Ray Train driver. The plan places these bundles first-fit on the
nodes, trial after trial, as Ray's placement groups would on an idle cluster.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from search_spaces.schema import Resources, Sweep

# where `ray up` leaves it on the head
AUTOSCALER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"
DRIVER_CPU = 0.01  # a Train run's driver only waits and relays reports
GPU_TYPES = ("h100", "h200")  # --gpu-type: the GPUs bench/data has figures for


class PlacementError(ValueError):
    """The sweep cannot run where it was sent; the message is one line meant for the user."""


@dataclass(frozen=True)
class Cluster:
    """Ray's logical resources of each running node, and the node types an autoscaler can add
    (with how many of each): one trial runs on one node."""

    where: str
    nodes: list[dict[str, float]]
    scalable: list[tuple[dict[str, float], int]] = field(default_factory=list)

    def total(self, resource: str) -> float:
        return sum(node.get(resource, 0) for node in self.nodes)

    def largest(self, resource: str) -> float:
        """The most of `resource` one node has, or will have once the autoscaler adds it."""
        return max(
            node.get(resource, 0) for node in self.nodes + [shape for shape, _ in self.scalable]
        )

    @property
    def at_full_scale(self) -> list[dict[str, float]]:
        """The running nodes and every node the autoscaler can add."""
        return self.nodes + [shape for shape, count in self.scalable for _ in range(count)]

    @property
    def needs_shared_storage(self) -> bool:
        return len(self.nodes) > 1 or bool(self.scalable)


def local_machine() -> Cluster:
    """What a local `ray.init()` would find, without starting Ray."""
    # torch counts the GPUs: imported here, so that refusals before any work go without it
    import torch

    return Cluster(
        "this machine (local Ray)",
        [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}],
    )


def connect(address: str | None, verbose: bool) -> Cluster:
    """Join the Ray cluster at `address`, or start Ray on this machine, reachable from it alone."""
    if address is None:
        _loopback_only()
    # Ray comes after _loopback_only, which must precede its first import
    import ray

    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.WARNING
        try:
            ray.init(
                address=address or "local",
                include_dashboard=False,
                log_to_driver=verbose,
                logging_level=level,
            )
        # Ray raises many kinds here (connection, authentication, version mismatch)
        except Exception as error:
            raise PlacementError(
                f"cannot join the Ray cluster at {address}: {' '.join(str(error).split())[:200]}"
            ) from None
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if address is None:
        return Cluster("this machine (local Ray)", nodes)
    return Cluster(f"the Ray cluster at {address}", nodes, autoscaled_node_types())


def _loopback_only() -> None:
    """A local Ray binds every server (GCS, raylet, object manager, workers, agents) to 127.0.0.1: no
    other host can connect, so it needs no token. Ray's switch for this is the one it uses on
    Windows and macOS, where Ray runs on one machine."""
    # for Ray's processes, and a first import of ray
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's first import, if it is one, comes after the variables above
    from ray._private import ray_constants

    # Ray reads the variable once, when it is first imported
    ray_constants.ENABLE_RAY_CLUSTER = False


def placement(resources: Resources, address: str | None, verbose: bool) -> Cluster:
    """Where the sweep runs, and the one check that its trials fit there: this machine is counted
    without starting Ray; a cluster is joined."""
    cluster = local_machine() if address is None else connect(address, verbose)
    check_fits(resources, cluster)
    return cluster


def check_shared_storage(cluster: Cluster, storage: str | None) -> None:
    """Trials that move between nodes need their checkpoints where every node sees them."""
    if cluster.needs_shared_storage and storage is None:
        nodes = (
            f"has {len(cluster.nodes)} nodes"
            if len(cluster.nodes) > 1
            else "adds nodes as it scales"
        )
        raise PlacementError(
            f"{cluster.where} {nodes}: trials need shared storage for their checkpoints; "
            f"pass --storage with a path every node sees, or s3://bucket/prefix"
        )


def autoscaled_node_types(
    config_file: Path = AUTOSCALER_CONFIG,
) -> list[tuple[dict[str, float], int]]:
    """(resources, max_workers) of each node type a `ray up` cluster can launch; none on a static cluster."""
    if not config_file.is_file():
        return []
    config = yaml.safe_load(config_file.read_text()) or {}
    return [
        (node_type.get("resources", {}), node_type["max_workers"])
        for node_type in config.get("available_node_types", {}).values()
        if node_type.get("max_workers", 0) > 0
    ]


def trial_bundles(resources: Resources) -> list[dict[str, float]]:
    """What one trial asks Ray for: one bundle; on several workers, its driver's and one per worker."""
    worker = {"CPU": resources.cpu, "GPU": resources.gpu}
    return (
        [worker] if resources.workers == 1 else [{"CPU": DRIVER_CPU}] + [worker] * resources.workers
    )


def check_fits(resources: Resources, cluster: Cluster) -> None:
    """Refuse a trial that no node can ever hold, or whose workers together the cluster never can
    (Tune would wait for it forever)."""
    who = "a trial" if resources.workers == 1 else "a worker"
    for name, need in (("GPU", resources.gpu), ("CPU", resources.cpu)):
        have = cluster.largest(name)
        if need > have:
            flag = f"--{name.lower()}s-per-trial"
            raise PlacementError(
                f"{who} needs {need:g} {name}s but {cluster.where} has at most {have:g} per node; "
                f"lower resources.{name.lower()} (or {flag}), or pass --address of a larger cluster"
            )
    every_node = cluster.at_full_scale
    if resources.workers > 1 and not _place(
        trial_bundles(resources), [dict(node) for node in every_node]
    ):
        names = ("CPU", "GPU") if resources.gpu else ("CPU",)
        need = {
            "CPU": resources.workers * resources.cpu + DRIVER_CPU,
            "GPU": resources.workers * resources.gpu,
        }
        have = {name: sum(node.get(name, 0) for node in every_node) for name in names}
        raise PlacementError(
            f"a trial of {resources.workers} workers needs {' and '.join(f'{need[n]:g} {n}s' for n in names)} "
            f"({DRIVER_CPU:g} CPU of it for its driver) but {cluster.where} has "
            f"{' and '.join(f'{have[n]:g} {n}s' for n in names)} in all; lower resources.workers or the resources "
            "per worker, or pass --address of a larger cluster"
        )


def _place(
    bundles: list[dict[str, float]], free: list[dict[str, float]], only: str | None = None
) -> bool:
    """Put each bundle on the first node with room (counting only CPUs or GPUs with `only`); the
    nodes' `free` resources shrink only when every bundle of the trial fits."""
    taken = [dict(node) for node in free]
    for bundle in bundles:
        counted = {name: need for name, need in bundle.items() if need and only in (None, name)}
        node = next(
            (
                node
                for node in taken
                if all(need <= node.get(name, 0) + 1e-9 for name, need in counted.items())
            ),
            None,
        )
        if node is None:
            return False
        for name, need in counted.items():
            node[name] = node.get(name, 0) - need
    free[:] = taken
    return True


def _first_wave(
    demands: list[list[dict[str, float]]],
    nodes: list[dict[str, float]],
    only: str | None = None,
    cap: int | None = None,
) -> list[int]:
    """Which trials (by index) start together on idle `nodes`: each in turn, if it fits, up to `cap`."""
    free, started = [dict(node) for node in nodes], []
    for index, bundles in enumerate(demands):
        if cap is not None and len(started) == cap:
            break
        if _place(bundles, free, only):
            started.append(index)
    return started


def _wave_count(
    demands: list[list[dict[str, float]]], nodes: list[dict[str, float]], cap: int | None
) -> int | None:
    """How many waves run every trial, a wave starting when the last one has ended; None if some never fit."""
    waves = 0
    while demands:
        started = set(_first_wave(demands, nodes, cap=cap))
        if not started:
            return None
        demands = [bundles for index, bundles in enumerate(demands) if index not in started]
        waves += 1
    return waves


def _demands(sweep: Sweep) -> list[list[dict[str, float]]]:
    """Every Tune trial's bundles, in launch order; a search picks its variants as it goes: plan for the widest."""
    if sweep.search is not None:
        return [trial_bundles(sweep.widest)] * sweep.num_trials
    return [trial_bundles(sweep.trial_resources(trial)) for trial in sweep.trials]


def concurrency(
    sweep: Sweep, nodes: list[dict[str, float]], max_concurrent: int | None
) -> tuple[int, str]:
    """How many trials run at once on these nodes, and what limits it."""
    demands = _demands(sweep)
    packed = len(_first_wave(demands, nodes))
    by_gpus = len(_first_wave(demands, nodes, "GPU")) if sweep.resources.gpu else None
    limited_by = "running nodes" if packed == 0 else "GPUs" if by_gpus == packed else "CPUs"
    limits = {"trials": sweep.num_trials, limited_by: packed}
    if max_concurrent is not None:
        limits["--max-concurrent"] = max_concurrent
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def _per_trial(sweep: Sweep) -> str:
    """`1 CPU, 0 GPU`; with workers, per worker and how many workers the trials have."""
    cpu, gpu, widest = sweep.resources.cpu, sweep.resources.gpu, sweep.widest
    if widest.workers == 1:
        return f"per trial: {cpu:g} CPU, {gpu:g} GPU"
    if sweep.search is not None:
        shapes = f"trials on up to {widest.workers} workers"
    else:
        counts = collections.Counter(sweep.trial_resources(trial).workers for trial in sweep.trials)
        shapes = ", ".join(
            f"{n} trial{'s' * (n > 1)} × {w} worker{'s' * (w > 1)}"
            for w, n in sorted(counts.items())
        )
    return (
        f"per worker: {cpu:g} CPU, {gpu:g} GPU; {shapes} (Ray Train, placed {widest.placement}, "
        f"each with a {DRIVER_CPU:g}-CPU driver)"
    )


def resource_plan(sweep: Sweep, cluster: Cluster, max_concurrent: int | None) -> list[str]:
    """The lines `--dry-run` ends with: per-trial resources, what is there, and how the trials will run."""
    gpu = sweep.resources.gpu
    demands = _demands(sweep)
    at_once, limit = concurrency(sweep, cluster.nodes, max_concurrent)
    waves = _wave_count(demands, cluster.nodes, max_concurrent) if at_once else None
    waves = f"{waves} wave(s)" if waves else "none until nodes join"
    if gpu:
        # a driver takes no GPU
        workers = sum(len(bundles) - (len(bundles) > 1) for bundles in demands)
        gpus = workers * gpu if gpu > 1 else math.ceil(workers / math.floor(1 / gpu + 1e-9))
        waves += f"; {gpus:g} GPUs would run them all at once"
    trials = f"{sweep.num_trials} trials"
    if sweep.search is not None:
        search = sweep.search
        trials += (
            f" ({search.n_trials} Optuna {search.sampler.upper()} suggestions × {search.seeds} seeds, "
            f"{search.mode} {search.metric})"
        )
    lines = [
        f"{_per_trial(sweep)}; {cluster.where}: {len(cluster.nodes)} node(s), "
        f"{cluster.total('CPU'):g} CPUs, {cluster.total('GPU'):g} GPUs",
        f"{trials}: {at_once} at a time (limited by {limit}), {waves}",
    ]
    if cluster.scalable:
        lines.append(
            f"with every worker the autoscaler can add: {concurrency(sweep, cluster.at_full_scale, max_concurrent)[0]} at a time"
        )
    return lines

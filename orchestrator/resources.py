"""Where a sweep runs and whether its trials fit: the local machine or a Ray cluster, the
per-trial resources, and the plan `--dry-run` prints (how many trials run at once)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from search_spaces.schema import Resources, Sweep

AUTOSCALER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # where `ray up` leaves the config on the head


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
        return max(node.get(resource, 0) for node in self.nodes + [shape for shape, _ in self.scalable])

    @property
    def needs_shared_storage(self) -> bool:
        return len(self.nodes) > 1 or bool(self.scalable)


def local_machine() -> Cluster:
    """What a local `ray.init()` would find, without starting Ray."""
    import torch

    return Cluster("this machine (local Ray)", [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}])


def connect(address: str | None, verbose: bool) -> Cluster:
    """Join the Ray cluster at `address`, or start Ray on this machine, reachable from it alone."""
    if address is None:
        _loopback_only()
    import ray

    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.WARNING
        try:
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=verbose, logging_level=level)
        except Exception as error:  # Ray raises many kinds here (connection, authentication, version mismatch)
            raise PlacementError(f"cannot join the Ray cluster at {address}: {' '.join(str(error).split())[:200]}") from None
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if address is None:
        return Cluster("this machine (local Ray)", nodes)
    return Cluster(f"the Ray cluster at {address}", nodes, autoscaled_node_types())


def _loopback_only() -> None:
    """A local Ray binds every server (GCS, raylet, object manager, workers, agents) to 127.0.0.1: no
    other host can connect, so it needs no token. Ray's switch for this is the one it uses on
    Windows and macOS, where Ray runs on one machine."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for Ray's processes, and a first import of ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray reads the variable once, when it is first imported


def placement(resources: Resources, address: str | None, verbose: bool) -> Cluster:
    """Where the sweep runs, and the one check that its trials fit there: this machine is counted
    without starting Ray; a cluster is joined."""
    cluster = local_machine() if address is None else connect(address, verbose)
    check_fits(resources, cluster)
    return cluster


def check_shared_storage(cluster: Cluster, storage: str | None) -> None:
    """Trials that move between nodes need their checkpoints where every node sees them."""
    if cluster.needs_shared_storage and storage is None:
        nodes = f"has {len(cluster.nodes)} nodes" if len(cluster.nodes) > 1 else "adds nodes as it scales"
        raise PlacementError(f"{cluster.where} {nodes}: trials need shared storage for their checkpoints; "
                             f"pass --storage with a path every node sees, or s3://bucket/prefix")


def autoscaled_node_types(config_file: Path = AUTOSCALER_CONFIG) -> list[tuple[dict[str, float], int]]:
    """(resources, max_workers) of each node type a `ray up` cluster can launch; none on a static cluster."""
    if not config_file.is_file():
        return []
    config = yaml.safe_load(config_file.read_text()) or {}
    return [(node_type.get("resources", {}), node_type["max_workers"])
            for node_type in config.get("available_node_types", {}).values() if node_type.get("max_workers", 0) > 0]


def check_fits(resources: Resources, cluster: Cluster) -> None:
    """Refuse a trial that no node can ever hold (Tune would wait for it forever)."""
    for name, need in (("GPU", resources.gpu), ("CPU", resources.cpu)):
        have = cluster.largest(name)
        if need > have:
            flag = f"--{name.lower()}s-per-trial"
            raise PlacementError(f"a trial needs {need:g} {name}s but {cluster.where} has at most {have:g} per node; "
                                 f"lower resources.{name.lower()} (or {flag}), or pass --address of a larger cluster")


def _trials_per_node(resources: Resources, node: dict[str, float], only: str | None = None) -> int:
    """How many trials fit on one node (counting only CPUs or GPUs with `only`)."""
    fits = []
    if only in (None, "CPU"):
        fits.append(math.floor(node.get("CPU", 0) / resources.cpu + 1e-9))
    if resources.gpu > 0 and only in (None, "GPU"):
        fits.append(math.floor(node.get("GPU", 0) / resources.gpu + 1e-9))
    return min(fits) if fits else 0


def concurrency(sweep: Sweep, nodes: list[dict[str, float]], max_concurrent: int | None) -> tuple[int, str]:
    """How many trials run at once on these nodes, and what limits it."""
    packed = sum(_trials_per_node(sweep.resources, node) for node in nodes)
    by_gpus = sum(_trials_per_node(sweep.resources, node, "GPU") for node in nodes) if sweep.resources.gpu else None
    limited_by = "running nodes" if packed == 0 else "GPUs" if by_gpus == packed else "CPUs"
    limits = {"trials": sweep.num_trials, limited_by: packed}
    if max_concurrent is not None:
        limits["--max-concurrent"] = max_concurrent
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def resource_plan(sweep: Sweep, cluster: Cluster, max_concurrent: int | None) -> list[str]:
    """The lines `--dry-run` ends with: per-trial resources, what is there, and how the trials will run."""
    cpu, gpu = sweep.resources.cpu, sweep.resources.gpu
    at_once, limit = concurrency(sweep, cluster.nodes, max_concurrent)
    waves = f"{math.ceil(sweep.num_trials / at_once)} wave(s)" if at_once else "none until nodes join"
    if gpu:
        gpus = sweep.num_trials * gpu if gpu > 1 else math.ceil(sweep.num_trials / math.floor(1 / gpu + 1e-9))
        waves += f"; {gpus:g} GPUs would run them all at once"
    trials = f"{sweep.num_trials} trials"
    if sweep.search is not None:
        search = sweep.search
        trials += (f" ({search.n_trials} Optuna {search.sampler.upper()} suggestions × {search.seeds} seeds, "
                   f"{search.mode} {search.metric})")
    lines = [f"per trial: {cpu:g} CPU, {gpu:g} GPU; {cluster.where}: {len(cluster.nodes)} node(s), "
             f"{cluster.total('CPU'):g} CPUs, {cluster.total('GPU'):g} GPUs",
             f"{trials}: {at_once} at a time (limited by {limit}), {waves}"]
    if cluster.scalable:
        full = cluster.nodes + [shape for shape, count in cluster.scalable for _ in range(count)]
        lines.append(f"with every worker the autoscaler can add: {concurrency(sweep, full, max_concurrent)[0]} at a time")
    return lines

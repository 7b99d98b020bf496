"""Where a sweep runs and whether its trials fit: the local machine or a Ray cluster, the
per-trial resources, and the plan `--dry-run` prints (how many trials run at once)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from search_spaces.schema import Resources, Sweep


class PlacementError(ValueError):
    """The sweep cannot run where it was sent; the message is one line meant for the user."""


@dataclass(frozen=True)
class Cluster:
    """Ray's logical resources: in total, and on the largest node (one trial runs on one node)."""

    where: str
    nodes: int
    cpus: float
    gpus: float
    node_cpus: float
    node_gpus: float


def local_machine() -> Cluster:
    """What a local `ray.init()` would find, without starting Ray."""
    import torch

    cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    return Cluster("this machine (local Ray)", 1, cpus, gpus, cpus, gpus)


def connect(address: str | None, verbose: bool) -> Cluster:
    """Join the Ray cluster at `address`, or start Ray on this machine when there is none."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a single-machine Ray needs no token
    import ray

    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.WARNING
        try:
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=verbose, logging_level=level)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise PlacementError(f"cannot join the Ray cluster at {address}: {' '.join(str(error).split())[:300]}") from None
    return _from_nodes("this machine (local Ray)" if address is None else f"the Ray cluster at {address}")


AUTOSCALER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # where `ray up` leaves the config on the head


def _from_nodes(where: str) -> Cluster:
    """The running nodes; the largest node also counts the worker types the autoscaler can add."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    shapes = nodes + autoscaled_node_types()
    return Cluster(where, len(nodes), sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes),
                   max(n.get("CPU", 0) for n in shapes), max(n.get("GPU", 0) for n in shapes))


def autoscaled_node_types(config_file: Path = AUTOSCALER_CONFIG) -> list[dict[str, float]]:
    """Resources of each node type a `ray up` cluster can launch (none on a static cluster)."""
    if not config_file.is_file():
        return []
    config = yaml.safe_load(config_file.read_text()) or {}
    return [node_type.get("resources", {}) for node_type in config.get("available_node_types", {}).values()
            if node_type.get("max_workers", 0) > 0]


def check_fits(resources: Resources, cluster: Cluster) -> None:
    """Refuse a trial that no node can ever hold (Tune would wait for it forever)."""
    for name, need, have in (("GPU", resources.gpu, cluster.node_gpus), ("CPU", resources.cpu, cluster.node_cpus)):
        if need > have:
            flag = f"--{name.lower()}s-per-trial"
            raise PlacementError(f"a trial needs {need:g} {name}s but {cluster.where} has at most {have:g} per node; "
                                 f"lower resources.{name.lower()} (or {flag}), or pass --address of a larger cluster")


def concurrency(sweep: Sweep, cluster: Cluster, max_concurrent: int | None) -> tuple[int, str]:
    """How many trials run at once, and what limits it."""
    limits = {"trials": sweep.num_trials, "CPUs": math.floor(cluster.cpus / sweep.resources.cpu + 1e-9)}
    if sweep.resources.gpu > 0:
        limits["GPUs"] = math.floor(cluster.gpus / sweep.resources.gpu + 1e-9)
    if max_concurrent is not None:
        limits["--max-concurrent"] = max_concurrent
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def resource_plan(sweep: Sweep, cluster: Cluster, max_concurrent: int | None) -> list[str]:
    """The lines `--dry-run` ends with: per-trial resources, what is there, and how the trials will run."""
    cpu, gpu = sweep.resources.cpu, sweep.resources.gpu
    at_once, limit = concurrency(sweep, cluster, max_concurrent)
    waves = math.ceil(sweep.num_trials / max(at_once, 1))
    all_at_once = f"; {math.ceil(sweep.num_trials * gpu - 1e-9)} GPUs would run them all at once" if gpu else ""
    trials = f"{sweep.num_trials} trials"
    if sweep.search is not None:
        search = sweep.search
        trials += (f" ({search.n_trials} Optuna {search.sampler.upper()} suggestions × {search.seeds} seeds, "
                   f"{search.mode} {search.metric})")
    return [
        f"per trial: {cpu:g} CPU, {gpu:g} GPU; {cluster.where}: {cluster.nodes} node(s), "
        f"{cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs",
        f"{trials}: {at_once} at a time (limited by {limit}), {waves} wave(s){all_at_once}",
    ]

"""Whether a sweep's trials fit where it is sent, and the resource plan `--dry-run` prints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator.resources import (
    Cluster,
    PlacementError,
    autoscaled_node_types,
    check_fits,
    resource_plan,
)
from search_spaces.expand import load_sweep
from search_spaces.schema import Resources

from helpers import mosaic_sweep

ROOT = Path(__file__).resolve().parents[1]


def node(cpus: float, gpus: float = 0) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus}


@pytest.fixture
def smoke(write_sweep, smoke_spec):
    return load_sweep(write_sweep(smoke_spec))


def plan(
    sweep, resources: Resources, cluster: Cluster, max_concurrent: int | None = None
) -> list[str]:
    return resource_plan(dataclasses.replace(sweep, resources=resources), cluster, max_concurrent)


@pytest.mark.parametrize(
    ("cpu", "gpu", "max_concurrent", "expected"),
    [
        (1, 0, None, "6 trials: 4 at a time (limited by CPUs), 2 wave(s)"),
        (
            0.25,
            0.25,
            None,
            "6 trials: 4 at a time (limited by GPUs), 2 wave(s); 2 GPUs would run them all at once",
        ),
        (
            0.5,
            0.125,
            None,
            "6 trials: 6 at a time (limited by trials), 1 wave(s); 1 GPUs would run them all at once",
        ),
        (
            1,
            0.5,
            None,
            "6 trials: 2 at a time (limited by GPUs), 3 wave(s); 3 GPUs would run them all at once",
        ),
        (
            0.5,
            0.25,
            3,
            "6 trials: 3 at a time (limited by --max-concurrent), 2 wave(s); 2 GPUs would run them all at once",
        ),
        (
            1,
            2,
            None,
            "6 trials: 0 at a time (limited by running nodes), none until nodes join; 12 GPUs would run them all at once",
        ),
    ],
)
def test_plan_counts_what_limits_concurrency(smoke, cpu, gpu, max_concurrent, expected):
    lines = plan(
        smoke, Resources(cpu=cpu, gpu=gpu), Cluster("the cluster", [node(4, 1)]), max_concurrent
    )
    assert lines == [
        f"per trial: {cpu:g} CPU, {gpu:g} GPU; the cluster: 1 node(s), 4 CPUs, 1 GPUs",
        expected,
    ]


def test_plan_packs_each_node_on_its_own(smoke):
    """Two nodes of 3 CPUs and 1 GPU hold one 2-CPU, 0.6-GPU trial each, not three between them;
    a 0.6-GPU trial has a GPU to itself, so six of them need six GPUs."""
    lines = plan(smoke, Resources(cpu=2, gpu=0.6), Cluster("the cluster", [node(3, 1), node(3, 1)]))
    assert (
        lines[1]
        == "6 trials: 2 at a time (limited by GPUs), 3 wave(s); 6 GPUs would run them all at once"
    )


def test_plan_of_an_autoscaling_cluster_counts_the_workers_to_come(smoke):
    # cluster.yaml's shape: a CPU-0 head
    idle = Cluster("the cluster", [node(0)], scalable=[(node(8, 1), 8)])
    lines = plan(smoke, Resources(cpu=1, gpu=0.5), idle)
    assert lines[1:] == [
        "6 trials: 0 at a time (limited by running nodes), none until nodes join; 3 GPUs would run them all at once",
        "with every worker the autoscaler can add: 6 at a time",
    ]
    assert idle.needs_shared_storage and not Cluster("one", [node(4)]).needs_shared_storage


def test_trial_larger_than_any_node_is_refused():
    two_small = Cluster("the cluster", [node(4, 1), node(2, 1)])
    with pytest.raises(
        PlacementError,
        match=r"^a trial needs 2 GPUs but the cluster has at most 1 per node; lower "
        r"resources.gpu \(or --gpus-per-trial\), or pass --address",
    ):
        check_fits(Resources(cpu=1, gpu=2), two_small)
    with pytest.raises(
        PlacementError, match="a trial needs 5 CPUs but the cluster has at most 4 per node"
    ):
        check_fits(Resources(cpu=5, gpu=0), two_small)
    check_fits(Resources(cpu=4, gpu=1), two_small)
    # a worker will come
    check_fits(Resources(cpu=8, gpu=1), Cluster("idle", [node(0)], scalable=[(node(8, 1), 8)]))


def test_autoscaled_worker_types_come_from_the_cluster_config(tmp_path):
    """On an idle `ray up` cluster only the head runs; cluster.yaml's GPU workers will hold the trials."""
    types = autoscaled_node_types(ROOT / "cluster.yaml")
    assert (
        types
        and max(shape.get("GPU", 0) for shape, _ in types) >= 1
        and all(count > 0 for _, count in types)
    )
    assert autoscaled_node_types(tmp_path / "missing.yaml") == []


@pytest.mark.parametrize("how", [["--gpus-per-trial", "1"], "file"])
def test_more_gpus_than_this_machine_is_one_line_before_ray_starts(
    tmp_path, write_sweep, smoke_spec, how
):
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    if how == "file":
        smoke_spec["resources"] = {"cpu": 1, "gpu": 2}
        how = []
    done = mosaic_sweep("run", write_sweep(smoke_spec), *how, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    need = 2 if how == [] else 1
    assert done.stderr.splitlines() == [
        f"error: a trial needs {need} GPUs but this machine (local Ray) has at most 0 per node; "
        "lower resources.gpu (or --gpus-per-trial), or pass --address of a larger cluster"
    ]
    # no sweep folder, no MLflow store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["specs"]


def test_resource_flags_are_validated_like_the_sweep_file(tmp_path, write_sweep, smoke_spec):
    from typer.testing import CliRunner

    from orchestrator import cli

    done = CliRunner().invoke(
        cli.app, ["run", str(write_sweep(smoke_spec)), "--gpus-per-trial", "1.5", "--dry-run"]
    )
    assert done.exit_code == 2
    assert done.output.splitlines() == [
        "error: --gpus-per-trial/--cpus-per-trial: gpu: gpu 1.5: a fraction of one GPU "
        "(≤ 1) or whole GPUs; Ray cannot split several"
    ]


# ---------------------------------------------------------------------------------------------
# data-parallel trials: one bundle per worker, and the Ray Train driver's 0.01 CPU


def test_plan_of_four_one_gpu_workers_per_trial_counts_four_gpus_a_trial(smoke):
    """Two 8-CPU 4-GPU nodes: the first trial's driver and workers fill node 1's GPUs, the second's
    workers node 2's; the third waits. Six trials × 4 workers need 24 GPUs at once."""
    lines = plan(
        smoke, Resources(cpu=1, gpu=1, workers=4), Cluster("the cluster", [node(8, 4), node(8, 4)])
    )
    assert lines == [
        "per worker: 1 CPU, 1 GPU; 6 trials × 4 workers (Ray Train, placed PACK, each with a 0.01-CPU "
        "driver); the cluster: 2 node(s), 16 CPUs, 8 GPUs",
        "6 trials: 2 at a time (limited by GPUs), 3 wave(s); 24 GPUs would run them all at once",
    ]


def test_a_trials_workers_may_span_nodes_and_its_driver_needs_a_cpu_left(smoke):
    spread = Resources(cpu=2, gpu=1, workers=4, placement="SPREAD")
    assert plan(smoke, spread, Cluster("c", [node(4, 2)] * 4))[1].startswith(
        "6 trials: 1 at a time (limited by CPUs)"
    )
    assert plan(smoke, spread, Cluster("c", [node(5, 2)] * 4))[1].startswith(
        "6 trials: 2 at a time (limited by GPUs)"
    )
    assert "placed SPREAD" in plan(smoke, spread, Cluster("c", [node(5, 2)]))[0]


def test_plan_of_a_sweep_mixing_one_and_two_worker_trials(write_sweep, smoke_spec):
    smoke_spec["cases"] = [{"model.n_layer": 1}, {"model.n_layer": 2, "resources.workers": 2}]
    smoke_spec["resources"] = {"cpu": 1}
    sweep = load_sweep(write_sweep(smoke_spec))
    # in order: four of the six 1-CPU trials, then the other two (a 2-worker trial needs 2.01 CPUs, 2 are
    # left), then each 2-worker trial alone (two need 4.02 CPUs): 2 + 6 waves
    assert resource_plan(sweep, Cluster("this machine", [node(4)]), None) == [
        "per worker: 1 CPU, 0 GPU; 6 trials × 1 worker, 6 trials × 2 workers (Ray Train, placed PACK, each with a "
        "0.01-CPU driver); this machine: 1 node(s), 4 CPUs, 0 GPUs",
        "12 trials: 4 at a time (limited by CPUs), 8 wave(s)",
    ]


def test_a_trial_whose_workers_the_cluster_can_never_hold_together_is_refused():
    two_gpus = Cluster("the cluster", [node(8, 1), node(8, 1)])
    with pytest.raises(
        PlacementError,
        match=r"^a trial of 4 workers needs 4.01 CPUs and 4 GPUs \(0.01 CPU of it for "
        r"its driver\) but the cluster has 16 CPUs and 2 GPUs in all; lower "
        r"resources.workers or the resources per worker, or pass --address",
    ):
        check_fits(Resources(cpu=1, gpu=1, workers=4), two_gpus)
    with pytest.raises(
        PlacementError,
        match=r"^a trial of 2 workers needs 2.01 CPUs \(0.01 CPU of it for its driver\) "
        r"but the cluster has 2 CPUs in all",
    ):
        check_fits(Resources(cpu=1, workers=2), Cluster("the cluster", [node(2)]))
    with pytest.raises(PlacementError, match="^a worker needs 2 GPUs but"):
        check_fits(Resources(cpu=1, gpu=2, workers=2), two_gpus)
    check_fits(Resources(cpu=1, gpu=1, workers=2), two_gpus)  # one worker on each node
    check_fits(
        Resources(cpu=1, gpu=1, workers=8), Cluster("idle", [node(0)], scalable=[(node(8, 1), 8)])
    )


def test_a_dry_run_plans_a_sweep_this_machine_cannot_run(tmp_path, write_sweep, smoke_spec):
    """--dry-run lists the trials and says why this machine cannot run them; only a real run refuses."""
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    spec = write_sweep(smoke_spec)
    done = mosaic_sweep("run", spec, "--gpus-per-trial", "1", "--dry-run", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "this machine (local Ray) cannot run this sweep: a trial needs 1 GPUs but this machine (local Ray) "
        "has at most 0 per node; lower resources.gpu (or --gpus-per-trial), or pass --address of a larger cluster"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["specs"]

"""Trials on several workers: a Ray Train `TorchTrainer` runs `train_trial` data-parallel (DDP over
NCCL on GPUs, gloo on CPUs), inside a sweep's Tune trial or alone (`mosaic-sweep train --workers`).

In a sweep, the Tune trial is the Train run's driver (Ray Train V2's pattern): a process holding a
sliver of CPU that builds the trainer, waits in `fit()` and relays rank 0's reports to Tune through
`TuneReportCallback`, so the scheduler, the search and the MLflow tracker see one trial as ever.
The run's checkpoints are Ray Train's, kept in the Tune trial's folder under a fixed run name:
when Tune restarts the trial (a retry, or `--resume`), the new Train run of that name starts from
its latest checkpoint; a lost worker or node is replaced by Ray Train itself (`FailureConfig`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from mosaic_core.config import TrialConfig
from search_spaces.schema import Resources

DRIVER_CPU = 0.01  # a Train run's driver only waits and relays reports
TRAIN_RUN = (
    "train"  # the Train run's name in its folder: fixed, so a restarted trial finds its checkpoints
)


def use_ray_share() -> dict[str, str | None]:
    """Keep torch inside this Ray process's logical CPUs; return where it runs (its visible GPUs),
    which the tracker tags the trial's MLflow run with."""
    import ray
    import torch

    torch.set_num_threads(
        max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    )
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def trainer(
    config: TrialConfig,
    resources: Resources,
    *,
    storage_path: str,
    max_failures: int,
    callbacks: Sequence[Any] = (),
    run_dir: Path | None = None,
    resume_from: Path | None = None,
) -> Any:
    """The TorchTrainer of one trial: `resources.workers` workers of `resources.cpu`/`gpu` each,
    placed by `resources.placement`; its run `TRAIN_RUN` under `storage_path`. With `run_dir`
    (`mosaic-sweep train`), rank 0 also keeps that run folder; `resume_from` is a checkpoint to
    start from when the Train run has none of its own."""
    import ray.train
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.cpu, **({"GPU": resources.gpu} if resources.gpu else {})}
    loop = {
        "trial": config.model_dump(mode="json"),
        "run_dir": run_dir and str(run_dir.resolve()),
        "resume_from": resume_from and str(resume_from.resolve()),
    }
    return TorchTrainer(
        _train_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpu > 0,
            resources_per_worker=per_worker,
            placement_strategy=resources.placement,
        ),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN,
            storage_path=storage_path,
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def _train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: its rank of `train_trial`, from the run's latest checkpoint if it has one."""
    import ray.train
    from ray.train.torch import prepare_model

    from mosaic_core.train import train_trial
    from orchestrator.single_run import record_evaluation

    placement = use_ray_share()
    run_dir = loop["run_dir"] and Path(loop["run_dir"])

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if (
            checkpoint_dir is None
        ):  # progress between evaluations ({} on ranks above 0): a barrier all workers reach
            ray.train.report({**metrics, **placement} if metrics else {}, checkpoint=None)
            return
        if run_dir:
            record_evaluation(run_dir, metrics, checkpoint_dir)
        ray.train.report(
            {**metrics, **placement}, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
        )

    # some kernels leave parameters without a gradient (top-k uniform: the key projection): DDP must look for them
    prepare = partial(prepare_model, parallel_strategy_kwargs={"find_unused_parameters": True})
    checkpoint = (
        ray.train.get_checkpoint()
    )  # the run's own: a replaced worker group, or a restarted trial
    with (
        checkpoint.as_directory() if checkpoint else nullcontext(loop["resume_from"]) as resume_from
    ):
        train_trial(
            TrialConfig.model_validate(loop["trial"]),
            report,
            resume_from=resume_from,
            prepare_model=prepare,
        )


def trial_request(resources: Resources) -> Any:
    """What the Tune trial's own process holds: all of a one-worker trial's resources; a Train
    run's driver a sliver of CPU (its workers hold theirs in the run's own placement group)."""
    from ray import tune

    if resources.workers == 1:
        return tune.PlacementGroupFactory([{"CPU": resources.cpu, "GPU": resources.gpu}])
    return tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}])


def sweep_trainable(
    one_worker: Callable[..., None],
    configs: dict[str, dict[str, Any]],
    resources: dict[str, Resources],
    tune_path: str,
    max_failures: int,
) -> Any:
    """The sweep's Tune trainable, each variant with its resources: one-worker variants run
    `one_worker(config, configs)` in the trial's process, the others a Ray Train run it drives."""
    from ray import tune

    from orchestrator.search import VARIANT

    function = tune.with_parameters(
        _tune_trial,
        one_worker=one_worker,
        configs=configs,
        resources=resources,
        tune_path=tune_path,
        max_failures=max_failures,
    )
    return tune.with_resources(function, lambda config: trial_request(resources[config[VARIANT]]))


def _tune_trial(
    config: dict[str, Any],
    one_worker: Callable[..., None],
    configs: dict[str, dict[str, Any]],
    resources: dict[str, Resources],
    tune_path: str,
    max_failures: int,
) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.search import VARIANT, validated_trial_config

    variant = resources[config[VARIANT]]
    if variant.workers == 1:
        return one_worker(config, configs)

    trial_dir = f"{tune_path}/{tune.get_context().get_trial_id()}"  # the sweep's trial folders are named by id
    trainer(
        validated_trial_config(config, configs),
        variant,
        storage_path=trial_dir,
        max_failures=max_failures,
        callbacks=[TuneReportCallback()],
    ).fit()

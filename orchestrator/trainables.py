"""Every adapter of `train_trial`'s `report` to Ray: a one-worker trial in its Tune trial's process,
the workers of a Ray Train run, and the sweep's trainable that dispatches between them.

A trial on several workers is a Ray Train `TorchTrainer` running `train_trial` data-parallel (DDP
over NCCL on GPUs, gloo on CPUs), inside a sweep's Tune trial or alone (`mosaic-sweep train
--workers`). In a sweep, the Tune trial is the Train run's driver (Ray Train V2's pattern): a
process holding a sliver of CPU that builds the trainer, waits in `fit()` and relays rank 0's
reports to Tune through `TuneReportCallback`, so the scheduler, the search and the MLflow tracker
see one trial as ever. The run's checkpoints are Ray Train's, kept in the Tune trial's folder under
a fixed run name: when Tune restarts the trial (a retry, or `--resume`), the new Train run of that
name starts from its latest checkpoint; a lost worker or node is replaced by Ray Train itself
(`FailureConfig`). A latest checkpoint that cannot be read (`resume_point`) gives way to the one
before it, or to a start from scratch, which the trial's first report says.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import torch
from ray import tune
from ray.train.torch import TorchTrainer, prepare_model
from ray.tune.integration.ray_train import TuneReportCallback

from mosaic_core.checkpoint import first_loadable
from mosaic_core.config import TrialConfig
from mosaic_core.train import train_trial
from orchestrator.resources import DRIVER_CPU
from orchestrator.run_folder import record_evaluation
from orchestrator.tracking.names import CHECKPOINT_FALLBACK_TAG
from orchestrator.trial_configs import VARIANT, validated_trial_config
from search_spaces.schema import Resources

# the Train run's name in its folder: fixed, so a restarted trial finds its checkpoints
TRAIN_RUN = "train"


def use_ray_share() -> dict[str, str | None]:
    """Keep torch inside this Ray process's logical CPUs; return where it runs (its visible GPUs),
    which the tracker tags the trial's MLflow run with."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def one_worker_trial(config: dict[str, Any], configs: dict[str, dict[str, Any]]) -> None:
    """A one-worker trial in its Tune trial's process: `train_trial`, reporting through
    `ray.tune.report`.

    Tune's config holds only the variant's short name and any searched values (readable in its
    progress table); the variants' full configs are shipped once through the object store.
    """
    placement = use_ray_share()  # Ray's CPUs are logical: torch keeps inside its share

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        # between evaluations: progress, no checkpoint
        checkpoint = (
            None if checkpoint_dir is None else tune.Checkpoint.from_directory(checkpoint_dir)
        )
        tune.report({**metrics, **placement}, checkpoint=checkpoint)
        # said once
        placement.pop(CHECKPOINT_FALLBACK_TAG, None)

    full_config = validated_trial_config(config, configs)
    # set when Tune restarts this trial after a failure or a resume
    with resume_point(tune.get_checkpoint(), full_config) as (resume_from, fallback):
        if fallback:
            placement[CHECKPOINT_FALLBACK_TAG] = fallback
        train_trial(full_config, report=report, resume_from=resume_from)


@contextmanager
def resume_point(
    checkpoint: ray.train.Checkpoint | None, config: TrialConfig
) -> Iterator[tuple[str | None, str | None]]:
    """(the checkpoint directory a restarted trial continues from, a line where that is not its
    latest checkpoint): the latest if it can be read, else the newest earlier one the trial's
    folder still holds (Tune keeps two), else none (a start from scratch). A corrupt checkpoint
    then costs the steps since the one before it, never the trial."""
    if checkpoint is None:
        yield None, None
        return
    with checkpoint.as_directory() as latest:
        usable, reasons = first_loadable([latest, *_earlier_checkpoints(checkpoint)], config)
        if not reasons:
            yield latest, None
            return
        instead = "starts again from step 0" if usable is None else f"continues from {usable.name}"
        yield None if usable is None else str(usable), f"{reasons[0]}; the trial {instead}"


def _earlier_checkpoints(checkpoint: ray.train.Checkpoint) -> list[Path]:
    """The checkpoints Tune (or Ray Train) kept in the trial's folder before `checkpoint`, newest
    first: `checkpoint_000002`, `checkpoint_000001`; on a local file system only."""
    if not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return []
    latest = Path(checkpoint.path)
    return sorted(
        (path for path in latest.parent.glob("checkpoint_*") if path.name < latest.name),
        reverse=True,
    )


def trainer(
    config: TrialConfig,
    resources: Resources,
    *,
    storage_path: str,
    max_failures: int,
    callbacks: Sequence[Any] = (),
    run_dir: Path | None = None,
    resume_from: Path | None = None,
    replan: bool = False,
) -> TorchTrainer:
    """The TorchTrainer of one trial: `resources.workers` workers of `resources.cpu`/`gpu` each,
    placed by `resources.placement`; its run `TRAIN_RUN` under `storage_path`. With `run_dir`
    (`mosaic-sweep train`), rank 0 also keeps that run folder; `resume_from` is a checkpoint to
    start from when the Train run has none of its own, and `replan` its lr schedule anew."""
    per_worker = {"CPU": resources.cpu, **({"GPU": resources.gpu} if resources.gpu else {})}
    loop = {
        "trial": config.model_dump(mode="json"),
        "run_dir": run_dir and str(run_dir.resolve()),
        "resume_from": resume_from and str(resume_from.resolve()),
        "replan": replan,
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
    placement = use_ray_share()
    run_dir = loop["run_dir"] and Path(loop["run_dir"])

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        # progress between evaluations ({} on ranks above 0): a barrier all workers reach
        if checkpoint_dir is None:
            ray.train.report({**metrics, **placement} if metrics else {}, checkpoint=None)
        else:
            if run_dir:
                record_evaluation(run_dir, metrics, checkpoint_dir)
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            ray.train.report({**metrics, **placement}, checkpoint=checkpoint)
        # said once, by rank 0
        if metrics:
            placement.pop(CHECKPOINT_FALLBACK_TAG, None)

    # some kernels leave parameters without a gradient (top-k uniform: the key projection): DDP must look for them
    prepare = partial(prepare_model, parallel_strategy_kwargs={"find_unused_parameters": True})
    config = TrialConfig.model_validate(loop["trial"])
    # the run's own: a replaced worker group, or a restarted trial
    checkpoint = ray.train.get_checkpoint()
    start = (
        resume_point(checkpoint, config) if checkpoint else nullcontext((loop["resume_from"], None))
    )
    with start as (resume_from, fallback):
        if fallback:
            placement[CHECKPOINT_FALLBACK_TAG] = fallback
        train_trial(
            config,
            report,
            resume_from=resume_from,
            prepare_model=prepare,
            replan=loop.get("replan", False),
        )


def trial_request(resources: Resources) -> tune.PlacementGroupFactory:
    """What the Tune trial's own process holds: all of a one-worker trial's resources; a Train
    run's driver a sliver of CPU (its workers hold theirs in the run's own placement group)."""
    if resources.workers == 1:
        return tune.PlacementGroupFactory([{"CPU": resources.cpu, "GPU": resources.gpu}])
    return tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}])


def sweep_trainable(
    configs: dict[str, dict[str, Any]],
    resources: dict[str, Resources],
    tune_path: str,
    max_failures: int,
) -> Any:
    """The sweep's Tune trainable, each variant with its resources: one-worker variants run
    `one_worker_trial` in the trial's process, the others a Ray Train run it drives."""
    function = tune.with_parameters(
        _tune_trial,
        configs=configs,
        resources=resources,
        tune_path=tune_path,
        max_failures=max_failures,
    )
    return tune.with_resources(function, lambda config: trial_request(resources[config[VARIANT]]))


def _tune_trial(
    config: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    resources: dict[str, Resources],
    tune_path: str,
    max_failures: int,
) -> None:
    variant = resources[config[VARIANT]]
    if variant.workers == 1:
        return one_worker_trial(config, configs)
    # the sweep's trial folders are named by id
    trial_dir = f"{tune_path}/{tune.get_context().get_trial_id()}"
    trainer(
        validated_trial_config(config, configs),
        variant,
        storage_path=trial_dir,
        max_failures=max_failures,
        callbacks=[TuneReportCallback()],
    ).fit()

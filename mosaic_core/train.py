"""One trial: build task and model, train with AdamW + warmup/cosine, evaluate, report, checkpoint.

`train_trial` knows nothing of Ray or MLflow: whoever runs it passes a `report` callable, and a
checkpoint directory to resume from. Run by several processes of a torch.distributed process group
(Ray Train's workers), it trains data-parallel on the same global batches (mosaic_core.sharding).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mosaic_core.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from mosaic_core.config import TrainConfig, TrialConfig
from mosaic_core.metrics import IGNORE_INDEX, SELECTED_PREFIX, head_metric_name, length_metric_name
from mosaic_core.model import MemoryMosaics
from mosaic_core.sharding import Shard, scored_tokens
from mosaic_core.tasks import Task, build_task

# (metrics, checkpoint directory); on the workers other than rank 0 of a data-parallel run: ({}, None)
Report = Callable[[dict[str, float], str | None], None]
TIMING_METRICS = ("elapsed_s", "tokens_per_s")  # measured, not computed: no two runs agree on them


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `lr_decay_steps`
    (default `max_steps`), where it stays."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, (config.lr_decay_steps or config.max_steps) - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def planned_schedule(state: Mapping[str, Any], train: TrainConfig, replan: bool) -> TrainConfig:
    """The lr schedule a resumed run follows: the one it was started with (a checkpoint from before
    schedules were saved: its config's), ending where it ended so that an extended run then holds
    `min_lr`; with `replan`, the schedule of `train`, as if the run had been planned for it."""
    if replan:
        return train
    planned = TrainConfig.model_validate(state.get("schedule") or state["config"]["train"])
    return planned.model_copy(
        update={"lr_decay_steps": planned.lr_decay_steps or planned.max_steps}
    )


@torch.no_grad()
def diagnostic_metrics(
    model: MemoryMosaics, task: Task, device: torch.device, examples: int = 16
) -> dict[str, float]:
    """The kernel-regression view at work: per layer and head at the first evaluation length
    (`support_size/l0h3`, `zero_fraction/…`, `bandwidth/…`, `beta/…`), and the mean support size
    at every length (`support_size_2x`), on the first `examples` sequences of each test set."""
    metrics = {}
    for position, (factor, inputs) in enumerate(task.diagnostic_inputs(examples).items()):
        stats = model.diagnose(inputs.to(device))
        metrics[length_metric_name("support_size", factor)] = (
            torch.stack([s["support_size"] for s in stats]).mean().item()
        )
        if position == 0:
            for layer, layer_stats in enumerate(stats):
                for name, values in layer_stats.items():
                    for head, value in enumerate(values.tolist()):
                        if math.isfinite(value):
                            metrics[head_metric_name(name, layer, head)] = value
    return metrics


def with_selection(
    evaluated: dict[str, float],
    step: int,
    previous: Mapping[str, float],
    selection: tuple[str, str] | None,
) -> dict[str, float]:
    """The task's `evaluated` metrics plus `best_<name>` for each: its value at the evaluation that
    model selection prefers so far (RegBench: the lowest val_loss), and `best_step`, its step.

    `previous` is the last evaluation's metrics (with their `best_…`), so a resumed trial goes on
    selecting among all its evaluations. Tasks without a selection rule get no `best_…`.
    """
    if selection is None:
        return evaluated
    key, mode = selection
    best = previous.get(SELECTED_PREFIX + key)
    if best is not None and not (evaluated[key] < best if mode == "min" else evaluated[key] > best):
        return {**evaluated, **{k: v for k, v in previous.items() if k.startswith(SELECTED_PREFIX)}}
    return {
        **evaluated,
        **{SELECTED_PREFIX + k: v for k, v in evaluated.items()},
        SELECTED_PREFIX + "step": step,
    }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def compiled_forward(
    model: torch.nn.Module, train: TrainConfig, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """The model as the training step calls it: compiled where `train.compile` asks (auto: on
    CUDA, where one compiled graph replaces the block's many small kernels; eager on the CPU)."""
    wanted = device.type == "cuda" if train.compile == "auto" else train.compile
    if not wanted:
        return model
    return torch.compile(
        model, mode=None if train.compile_mode == "default" else train.compile_mode
    )


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with `train.adam_betas`, decay on what `train.weight_decay_on` names, fused on CUDA."""
    return torch.optim.AdamW(
        model.optimizer_groups(train.weight_decay, every_parameter=train.weight_decay_on == "all"),
        lr=train.lr,
        betas=train.adam_betas,
        fused=device.type == "cuda",
    )


def autocast(train: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA unless `train.precision` is fp32; the CPU always runs float32."""
    enabled = device.type == "cuda" and train.precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def optimizer_step(
    model: torch.nn.Module,
    forward: Callable[[Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[Tensor, Tensor]],
    train: TrainConfig,
    device: torch.device,
    shard: Shard = Shard(),
) -> Tensor:
    """One optimiser step over `train.grad_accum_steps` global micro-batches, each the token mean of
    its cross-entropy, this worker training on its `shard` of their rows: bf16 autocast on CUDA,
    clipping, no host sync. Returns this worker's part of the step's loss as a device tensor (the
    workers' parts sum to it)."""
    total = torch.zeros((), device=device)
    for inputs, labels in micro_batches:
        scored = scored_tokens(labels).to(device)
        inputs, labels = shard.rows(inputs, labels)
        with autocast(train, device):
            logits = forward(inputs.to(device, non_blocking=True))
        loss = (
            F.cross_entropy(
                logits.float().flatten(0, 1),
                labels.to(device).flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            / scored
        )
        (
            loss * (shard.world_size / train.grad_accum_steps)
        ).backward()  # DDP averages over workers: undo it
        total += loss.detach() / train.grad_accum_steps
    if train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def report_progress(report: Report, shard: Shard, metrics: dict[str, float]) -> None:
    """Between evaluations: `report(metrics, None)` on rank 0, `report({}, None)` on the other ranks."""
    report(metrics if shard.leads else {}, None)


class Throughput:
    """Training tokens per second since the last reading."""

    def __init__(self) -> None:
        self.tokens, self.since = 0, time.perf_counter()

    def count(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.tokens += batch[0].numel()
        return batch

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return rate


def report_evaluation(
    report: Report,
    shard: Shard,
    metrics: dict[str, float],
    *,
    config: TrialConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: TrainConfig | None = None,
) -> None:
    """Rank 0: `report(metrics, checkpoint_dir)` with a checkpoint of this moment. The other
    workers call `report({}, None)`: a reporter that synchronises workers (Ray Train's) is reached
    by all of them, and only rank 0 writes."""
    if not shard.leads:
        report({}, None)
        return
    with tempfile.TemporaryDirectory(prefix="mosaic-checkpoint-") as directory:
        save_checkpoint(
            directory,
            config=config,
            step=int(metrics["step"]),
            model=model,
            optimizer=optimizer,
            metrics=metrics,
            schedule=schedule,
        )
        report(metrics, directory)


def train_trial(
    config: TrialConfig | Mapping[str, Any],
    report: Report | None = None,
    *,
    resume_from: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    replan: bool = False,
) -> dict[str, float]:
    """Train one model; every `eval_interval` steps and at the end, evaluate and call
    `report(metrics, checkpoint_dir)` with a checkpoint of this very moment (valid during the call);
    every `log_interval` steps in between, `report({step, train_loss, lr, tokens_per_s}, None)`.

    `resume_from`: a checkpoint directory; the run continues from its step exactly as if it had
    never stopped, on the lr schedule it was started with even when `train.max_steps` extends it
    (past that schedule's end the lr holds `min_lr`); `replan` follows this config's schedule instead. `on_step(step, loss)` is called after every optimiser step (progress bars).
    `prepare_model` moves the model to its device and wraps it for data parallelism (Ray Train's
    `prepare_model`: DDP); the trial then runs on that device, and `train.device` is not used.
    Returns the last metrics (on rank 0). A non-finite loss raises FloatingPointError.
    """
    config = config if isinstance(config, TrialConfig) else TrialConfig.model_validate(config)
    train = config.train
    shard = Shard.of_this_process()
    torch.manual_seed(config.seed)
    task = build_task(config.task, config.seed)
    model = MemoryMosaics(config.model, task.vocab_size)
    # DDP on several workers
    trained = prepare_model(model) if prepare_model else model.to(pick_device(train.device))
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, train, device)
    first_step, metrics, schedule = 0, {}, train
    if resume_from is not None:
        state = load_checkpoint(resume_from, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state)
        first_step, metrics = state["step"], state["metrics"]
        schedule = planned_schedule(state, train, replan)
    forward = compiled_forward(trained, train, device)

    started, throughput = time.perf_counter(), Throughput()
    for step in range(first_step, train.max_steps):
        lr = learning_rate(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        shard.reseed_dropout(config.seed, step)
        # a fresh micro-batch per micro-step: batch index counts micro-batches, not steps
        micro_batches = (
            throughput.count(
                task.train_batch(step * train.grad_accum_steps + micro, train.batch_size)
            )
            for micro in range(train.grad_accum_steps)
        )
        loss_value = shard.summed(
            optimizer_step(model, forward, optimizer, micro_batches, train, device, shard)
        ).item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss is {loss_value} at step {step + 1}; stopping the trial"
            )

        done = step + 1
        if on_step is not None:
            on_step(done, loss_value)
        progress = {"step": done, "train_loss": loss_value, "lr": lr}
        if done % train.eval_interval == 0 or done == train.max_steps:
            progress["tokens_per_s"] = throughput.read()
            if shard.leads:  # evaluation once, on rank 0 alone
                model.eval()
                with autocast(train, device):
                    evaluated = with_selection(
                        task.evaluate(model, device), done, metrics, config.task.selection()
                    )
                    metrics = {**progress, **evaluated, **diagnostic_metrics(model, task, device)}
                metrics["elapsed_s"] = time.perf_counter() - started
            if report is not None:
                report_evaluation(
                    report,
                    shard,
                    metrics,
                    config=config,
                    model=model,
                    optimizer=optimizer,
                    schedule=schedule,
                )
        elif train.log_interval and done % train.log_interval == 0 and report is not None:
            report_progress(report, shard, {**progress, "tokens_per_s": throughput.read()})
    return metrics

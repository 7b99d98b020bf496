"""One trial: build task and model, train with AdamW + warmup/cosine, evaluate, report.

`train_trial` knows nothing of Ray or MLflow: whoever runs it passes a `report` callable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mosaic_core.config import TrainConfig, TrialConfig
from mosaic_core.metrics import IGNORE_INDEX
from mosaic_core.model import MemoryMosaics
from mosaic_core.tasks import build_task

Report = Callable[[dict[str, float], str | None], None]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def train_trial(config: TrialConfig | Mapping[str, Any], report: Report | None = None) -> dict[str, float]:
    """Train one model; call `report(metrics, checkpoint_dir)` every `eval_interval` steps and at the end.

    Returns the last reported metrics. A non-finite loss raises FloatingPointError naming the step.
    """
    config = config if isinstance(config, TrialConfig) else TrialConfig.model_validate(config)
    train = config.train
    device = pick_device(train.device)
    torch.manual_seed(config.seed)
    task = build_task(config.task, config.seed)
    model = MemoryMosaics(config.model, task.vocab_size).to(device)
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(train.weight_decay), lr=train.lr, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    metrics: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(train.max_steps):
        lr = learning_rate(step, train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total_loss = 0.0
        for micro in range(train.grad_accum_steps):
            # a fresh micro-batch per micro-step: batch index counts micro-batches, not steps
            inputs, labels = task.train_batch(step * train.grad_accum_steps + micro, train.batch_size)
            with autocast:
                logits = model(inputs.to(device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE_INDEX)
            (loss / train.grad_accum_steps).backward()
            total_loss += loss.item() / train.grad_accum_steps
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training loss is {total_loss} at step {step + 1}; stopping the trial")
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % train.eval_interval == 0 or done == train.max_steps:
            model.eval()
            with autocast:
                metrics = {"step": done, "train_loss": total_loss, "lr": lr, **task.evaluate(model, device)}
            metrics["elapsed_s"] = time.perf_counter() - started
            if report is not None:
                report(metrics, None)
    return metrics

"""What a sweep will cost before it runs: tokens per trial, device-hours, wall time.

Every distinct trial shape (a trial's config without its seed) is either timed on this machine for
a few training steps and one evaluation, or, for a GPU named with `--gpu-type`, priced from the
project's benchmark figures (`bench/data/model-<gpu>.jsonl`): the model-FLOPs utilisation measured
there for the same kernel and the nearest benchmarked shape, applied to the trial's own FLOPs.
Wall time packs the trials, longest first, into the number that run at once.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mosaic_core.config import TrialConfig
from mosaic_core.model import MemoryMosaics
from mosaic_core.tasks import build_task
from mosaic_core.train import build_optimizer, diagnostic_metrics, optimizer_step, pick_device
from search_spaces.schema import Sweep

BENCH_DATA = Path(__file__).resolve().parents[1] / "bench" / "data"
BF16_PEAK_FLOPS = 989.4e12  # H100 and H200 SXM, dense: the peak bench/model.py's MFU is relative to
TRIAL_OVERHEAD_S = (
    1.0  # scheduling a trial and its first imports (bench/RESULTS.md, "Sweep overhead")
)
SWEEP_OVERHEAD_S = (
    17.0  # starting Ray, MLflow and Tune, and winding down (the same section: 13–16 s + 4 s)
)


@dataclass(frozen=True)
class ShapeCost:
    """One distinct trial shape: how many trials share it, and what one of them costs."""

    label: str
    trials: int
    tokens: int  # training tokens per trial
    seconds: float  # per trial
    source: str


@dataclass(frozen=True)
class SweepCost:
    shapes: list[ShapeCost]
    at_once: int
    device: str  # what the seconds were measured or priced on

    @property
    def trial_hours(self) -> float:
        return sum(shape.trials * shape.seconds for shape in self.shapes) / 3600

    @property
    def wall_seconds(self) -> float:
        """Trials, longest first, each to the slot that frees first."""
        durations = sorted((s.seconds for s in self.shapes for _ in range(s.trials)), reverse=True)
        slots = [0.0] * max(1, self.at_once)
        for duration in durations:
            heapq.heappush(slots, heapq.heappop(slots) + duration)
        return max(slots) + SWEEP_OVERHEAD_S


def distinct_shapes(sweep: Sweep) -> list[tuple[TrialConfig, int, str]]:
    """(config, trials sharing it, label) per trial config without its seed, in sweep order."""
    shapes: dict[str, list] = {}
    for trial in sweep.trials:
        key = json.dumps(trial.config.model_dump(exclude={"seed"}), sort_keys=True)
        label = (
            " ".join(f"{k}={v}" for k, v in trial.varying.items() if k != "seed")
            or trial.config.task.name
        )
        shapes.setdefault(key, [trial.config, 0, label])[1] += 1
    repeats = sweep.search.n_trials * sweep.search.seeds / len(sweep.trials) if sweep.search else 1
    return [(config, math.ceil(count * repeats), label) for config, count, label in shapes.values()]


def evaluations(config: TrialConfig) -> int:
    return math.ceil(config.train.max_steps / config.train.eval_interval)


def measure_shape(config: TrialConfig, steps: int = 3) -> tuple[float, float, float]:
    """(seconds per optimiser step, seconds per evaluation, tokens per step) of `config` here."""
    device = pick_device(config.train.device)
    task = build_task(config.task, config.seed)
    model = MemoryMosaics(config.model, task.vocab_size).to(device)
    optimizer = build_optimizer(model, config.train, device)
    batches = [task.train_batch(i, config.train.batch_size) for i in range(steps + 1)]
    optimizer_step(
        model, model, optimizer, batches[:1], config.train, device
    ).item()  # warm-up, not timed
    started = time.perf_counter()
    for batch in batches[1:]:
        optimizer_step(model, model, optimizer, [batch], config.train, device).item()
    step_s = (time.perf_counter() - started) / steps * config.train.grad_accum_steps
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        task.evaluate(model, device)
        diagnostic_metrics(model, task, device)
    tokens = (
        config.train.grad_accum_steps
        * sum(int(inputs.numel()) for inputs, _ in batches[1:])
        / steps
    )
    return step_s, time.perf_counter() - started, tokens


def measured_cost(config: TrialConfig, trials: int, label: str) -> ShapeCost:
    step_s, eval_s, tokens = measure_shape(config)
    seconds = config.train.max_steps * step_s + evaluations(config) * eval_s + TRIAL_OVERHEAD_S
    return ShapeCost(
        label,
        trials,
        round(tokens * config.train.max_steps),
        seconds,
        "measured here: 3 steps, 1 evaluation",
    )


def benchmark_rows(gpu_type: str) -> list[dict]:
    """Model-throughput rows recorded for a GPU (`h200` reads bench/data/model-h200.jsonl)."""
    path = BENCH_DATA / f"model-{gpu_type.lower()}.jsonl"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("model-") for p in BENCH_DATA.glob("model-*.jsonl"))
        raise ValueError(
            f"no benchmark figures for --gpu-type {gpu_type!r}; recorded: {', '.join(known) or 'none'}"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flops_per_token(config: TrialConfig, vocab: int, context: int) -> float:
    """bench/model.py's convention: 6 · parameters + 12 · L · n_embd · T for the attention."""
    with torch.device("meta"):
        params = sum(p.numel() for p in MemoryMosaics(config.model, vocab).parameters())
    return 6 * params + 12 * config.model.n_layer * config.model.n_embd * context


def benchmarked_cost(config: TrialConfig, trials: int, label: str, rows: list[dict]) -> ShapeCost:
    """Priced at the MFU of the same kernel on the nearest benchmarked shape (LM or synthetic)."""
    family = "LM" if config.task.name == "lm" else "synthetic"
    shapes = [
        r for r in rows if r.get("model", "").startswith("MM ") and r["config"].startswith(family)
    ]
    if not shapes:
        raise ValueError(
            f"no Memory Mosaics benchmark row for {family} shapes in the recorded figures"
        )
    nearest = min(abs(_depth(r["config"]) - config.model.n_layer) for r in shapes)
    shapes = [r for r in shapes if abs(_depth(r["config"]) - config.model.n_layer) == nearest]
    same = [r for r in shapes if r["model"] == f"MM {config.model.kernel}"]
    row = min(
        same or shapes, key=lambda r: r["mfu"]
    )  # no row for this kernel: the slowest kernel's, to be safe
    task = build_task(config.task, config.seed)
    _, batch_tokens = measure_tokens(task, config)
    context = batch_tokens / config.train.batch_size
    tokens = batch_tokens * config.train.grad_accum_steps * config.train.max_steps
    seconds = (
        tokens
        * flops_per_token(config, task.vocab_size, round(context))
        / (row["mfu"] * BF16_PEAK_FLOPS)
    )
    return ShapeCost(
        label,
        trials,
        round(tokens),
        seconds + TRIAL_OVERHEAD_S,
        f"{row['config']}, {row['model']}: MFU {row['mfu']:.3f} on {row.get('device', 'that GPU')}"
        + ("" if same else f"; no row for {config.model.kernel}: the slowest kernel's"),
    )


def measure_tokens(task, config: TrialConfig) -> tuple[int, int]:
    """(sequences, tokens) of one training batch: generated batches are padded to their longest row."""
    inputs, _ = task.train_batch(0, config.train.batch_size)
    return len(inputs), int(inputs.numel())


def _depth(config_name: str) -> int:
    return int(config_name.rsplit("L=", 1)[1].split()[0])


def estimate(sweep: Sweep, at_once: int, gpu_type: str | None = None) -> SweepCost:
    """The cost of every distinct trial shape of `sweep`, measured here or priced for `gpu_type`."""
    rows = benchmark_rows(gpu_type) if gpu_type else None
    shapes = [
        benchmarked_cost(config, n, label, rows)
        if rows is not None
        else measured_cost(config, n, label)
        for config, n, label in distinct_shapes(sweep)
    ]
    here = "cuda" if torch.cuda.is_available() else "cpu"
    return SweepCost(shapes, at_once, gpu_type.upper() if gpu_type else f"this machine ({here})")


def describe(cost: SweepCost, gpus_per_trial: float) -> list[str]:
    """The lines `--dry-run --estimate` prints."""
    lines = [
        f"{s.label}: {s.trials} trial(s) × {s.tokens:,} tokens, {_duration(s.seconds)} each ({s.source})"
        for s in cost.shapes
    ]
    hours = cost.trial_hours * (gpus_per_trial if gpus_per_trial else 1)
    unit = (
        "GPU-hours (trials priced alone; packed ones share a GPU's throughput)"
        if gpus_per_trial
        else "trial-hours"
    )
    lines.append(
        f"estimate on {cost.device}: {hours:,.1f} {unit}; wall time {_duration(cost.wall_seconds)} "
        f"at {cost.at_once} trial(s) at a time"
    )
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"

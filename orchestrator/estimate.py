"""What a sweep will cost before it runs: tokens per trial, GPU-hours, wall time.

Every distinct trial shape (a trial's config without its seed) is either timed on this machine for
a few training steps and one evaluation, or, for a GPU named with `--gpu-type`, priced from the
benchmark figures shipped with the package (`orchestrator/bench_figures/`, copied from `bench/data/`
after each measurement): the model-FLOPs utilisation of the newest row of the same kernel and the
nearest benchmarked shape, applied to the trial's own FLOPs; then the packing measured on that GPU
(`bench/packing.py`): k trials sharing one GPU train k / gain(k) times slower each, where gain(k)
is their measured aggregate throughput over one trial's alone. Wall time packs the trials, longest
first, into the number that run at once.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from mosaic_core.config import LanguageModelConfig, TrialConfig
from mosaic_core.model import MemoryMosaics
from mosaic_core.tasks import build_task
from mosaic_core.tokenizer import PADDED_VOCAB
from mosaic_core.train import (
    build_optimizer,
    compiled_forward,
    diagnostic_metrics,
    optimizer_step,
    pick_device,
)
from search_spaces.schema import Sweep, describe_varying, readable_variant

BF16_PEAK_FLOPS = 989.4e12  # H100 and H200 SXM, dense: the peak bench/model.py's MFU is relative to
# scheduling a trial and its first imports (bench/RESULTS.md, "Sweep overhead")
TRIAL_OVERHEAD_S = 1.0
# starting Ray, MLflow and Tune, and winding down (the same section: 13–16 s + 4 s)
SWEEP_OVERHEAD_S = 17.0


@dataclass(frozen=True)
class ShapeCost:
    """One distinct trial shape: how many trials share it, and what one of them costs."""

    label: str
    trials: int
    tokens: int  # training tokens per trial
    seconds: float  # per trial, at the sweep's packing
    source: str
    gpu_share: float = 1.0  # of one GPU, held for `seconds`


@dataclass(frozen=True)
class SweepCost:
    shapes: list[ShapeCost]
    at_once: int
    device: str  # what the seconds were measured or priced on
    packing: str = ""  # how packed trials were priced, for the summary line

    @property
    def trial_hours(self) -> float:
        return sum(shape.trials * shape.seconds for shape in self.shapes) / 3600

    @property
    def gpu_hours(self) -> float:
        return sum(s.trials * s.seconds * s.gpu_share for s in self.shapes) / 3600

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
        unseeded = describe_varying({k: v for k, v in trial.varying.items() if k != "seed"})
        model = trial.config.model
        label = (
            readable_variant(unseeded, model.kernel, model.kernel_params, trial.kernel_label)
            or trial.config.task.name
        )
        shapes.setdefault(key, [trial.config, 0, label])[1] += 1
    repeats = sweep.search.n_trials * sweep.search.seeds / len(sweep.trials) if sweep.search else 1
    return [(config, math.ceil(count * repeats), label) for config, count, label in shapes.values()]


def evaluations(config: TrialConfig) -> int:
    return math.ceil(config.train.max_steps / config.train.eval_interval)


def measure_shape(config: TrialConfig, steps: int = 3) -> tuple[float, float, float]:
    """(seconds per optimiser step, seconds per evaluation, tokens per step) of `config` here, in
    the trial loop's own mode (compiled on CUDA: the warm-up step pays the compilation)."""
    device = pick_device(config.train.device)
    task = build_task(config.task, config.seed)
    model = MemoryMosaics(config.model, task.vocab_size).to(device)
    optimizer = build_optimizer(model, config.train, device)
    forward = compiled_forward(model, config.train, device)
    batches = [task.train_batch(i, config.train.batch_size) for i in range(steps + 1)]
    optimizer_step(model, forward, optimizer, batches[:1], config.train, device).item()
    started = time.perf_counter()
    for batch in batches[1:]:
        optimizer_step(model, forward, optimizer, [batch], config.train, device).item()
    step_s = (time.perf_counter() - started) / steps * config.train.grad_accum_steps
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        task.evaluate(model, device)
        diagnostic_metrics(model, task, device)
    tokens = config.train.grad_accum_steps * sum(int(x.numel()) for x, _ in batches[1:]) / steps
    return step_s, time.perf_counter() - started, tokens


def measured_cost(config: TrialConfig, trials: int, label: str) -> ShapeCost:
    step_s, eval_s, tokens = measure_shape(config)
    seconds = config.train.max_steps * step_s + evaluations(config) * eval_s + TRIAL_OVERHEAD_S
    source = "measured here: 3 steps, 1 evaluation"
    return ShapeCost(label, trials, round(tokens * config.train.max_steps), seconds, source)


def benchmark_rows(gpu_type: str, kind: str = "model", *, required: bool = True) -> list[dict]:
    """The shipped rows of one benchmark (`model` or `packing`) for a GPU, newest first; none
    where that benchmark was not measured on it and the rows are not `required`."""
    figures = resources.files("orchestrator") / "bench_figures"
    path = figures / f"{kind}-{gpu_type.lower()}.jsonl"
    if not path.is_file() and not required:
        return []
    if not path.is_file():
        known = sorted(
            p.name.removeprefix(f"{kind}-").removesuffix(".jsonl")
            for p in figures.iterdir()
            if p.name.startswith(f"{kind}-")
        )
        raise ValueError(
            f"no {kind} benchmark figures for --gpu-type {gpu_type!r}; measured: {', '.join(known) or 'none'}"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row.get("date", ""), reverse=True)


def flops_per_token(config: TrialConfig, vocab: int, context: int) -> float:
    """bench/model.py's convention: 6 · parameters + 12 · L · n_embd · T for the attention."""
    with torch.device("meta"):
        params = sum(p.numel() for p in MemoryMosaics(config.model, vocab).parameters())
    return 6 * params + 12 * config.model.n_layer * config.model.n_embd * context


def matching_row(config: TrialConfig, rows: list[dict]) -> tuple[dict, str]:
    """The newest Memory Mosaics row of the trial's family, nearest depth and own kernel (the
    slowest kernel's where it has none), and a note of what it stands in for."""
    family = "LM" if config.task.name == "lm" else "synthetic"
    shapes = [r for r in rows if r["model"].startswith("MM ") and r["config"].startswith(family)]
    if not shapes:
        raise ValueError(f"no Memory Mosaics benchmark row for {family} shapes in the figures")
    nearest = min(abs(_depth(r) - config.model.n_layer) for r in shapes)
    shapes = [r for r in shapes if abs(_depth(r) - config.model.n_layer) == nearest]
    same = [r for r in shapes if r["model"] == f"MM {config.model.kernel}"]
    if same:
        return same[0], ""  # rows are newest first
    return min(
        shapes, key=lambda r: r["mfu"]
    ), f"; no row for {config.model.kernel}: the slowest kernel's"


def packing_gain(config: TrialConfig, per_gpu: int, rows: list[dict]) -> tuple[float, str]:
    """Aggregate throughput of `per_gpu` trials on one GPU over one trial's alone, as measured for
    the nearest shape and the trial's kernel (softmax's where it has none)."""
    if per_gpu <= 1:
        return 1.0, "one trial per GPU"
    depth = [r for r in rows if _depth(r) == config.model.n_layer] or rows
    kernel = [r for r in depth if r["model"] == f"MM {config.model.kernel}"]
    rows = kernel or [r for r in depth if r["model"] == "MM softmax"] or depth
    alone = next((r for r in rows if r["trials"] == 1), None)
    packed = [r for r in rows if 1 < r["trials"] <= per_gpu]
    if alone is None or not packed:
        return 1.0, f"{per_gpu} trials per GPU sharing one trial's throughput: no packing measured"
    row = max(packed, key=lambda r: (r["trials"], r.get("date", "")))
    gain = row["tokens_per_s_total"] / alone["tokens_per_s_total"]
    return (
        gain,
        f"{per_gpu} per GPU at {gain:.2f}× one trial's throughput ({row['trials']} measured, {row['config']}, {row['model']})",
    )


def benchmarked_cost(
    config: TrialConfig,
    trials: int,
    label: str,
    rows: list[dict],
    packing: list[dict],
    per_gpu: int,
) -> ShapeCost:
    """Priced at the measured MFU of `matching_row`, slowed by sharing a GPU with `per_gpu − 1`
    other trials as `packing_gain` says."""
    row, note = matching_row(config, rows)
    batch_tokens, vocab = _first_batch(config.task.model_dump_json(), config.train.batch_size)
    context = round(batch_tokens / config.train.batch_size)
    tokens = batch_tokens * config.train.grad_accum_steps * config.train.max_steps
    alone_s = tokens * flops_per_token(config, vocab, context) / (row["mfu"] * BF16_PEAK_FLOPS)
    gain, _ = packing_gain(config, per_gpu, packing)
    source = f"{row['config']}, {row['model']}: MFU {row['mfu']:.3f} on {row['device']}, {row['date']}{note}"
    return ShapeCost(
        label, trials, tokens, alone_s * per_gpu / gain + TRIAL_OVERHEAD_S, source, 1 / per_gpu
    )


def one_gpu_slots(sweep: Sweep) -> int:
    """Trials one GPU holds at once: four at `resources.gpu: 0.25`, one at 1 or more."""
    share = sweep.resources.gpu
    return int(1 / share) if 0 < share < 1 else 1


@functools.cache
def _first_batch(task_json: str, batch_size: int) -> tuple[int, int]:
    """(tokens of the first training batch, vocabulary) of a task, built once per distinct task
    (a RegBench task draws all its DFAs): generated batches are padded to their longest row."""
    config = TrialConfig.model_validate({"task": json.loads(task_json)}).task
    if isinstance(config, LanguageModelConfig):  # full windows of a corpus that may not exist yet
        return batch_size * config.context, PADDED_VOCAB
    task = build_task(config, 0)
    return int(task.train_batch(0, batch_size)[0].numel()), task.vocab_size


def trials_per_gpu(sweep: Sweep, at_once: int) -> int:
    """How many trials share one GPU: what `resources.gpu` packs, unless fewer run at once."""
    return max(1, min(one_gpu_slots(sweep), at_once, sweep.num_trials))


def estimate(sweep: Sweep, at_once: int, gpu_type: str | None = None) -> SweepCost:
    """The cost of every distinct trial shape of `sweep`, measured here or priced for `gpu_type`
    with `at_once` trials running together (on one GPU where the sweep packs them)."""
    if gpu_type is None:
        shapes = [measured_cost(c, n, label) for c, n, label in distinct_shapes(sweep)]
        here = "cuda" if torch.cuda.is_available() else "cpu"
        share = sweep.resources.gpu if sweep.resources.gpu else 1.0
        shapes = [ShapeCost(**{**vars(s), "gpu_share": share}) for s in shapes]
        return SweepCost(shapes, at_once, f"this machine ({here})")
    rows, packing = benchmark_rows(gpu_type), benchmark_rows(gpu_type, "packing", required=False)
    per_gpu = trials_per_gpu(sweep, at_once)
    shapes = [
        benchmarked_cost(c, n, label, rows, packing, per_gpu)
        for c, n, label in distinct_shapes(sweep)
    ]
    _, how = packing_gain(distinct_shapes(sweep)[0][0], per_gpu, packing)
    return SweepCost(shapes, at_once, gpu_type.upper(), how)


def describe(cost: SweepCost, on_gpu: bool) -> list[str]:
    """The lines `--dry-run --estimate` prints."""
    lines = [
        f"{s.label}: {s.trials} trial(s) × {s.tokens:,} tokens, {_duration(s.seconds)} each ({s.source})"
        for s in cost.shapes
    ]
    total = f"{cost.gpu_hours:,.1f} GPU-hours" if on_gpu else f"{cost.trial_hours:,.1f} trial-hours"
    packing = f" ({cost.packing})" if cost.packing else ""
    lines.append(
        f"estimate on {cost.device}: {total}{packing}; wall time {_duration(cost.wall_seconds)} "
        f"at {cost.at_once} trial(s) at a time"
    )
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def _depth(row: dict[str, Any]) -> int:
    """A benchmark row's depth, from its config name (`synthetic L=4 N=131`, `sort L=2`)."""
    return int(row["config"].rsplit("L=", 1)[1].split()[0])

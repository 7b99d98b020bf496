"""How many trials to pack on one GPU: aggregate training tokens/s with 1, 2, 4, 8 trials at once.

Each trial is a process doing what a sweep trial does between evaluations — the task's own batches
generated on the CPU, the trial loop's optimiser step in its default mode on CUDA (compiled) —
for the paper's synthetic shapes (n_embd 512, 8 heads, pmem 2688, batch 256). All trials compile
and warm up, meet at a barrier, then train for the same wall time; the aggregate is the sum of
their tokens over that time. Peak memory per trial says whether a packing fits a card.

    python bench/packing.py --out packing.jsonl            # on a CUDA machine
    python bench/packing.py --report packing.jsonl         # the Markdown table of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date

import torch
import torch.multiprocessing as mp

from mosaic_core.config import TrialConfig
from mosaic_core.model import MemoryMosaics
from mosaic_core.tasks import build_task
from mosaic_core.train import build_optimizer, compiled_forward, optimizer_step

SHAPES = {  # the bundled length_generalization cases: task, depth
    "sort L=2": ("sort", 2),
    "mqmtar L=4": ("mqmtar", 4),
}


def trial_config(shape: str, kernel: str) -> TrialConfig:
    task, depth = SHAPES[shape]
    return TrialConfig.model_validate(
        {
            "task": {"name": task, "train_min_length": 32, "train_max_length": 64},
            "model": {"n_layer": depth, "n_embd": 512, "n_head": 8, "pmem_size": 2688,
                      "kernel": kernel, "dropout": 0.05, "attn_dropout": 0.05,
                      "contextual_attn_dropout": False},
            "train": {"batch_size": 256, "lr": 1e-3, "min_lr": 5e-5, "device": "cuda"},
        }
    )  # fmt: skip


def trial(
    rank: int, shape: str, kernel: str, seconds: float, threads: int, barrier, results
) -> None:
    """One packed trial: warm up (compile), wait for the others, train `seconds`, report tokens.
    `threads` CPU threads, as a sweep trial gets its `resources.cpu`."""
    torch.set_num_threads(threads)
    config = trial_config(shape, kernel)
    device = torch.device("cuda")
    task = build_task(config.task, rank)
    model = MemoryMosaics(config.model, task.vocab_size).to(device)
    optimizer = build_optimizer(model, config.train, device)
    forward = compiled_forward(model, config.train, device)
    step, tokens = 0, 0
    for step in range(3):
        optimizer_step(
            model, forward, optimizer, [task.train_batch(step, 256)], config.train, device
        )
    torch.cuda.synchronize()
    barrier.wait()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        step += 1
        batch = task.train_batch(step, 256)
        tokens += batch[0].numel()
        optimizer_step(model, forward, optimizer, [batch], config.train, device).item()
    elapsed = time.perf_counter() - started
    results.put(
        {
            "tokens": tokens,
            "seconds": elapsed,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    )


def measure(shape: str, kernel: str, trials: int, seconds: float, threads: int) -> dict:
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(trials), context.Queue()
    workers = [
        context.Process(
            target=trial, args=(rank, shape, kernel, seconds, threads, barrier, results)
        )
        for rank in range(trials)
    ]
    for worker in workers:
        worker.start()
    rows = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    total = sum(r["tokens"] / r["seconds"] for r in rows)
    return {
        "config": shape,
        "model": f"MM {kernel}",
        "trials": trials,
        "gpu_share": 1 / trials,
        "cpu_threads_per_trial": threads,
        "tokens_per_s_total": total,
        "tokens_per_s_per_trial": total / trials,
        "peak_gib_per_trial": max(r["peak_gib"] for r in rows),
    }


def report(rows: list[dict]) -> str:
    lines = ["| shape | kernel | trials on one GPU | tokens/s, all trials | × one trial alone | peak GiB per trial |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        alone = next(
            (r for r in rows if r["trials"] == 1 and r["config"] == row["config"] and r["model"] == row["model"]),
            None,
        )  # fmt: skip
        gain = f"{row['tokens_per_s_total'] / alone['tokens_per_s_total']:.2f}×" if alone else "—"
        lines.append(
            f"| {row['config']} | {row['model']} | {row['trials']} | "
            f"{row['tokens_per_s_total'] / 1e3:,.0f}k | {gain} | {row['peak_gib_per_trial']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--kernels", nargs="*", default=["softmax"])
    parser.add_argument("--trials", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed window per packing")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads per trial (a sweep's resources.cpu)"
    )
    parser.add_argument("--out", help="append one JSON row per measurement to this file")
    parser.add_argument(
        "--report", nargs="+", metavar="JSONL", help="print the table of earlier runs"
    )
    args = parser.parse_args()
    if args.report:
        print(
            report(
                [json.loads(line) for path in args.report for line in open(path) if line.strip()]
            )
        )
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/packing.py needs a CUDA device")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": str(date.today()), "bench": "packing",
            "commit": os.environ.get("BENCH_COMMIT", "unknown")}  # fmt: skip
    rows = []
    for shape in args.shapes:
        for kernel in args.kernels:
            for trials in args.trials:
                rows.append({**measure(shape, kernel, trials, args.seconds, args.threads), **meta})
                print(json.dumps(rows[-1]), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()

"""Per-trial overhead of `mosaic-sweep run`: what Ray Tune, MLflow, the results store and the
progress display cost on top of the training itself.

Why: a sweep of many short trials (smoke sweeps, small grids on a CPU) is only worth running
through the orchestrator if its bookkeeping is small next to a trial; the target is ≤ 1 s per trial.

How: the same N trials of a tiny sort task (2 kernels × N/2 seeds, a few seconds each, 3
evaluations with checkpoints) run twice, one trial at a time in both:
  1. a plain loop in this process calling `train_trial(config, report=...)` (torch on 2 threads);
  2. `python -m orchestrator.cli run SWEEP --out DIR` as a user runs it, with `resources: {cpu: 2}`
     so only one trial fits on the 2 cores, MLFLOW_TRACKING_URI and RAY_ADDRESS unset (a fresh
     local Ray and a SQLite MLflow store under DIR).
Per-trial overhead = (sweep wall time − loop wall time) / N. The sweep's progress lines on stderr
are timestamped as they arrive, which splits the sweep into start-up (launch → first trial
started: imports, Ray init, MLflow store and parent run, the first trial's process), the trials
themselves, and the wind-down (last trial done → exit: tables, plots, artifacts, Ray shutdown).
Other work on the machine shows in the load averages printed with the result.

Run: python bench/sweep_overhead.py [--trials 32] [--steps 150] [--out DIR]
Progress goes to stderr, a Markdown summary to stdout; the sweep folder is a temporary one
unless --out is given (never inside the repository). Exit status 1 if the sweep fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KERNELS = ["softmax", "sparsemax"]
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] (started|done|failed)\s+(.*?)(?:\s{2}|$)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_sweep(path: Path, kernels: list[str], trials: int, steps: int) -> None:
    spec = {
        "name": "overhead",
        "description": "bench/sweep_overhead.py: a tiny sort model, one trial at a time",
        "base": {
            "task": {
                "name": "sort",
                "num_symbols": 8,
                "train_min_length": 4,
                "train_max_length": 8,
                "eval_length": 8,
                "eval_factors": [1, 2],
                "eval_examples": 200,
            },
            "model": {"n_layer": 2, "n_embd": 64, "n_head": 4},
            "train": {
                "max_steps": steps,
                "batch_size": 32,
                "lr": 3.0e-3,
                "min_lr": 3.0e-4,
                "warmup_steps": 10,
                "eval_interval": max(1, steps // 3),
                "device": "cpu",
            },
        },
        "kernels": kernels,
        "grid": {"seed": list(range(trials // len(kernels)))},
        "resources": {"cpu": 2, "gpu": 0},  # one trial at a time on a 2-core machine
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def run_loop(sweep_file: Path) -> tuple[list[float], list[float]]:
    """Every trial of the sweep file in this process, one after the other: seconds per trial, and
    the seconds of each trial's training loop (its `elapsed_s`: no model build, no checkpoints)."""
    import torch

    from mosaic_core.train import train_trial
    from search_spaces.expand import load_sweep

    torch.set_num_threads(2)
    trials = load_sweep(sweep_file).trials
    seconds, training = [], []
    for number, trial in enumerate(trials, 1):
        started = time.perf_counter()
        # with a report callable, train_trial writes its checkpoints, as in a sweep
        metrics = train_trial(trial.config, report=lambda metrics, checkpoint_dir: None)
        seconds.append(time.perf_counter() - started)
        training.append(metrics["elapsed_s"])
        log(f"loop [{number}/{len(trials)}] {trial.describe()}  {seconds[-1]:.2f} s")
    return seconds, training


def sweep_training_seconds(sweep_dir: Path) -> list[float]:
    """Each sweep trial's training-loop seconds (its last `elapsed_s`), from the results store."""
    from analysis.results_store import read_results

    rows = read_results(sweep_dir)
    return rows[rows["metric"] == "elapsed_s"].groupby("trial_id")["value"].max().tolist()


def run_sweep(sweep_file: Path, out: Path) -> tuple[int, float, list[tuple[float, str, str]]]:
    """`mosaic-sweep run` in a subprocess: exit status, wall seconds, timestamped (t, event, trial)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["COLUMNS"] = "250"  # rich wraps at 80 columns when not on a terminal
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "run",
        str(sweep_file),
        "--out",
        str(out / "sweep"),
    ]
    events = []
    started = time.perf_counter()
    with open(out / "sweep-stdout.txt", "w") as stdout:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True
        )
        for line in process.stderr:
            now = time.perf_counter() - started
            log(f"sweep {now:7.1f} s | {line.rstrip()}")
            match = PROGRESS.match(line)
            if match:
                events.append((now, match[3], match[4]))
        status = process.wait()
    return status, time.perf_counter() - started, events


def versions() -> str:
    import mlflow
    import ray
    import torch

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}, "
        f"MLflow {mlflow.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=150, help="train.max_steps (evaluation every steps/3)"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the sweep file and sweep; default: a temporary one"
    )
    args = parser.parse_args()
    n = args.trials
    kernels = KERNELS[: min(len(KERNELS), max(n, 1))]
    if n < 1 or n % len(kernels):
        parser.error(
            f"--trials must be 1 or a multiple of {len(KERNELS)} (kernels {', '.join(KERNELS)} × seeds)"
        )
    out = (args.out or Path(tempfile.mkdtemp(prefix="sweep-overhead-"))).resolve()
    if out.is_relative_to(ROOT):
        sys.exit(f"--out {out} is inside the repository; choose a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    sweep_file = out / "overhead.yaml"
    write_sweep(sweep_file, kernels, n, args.steps)
    load = [os.getloadavg()[0]]  # 1-minute load average before the loop, before the sweep, after it

    log(f"plain loop: {n} trials of {args.steps} steps ({sweep_file})")
    loop, loop_training = run_loop(sweep_file)
    loop_total = sum(loop)
    load.append(os.getloadavg()[0])
    log(f"sweep: mosaic-sweep run {sweep_file} --out {out / 'sweep'}")
    status, sweep_total, events = run_sweep(sweep_file, out)
    load.append(os.getloadavg()[0])
    starts = [t for t, event, _ in events if event == "started"]
    ends = [t for t, event, _ in events if event in ("done", "failed")]
    failed = sum(event == "failed" for _, event, _ in events)
    if status != 0 or failed or len(ends) != n or len(starts) != n:
        log(
            f"the sweep failed: exit status {status}, {len(ends)} of {n} trials ended, {failed} failed"
        )
        return 1

    startup, wind_down = starts[0], sweep_total - ends[-1]
    trial_phase = ends[-1] - starts[0]
    # one at a time: the k-th start and end pair
    inside = [end - start for start, end in zip(starts, ends)]
    gaps = [start - end for end, start in zip(ends, starts[1:])]
    sweep_training = sweep_training_seconds(out / "sweep")
    figures = {
        "trials": n,
        "steps": args.steps,
        "cores": os.cpu_count(),
        "load_average_1min": load,
        "loop_total_s": loop_total,
        "loop_trial_median_s": statistics.median(loop),
        "sweep_total_s": sweep_total,
        "startup_s": startup,
        "wind_down_s": wind_down,
        "trial_phase_s": trial_phase,
        "training_median_loop_s": statistics.median(loop_training),
        "training_median_sweep_s": statistics.median(sweep_training),
        "started_to_done_median_s": statistics.median(inside),
        "gap_median_s": statistics.median(gaps) if gaps else 0.0,
        "overhead_per_trial_s": (sweep_total - loop_total) / n,
        "overhead_per_trial_excl_startup_s": (trial_phase - loop_total) / n,
    }
    # medians resist bursts of other work on the machine: a trial's time in the sweep, start to next start
    figures["overhead_per_trial_median_s"] = (
        figures["started_to_done_median_s"]
        + figures["gap_median_s"]
        - figures["loop_trial_median_s"]
    )
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    f = figures
    rows = [
        (
            f"plain loop, {n} × `train_trial` (median trial {f['loop_trial_median_s']:.2f})",
            f"{loop_total:.1f}",
        ),
        ("`mosaic-sweep run`, launch to exit", f"{sweep_total:.1f}"),
        ("— start-up: launch → first trial started", f"{startup:.1f}"),
        ("— trials: first started → last done", f"{trial_phase:.1f}"),
        ("— wind-down: last done → exit", f"{wind_down:.1f}"),
        (
            "per trial, training loop only (median `elapsed_s`): loop / sweep",
            f"{f['training_median_loop_s']:.2f} / {f['training_median_sweep_s']:.2f}",
        ),
        ("per trial, started → done (median)", f"{f['started_to_done_median_s']:.2f}"),
        ("per trial, done → next started (median)", f"{f['gap_median_s']:.2f}"),
        (
            f"**overhead per trial, all in: (sweep − loop) / {n}**",
            f"**{f['overhead_per_trial_s']:.2f}**",
        ),
        (
            "**overhead per trial, without start-up and wind-down**",
            f"**{f['overhead_per_trial_excl_startup_s']:.2f}**",
        ),
        (
            "overhead per trial from medians: started → done + gap − loop trial",
            f"{f['overhead_per_trial_median_s']:.2f}",
        ),
    ]
    print(f"""## Sweep overhead ({time.strftime("%Y-%m-%d")})

- Machine: {f["cores"]} cores, {platform.platform()}, {versions()}; 1-minute load average
  {" / ".join(f"{x:.2f}" for x in load)} before the loop / before the sweep / after it.
- Workload: {n} trials ({" and ".join(kernels)} × seeds), sort, 2 layers × 64, {args.steps} steps,
  3 evaluations with checkpoints; one trial at a time in both runs.

| | seconds |
|---|---|""")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(f"\nSweep folder: {out / 'sweep'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

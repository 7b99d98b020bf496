"""Forward+backward time and peak memory of every kernel's fast attention path, next to SDPA softmax.

Strictly causal (Memory Mosaics) attention, bf16, head dim 64, queries = keys = unit vectors × β
(so scores are β² cos, as in the model). Times are medians of CUDA-event measurements.

    python bench/kernels.py --out kernels.jsonl          # on a CUDA machine; one JSON row per line
    python bench/kernels.py --report kernels.jsonl       # the Markdown table of RESULTS.md, anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

from mosaic_core import attention
from mosaic_core.attention import adasplash_available, attend
from mosaic_core.kernels import resolve_kernel

KERNELS: list[
    tuple[str, str, dict, str | None]
] = [  # label, kernel, parameters, backend (None: --backend)
    ("softmax (SDPA)", "softmax", {}, None),
    ("sparsemax", "sparsemax", {}, None),
    ("1.5-entmax (biweight)", "entmax", {"alpha": 1.5}, None),
    ("4/3-entmax (triweight)", "entmax", {"alpha": 4 / 3}, None),
    (
        "normrelu",
        "normrelu",
        {"gamma": 0.5, "b": -7.0},
        None,
    ),  # the model's [1 − 2(β² − s)]_+ at β = 2
    ("relumax b=1", "relumax", {"b": 1.0}, None),
    ("top-32 softmax", "topk_softmax", {"k": 32}, None),
    ("top-32 uniform", "topk_uniform", {"k": 32}, None),
    ("sparsemax (AdaSplash)", "sparsemax", {}, "adasplash"),  # the anchor to beat
    ("1.5-entmax (AdaSplash)", "entmax", {"alpha": 1.5}, "adasplash"),
]


def path_taken(kernel: str, params: dict, q: torch.Tensor, backend: str) -> str:
    name, p = resolve_kernel(kernel, **params)
    path = attention._path(name, p, q, q, backend)
    if path == "adasplash":
        return "adasplash-v2" if p.get("alpha", 2.0) == 1.5 else "adasplash-v1"
    return path


def measure(kernel: str, params: dict, length: int, backend: str, args: argparse.Namespace) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.heads, length, args.dim)
    keys = (
        torch.nn.functional.normalize(torch.randn(shape, device="cuda", generator=gen), dim=-1)
        * args.beta
    )
    keys = keys.to(torch.bfloat16).requires_grad_()
    values = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)

    def step() -> None:
        out = attend(keys, keys, values, kernel, backend=backend, **params)
        out.backward(grad)
        keys.grad = values.grad = None

    step()  # compile / autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    repeats = args.repeats if length <= 4096 else max(3, args.repeats // 2)
    times = []
    started = time.perf_counter()
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
        if time.perf_counter() - started > args.max_seconds:
            break
    return {
        "ms": statistics.median(times),
        "peak_mib": (torch.cuda.max_memory_allocated() - baseline) / 2**20,
        "path": path_taken(kernel, params, keys.detach(), backend),
    }


def report(rows: list[dict]) -> str:
    """Markdown: fwd+bwd ms with the ratio to SDPA at the same length, and peak MiB."""
    lengths = sorted({row["length"] for row in rows})
    sdpa = {row["length"]: row["ms"] for row in rows if row["kernel"] == "softmax (SDPA)"}
    lines = [
        "| kernel | path | " + " | ".join(f"N={n}" for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for label in dict.fromkeys(row["kernel"] for row in rows):
        cells, paths = [], set()
        for length in lengths:
            row = next((r for r in rows if r["kernel"] == label and r["length"] == length), None)
            if row is None:
                cells.append("—")
                continue
            paths.add(row["path"])
            if row["ms"] is None:
                cells.append(row["path"])
            else:
                ratio = f" ({row['ms'] / sdpa[length]:.1f}×)" if sdpa.get(length) else ""
                cells.append(f"{row['ms']:.2f}{ratio} / {row['peak_mib']:.0f}")
        lines.append(f"| {label} | {', '.join(sorted(paths))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[64, 128, 512, 4096, 16384, 65536]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--beta", type=float, default=2.0, help="key norm: scores are β² cos")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per (kernel, length)")
    parser.add_argument("--backend", default="fast", choices=["fast", "reference"])
    parser.add_argument(
        "--anchor-max-length",
        type=int,
        default=16384,
        help="longest N for the AdaSplash rows (its autotuning takes minutes per length)",
    )
    parser.add_argument("--kernels", nargs="*", help="subset of kernel labels")
    parser.add_argument("--out", help="append one JSON row per measurement to this file")
    parser.add_argument(
        "--report", nargs="+", metavar="JSONL", help="print the Markdown table of earlier runs"
    )
    args = parser.parse_args()
    if args.report:
        rows = [json.loads(line) for path in args.report for line in open(path) if line.strip()]
        print(report(rows))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA device")

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": str(date.today()),
        "python": platform.python_version(),
        "adasplash": adasplash_available(),
        "batch": args.batch,
        "heads": args.heads,
        "dim": args.dim,
        "beta": args.beta,
    }
    print(json.dumps(meta), flush=True)
    rows = []
    for label, kernel, params, backend in KERNELS:
        if args.kernels and label not in args.kernels:
            continue
        if backend == "adasplash" and not adasplash_available():
            continue
        for length in args.lengths:
            if backend == "adasplash" and length > args.anchor_max_length:
                continue
            try:
                result = measure(kernel, params, length, backend or args.backend, args)
            except torch.OutOfMemoryError:
                result = {"ms": None, "peak_mib": None, "path": "out of memory"}
            except (
                Exception
            ) as error:  # a failing kernel is a row of the report, not the end of the run
                result = {
                    "ms": None,
                    "peak_mib": None,
                    "path": f"error: {type(error).__name__}: {error}"[:200],
                }
            torch.cuda.empty_cache()
            rows.append({"kernel": label, "length": length, **result, **meta})
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()

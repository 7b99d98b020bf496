"""Forward and backward time, peak memory and passes over the keys of every kernel's fast attention
path, next to SDPA softmax.

Strictly causal (Memory Mosaics) attention, bf16, head dim 64, queries = keys = unit vectors × β
(so scores are β² cos, as in the model; β = 5 stands in for trained, sparse heads). Times are
medians of CUDA-event measurements of the forward and of the backward, taken separately, with the
host's time to issue them (`host_ms`: where it nears the total, the GPU waits on launches). Rows of
the fused kernels also carry the passes over the keys each query block's forward made (mean and
max over blocks) and the registers and spills Triton reports for each compiled kernel.

    python bench/kernels.py --out kernels.jsonl          # on a CUDA machine; one JSON row per line
    python bench/kernels.py --report kernels.jsonl       # the Markdown table of RESULTS.md, anywhere
    python bench/kernels.py --passes --lengths 256       # pass counts only, on the CPU (interpreter)
    python bench/kernels.py --launch '{}' '{"block": 128}'  # launch configurations side by side
    python bench/kernels.py --support-tiles --lengths 4096 --batch 1 --heads 2 --beta 2 5  # CPU too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import torch

from mosaic_core import attention
from mosaic_core.attention import adasplash_available, attend
from mosaic_core.kernel_specs import fused_call, resolve_kernel
from mosaic_core.kernels import attention_weights

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


def workload(length: int, beta: float, args: argparse.Namespace, device: str, dtype: torch.dtype):
    """(keys, values, output gradient) of the benchmark: keys are unit vectors × β."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, length, args.dim)
    keys = torch.nn.functional.normalize(torch.randn(shape, device=device, generator=gen), dim=-1)
    keys = (keys * beta).to(dtype).requires_grad_()
    values = torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device, generator=gen).to(dtype)
    return keys, values, grad


def passes(kernel: str, params: dict, keys: torch.Tensor, values: torch.Tensor) -> dict:
    """Mean and max over query blocks of the passes over the keys the fused forward made."""
    from mosaic_core.fused import fused_passes

    counts = fused_passes(
        keys, keys, values, fused_call(kernel, **params), mask_mode="strict_causal", scale=1.0
    )
    return {"passes": counts.mean().item(), "passes_max": counts.max().item()}


def timed(fn, *args) -> tuple[float, float, object]:
    """(ms by CUDA events, ms the host spent issuing the call, result) of one call: where the
    host takes as long as the GPU, the GPU waits for launches (short sequences)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    started = time.perf_counter()
    result = fn(*args)
    host_ms = (time.perf_counter() - started) * 1e3
    end.record()
    end.synchronize()
    return begin.elapsed_time(end), host_ms, result


def measure(
    kernel: str, params: dict, length: int, beta: float, backend: str, args: argparse.Namespace
) -> dict:
    keys, values, grad = workload(length, beta, args, "cuda", torch.bfloat16)

    def forward() -> torch.Tensor:
        return attend(keys, keys, values, kernel, backend=backend, **params)

    def backward(out: torch.Tensor) -> None:
        out.backward(grad)
        keys.grad = values.grad = None

    from mosaic_core.fused import ops

    ops.REGISTERS.clear()
    backward(forward())  # compile / autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    repeats = args.repeats if length <= 4096 else max(3, args.repeats // 2)
    fwd, bwd, host = [], [], []
    started = time.perf_counter()
    for _ in range(repeats):
        fwd_ms, fwd_host_ms, out = timed(forward)
        bwd_ms, bwd_host_ms, _ = timed(backward, out)
        fwd.append(fwd_ms)
        bwd.append(bwd_ms)
        host.append(fwd_host_ms + bwd_host_ms)
        if time.perf_counter() - started > args.max_seconds:
            break
    path = path_taken(kernel, params, keys.detach(), backend)
    row = {
        "ms": statistics.median(f + b for f, b in zip(fwd, bwd)),
        "fwd_ms": statistics.median(fwd),
        "bwd_ms": statistics.median(bwd),
        "host_ms": statistics.median(host),  # issuing forward and backward, host side
        "peak_mib": (torch.cuda.max_memory_allocated() - baseline) / 2**20,
        "path": path,
    }
    if path == "fused":
        row.update(passes(kernel, params, keys, values), registers=dict(ops.REGISTERS))
        try:
            row["kernel_ms"] = kernel_times(forward, backward)
        except RuntimeError as error:  # a profiler that cannot start keeps the row's timings
            row["kernel_ms_error"] = str(error)[:200]
    return row


def kernel_times(forward, backward) -> dict[str, float]:
    """ms of each CUDA kernel (Triton's by their names) in one profiled forward + backward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        backward(forward())
        torch.cuda.synchronize()
    return {
        event.key[:60]: event.device_time_total / 1000
        for event in profile.key_averages()
        if event.device_type == torch.autograd.DeviceType.CUDA
    }


def count_passes(args: argparse.Namespace) -> None:
    """Pass counts of every fused kernel on the benchmark's scores, without timing (CPU is fine:
    Triton's interpreter runs the kernels in float32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":  # before the kernels are first imported, as tests/conftest.py does
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for beta in args.beta:
        for length in args.lengths:
            keys, values, _ = workload(length, beta, args, device, dtype)
            for label, kernel, params, backend in selected(args):
                if backend is None and fused_call(kernel, **params) is not None:
                    row = {"kernel": label, "length": length, "beta": beta, "device": device}
                    print(json.dumps({**row, **passes(kernel, params, keys, values)}), flush=True)


SUPPORT_TILE = 64  # the fused kernels' query and key tile at D = 64


def support_tiles(args: argparse.Namespace, block: int = SUPPORT_TILE) -> None:
    """Mean keys per row with a nonzero weight, and the share of causal (block × block) tiles that
    hold one: the most a block-skipping kernel could not skip (float64 reference, CPU is fine)."""
    for beta in args.beta:
        for length in args.lengths:
            keys, _, _ = workload(length, beta, args, "cpu", torch.float64)
            scores = keys.detach() @ keys.detach().transpose(-2, -1)
            mask = attention.causal_mask(length, length, "strict_causal")
            tiles = length // block
            visible = torch.ones(tiles, tiles, dtype=torch.bool).tril()
            for label, kernel, params, backend in selected(args):
                if backend is None and fused_call(kernel, **params) is not None:
                    nonzero = attention_weights(scores, kernel, mask=mask, **params) > 0
                    per_tile = nonzero.unflatten(-2, (tiles, block)).unflatten(-1, (tiles, block))
                    held = per_tile.any(-1).any(-2)[..., visible]  # (B, H, visible tiles)
                    row = {"kernel": label, "length": length, "beta": beta, "block": block}
                    row |= {"support": nonzero.sum(-1).double().mean().item()}
                    print(json.dumps(row | {"tiles_held": held.double().mean().item()}))


def selected(args: argparse.Namespace) -> list[tuple[str, str, dict, str | None]]:
    return [k for k in KERNELS if not args.kernels or k[0] in args.kernels]


def report(rows: list[dict]) -> str:
    """Markdown: fwd+bwd ms (forward share, ratio to SDPA at the same length and β), peak MiB and
    mean passes over the keys, one table per β."""
    tables = []
    for beta in sorted({row.get("beta", 2.0) for row in rows}):
        subset = [row for row in rows if row.get("beta", 2.0) == beta]
        tables.append(f"β = {beta:g}\n\n" + table(subset))
    return "\n\n".join(tables)


def table(rows: list[dict]) -> str:
    lengths = sorted({row["length"] for row in rows})
    sdpa = {row["length"]: row["ms"] for row in rows if row["kernel"] == "softmax (SDPA)"}
    lines = [
        "| kernel | path | " + " | ".join(f"N={n}" for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for label in dict.fromkeys(row_label(row) for row in rows):
        cells, paths = [], set()
        for length in lengths:
            row = next((r for r in rows if row_label(r) == label and r["length"] == length), None)
            if row is None:
                cells.append("—")
                continue
            paths.add(row["path"])
            cells.append(cell(row, sdpa.get(length)))
        lines.append(f"| {label} | {', '.join(sorted(paths))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def row_label(row: dict) -> str:
    """The kernel, and the launch configuration when a run compared several."""
    launch = row.get("launch")
    return f"{row['kernel']} {json.dumps(launch)}" if launch else row["kernel"]


def cell(row: dict, sdpa_ms: float | None) -> str:
    if row["ms"] is None:
        return row["path"]
    ratio = f" ({row['ms'] / sdpa_ms:.1f}×)" if sdpa_ms else ""
    split = f" [fwd {row['fwd_ms']:.2f}]" if "fwd_ms" in row else ""
    passes = f" {row['passes']:.1f}p" if "passes" in row else ""
    return f"{row['ms']:.2f}{ratio}{split} / {row['peak_mib']:.0f}{passes}"


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
    parser.add_argument(
        "--beta", type=float, nargs="+", default=[2.0], help="key norms: scores are β² cos"
    )
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
    parser.add_argument(
        "--launch",
        nargs="+",
        default=[""],
        metavar="JSON",
        help="fused launch configurations to time in turn (MOSAIC_FUSED_LAUNCH, see fused/ops.py)",
    )
    parser.add_argument("--out", help="append one JSON row per measurement to this file")
    parser.add_argument(
        "--report", nargs="+", metavar="JSONL", help="print the Markdown table of earlier runs"
    )
    parser.add_argument(
        "--passes", action="store_true", help="only count the fused kernels' passes (CPU is fine)"
    )
    parser.add_argument(
        "--support-tiles",
        action="store_true",
        help="only the share of tiles holding a nonzero weight (CPU is fine)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="time the fused two-kernel backward (MOSAIC_FUSED_DETERMINISTIC=1), not the atomic one",
    )
    args = parser.parse_args()
    if args.report:
        rows = [json.loads(line) for path in args.report for line in open(path) if line.strip()]
        print(report(rows))
        return
    if args.passes:
        count_passes(args)
        return
    if args.support_tiles:
        if any(length % SUPPORT_TILE for length in args.lengths):
            parser.error(
                f"--support-tiles needs lengths that are multiples of its {SUPPORT_TILE}-key tiles"
            )
        support_tiles(args)
        return
    launches = parsed_launches(parser, args.launch)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA device")
    if args.deterministic:
        os.environ["MOSAIC_FUSED_DETERMINISTIC"] = "1"
    from mosaic_core.fused.ops import LAUNCH_ENV

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": str(date.today()),
        "python": platform.python_version(),
        "adasplash": adasplash_available(),
        "batch": args.batch,
        "heads": args.heads,
        "dim": args.dim,
        "deterministic_backward": args.deterministic,
    }
    print(json.dumps(meta), flush=True)
    rows = []
    for launch, override in launches.items():
        os.environ[LAUNCH_ENV] = launch
        for beta in args.beta:
            rows += measure_all(beta, {**meta, "launch": override}, args)
    print(report(rows))


def parsed_launches(parser: argparse.ArgumentParser, launches: list[str]) -> dict[str, dict]:
    """Each --launch configuration and its parsed override, every one checked before any work
    (a bad one ends in parser.error: one line, exit 2)."""
    from mosaic_core.fused.ops import parsed_override

    parsed = {}
    for launch in launches:
        try:
            parsed[launch] = parsed_override(launch)
        except ValueError as error:  # json.JSONDecodeError is one too
            parser.error(f"--launch {launch!r}: {error}")
    return parsed


def measure_all(beta: float, meta: dict, args: argparse.Namespace) -> list[dict]:
    """Rows of every selected kernel at every length for one β, printed and appended to --out."""
    rows = []
    for label, kernel, params, backend in selected(args):
        if backend == "adasplash" and not adasplash_available():
            continue
        for length in args.lengths:
            if backend == "adasplash" and length > args.anchor_max_length:
                continue
            result = guarded(kernel, params, length, beta, backend or args.backend, args)
            torch.cuda.empty_cache()
            rows.append({"kernel": label, "length": length, **result, **meta, "beta": beta})
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    return rows


def guarded(
    kernel: str, params: dict, length: int, beta: float, backend: str, args: argparse.Namespace
) -> dict:
    """measure(), with a failure as a row of the report rather than the end of the run."""
    try:
        return measure(kernel, params, length, beta, backend, args)
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_mib": None, "path": "out of memory"}
    except Exception as error:
        return {
            "ms": None,
            "peak_mib": None,
            "path": f"error: {type(error).__name__}: {error}"[:200],
        }


if __name__ == "__main__":
    main()

"""Training throughput of Memory Mosaics per kernel, next to a GPT-2 style transformer with SDPA.

Tokens/s and model-FLOPs utilisation (MFU) of full training steps (bf16 autocast, fused AdamW,
clipping: `mosaic_core.train.optimizer_step`) on random tokens, for the paper's configurations:
language model n_embd 768, 12 heads, context 512, depth 1/8/12; synthetic n_embd 512, 8 heads,
context 128, depth 2/4. Model FLOPs per token: 6·(parameters, head included) + 12·L·n·T for the
attention (the PaLM convention); the leaky averages are not counted.

    python bench/model.py --out model.jsonl          # on a CUDA machine
    python bench/model.py --report model.jsonl       # the Markdown table of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

from mosaic_core.config import ModelConfig, TrainConfig
from mosaic_core.model import MemoryMosaics
from mosaic_core.train import build_optimizer, optimizer_step

H100_BF16_PEAK_FLOPS = 989.4e12  # dense, SXM

CONFIGS = {  # name: (n_layer, n_embd, n_head, context, vocab, batch)
    "LM L=1": (1, 768, 12, 512, 50304, 16),
    "LM L=8": (8, 768, 12, 512, 50304, 16),
    "LM L=12": (12, 768, 12, 512, 50304, 16),
    "synthetic L=2": (2, 512, 8, 128, 263, 64),
    "synthetic L=2 N=131": (2, 512, 8, 131, 263, 256),  # sort's longest training sequence
    "synthetic L=4": (4, 512, 8, 128, 263, 64),
    "synthetic L=4 N=80": (4, 512, 8, 80, 263, 256),  # MQMTAR's length, the paper's batch
    "synthetic L=4 N=131": (4, 512, 8, 131, 263, 256),
}
KERNELS = {
    "softmax": {},
    "sparsemax": {},
    "entmax": {"alpha": 1.5},
    "triweight": {},
    "normrelu": {},
    "relumax": {"b": 1.0},
    "topk_softmax": {"k": 32},
    "topk_uniform": {"k": 32},
}


class GPT2Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, n_embd = x.shape
        q, k, v = (
            self.qkv(self.ln1(x)).view(batch, length, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, n_embd))
        return x + self.mlp(self.ln2(x))


class GPT2(nn.Module):
    """The baseline: learned positions, pre-LN blocks with SDPA and a 4n MLP, tied head."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, context: int, vocab: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, n_embd), nn.Embedding(context, n_embd)
        self.blocks = nn.ModuleList(GPT2Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.position(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.T

    def optimizer_groups(self, weight_decay: float, every_parameter: bool = False) -> list[dict]:
        params = list(self.parameters())
        if every_parameter:
            return [{"params": params, "weight_decay": weight_decay}]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]


def flops_per_token(model: nn.Module, n_layer: int, n_embd: int, context: int) -> float:
    embedding = sum(
        p.numel() for name, p in model.named_parameters() if name.startswith("position")
    )
    params = sum(p.numel() for p in model.parameters()) - embedding  # the tied head does count
    return 6 * params + 12 * n_layer * n_embd * context


def measure(name: str, model: nn.Module, shape: tuple, args: argparse.Namespace) -> dict:
    n_layer, n_embd, _, context, vocab, batch = shape
    device = torch.device("cuda")
    model = model.to(device)
    train = TrainConfig(batch_size=batch, lr=1e-4, min_lr=1e-5)
    optimizer = build_optimizer(model, train, device)
    forward = compiled(model, args.compile_mode) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(
        0, vocab, (args.steps + args.warmup, batch, context + 1), device=device, generator=gen
    )
    times = []
    started = time.perf_counter()
    for step in range(args.warmup + args.steps):
        batch_tokens = tokens[step]
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        optimizer_step(
            model, forward, optimizer, [(batch_tokens[:, :-1], batch_tokens[:, 1:])], train, device
        )
        end.record()
        end.synchronize()
        if step == 0:  # what compiling costs a trial once
            first_step_s = time.perf_counter() - started
        if step >= args.warmup:
            times.append(begin.elapsed_time(end) / 1000)
    seconds = statistics.median(times)
    tokens_per_s = batch * context / seconds
    flops = flops_per_token(model, n_layer, n_embd, context)
    return {
        "config": name,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops / H100_BF16_PEAK_FLOPS,
        "step_ms": seconds * 1000,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": first_step_s,
        "n_layer": n_layer,
        "context": context,
        "batch": batch,
    }


def compiled(model: nn.Module, mode: str) -> nn.Module:
    return torch.compile(model, mode=None if mode == "default" else mode)


def build(model_name: str, shape: tuple) -> nn.Module:
    n_layer, n_embd, n_head, context, vocab, _ = shape
    if model_name == "GPT-2 (SDPA)":
        return GPT2(n_layer, n_embd, n_head, context, vocab)
    kernel = model_name.removeprefix("MM ")
    config = ModelConfig(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, kernel=kernel, kernel_params=KERNELS[kernel]
    )
    return MemoryMosaics(config, vocab)


def profile(config: str, model_name: str, compile_mode: str | None) -> None:
    """The CUDA time of three training steps by operator, largest first."""
    shape = CONFIGS[config]
    _, _, _, context, vocab, batch = shape
    device = torch.device("cuda")
    model = build(model_name, shape).to(device)
    train = TrainConfig(batch_size=batch, lr=1e-4, min_lr=1e-5)
    optimizer = build_optimizer(model, train, device)
    tokens = torch.randint(0, vocab, (batch, context + 1), device=device)

    forward = compiled(model, compile_mode) if compile_mode else model

    def step():
        return optimizer_step(
            model, forward, optimizer, [(tokens[:, :-1], tokens[:, 1:])], train, device
        )

    for _ in range(3):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"{model_name}, {config}, compile {compile_mode}: CUDA time by operator over 3 steps")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    )


def report(rows: list[dict]) -> str:
    configs = list(dict.fromkeys(row["config"] for row in rows))
    lines = ["| model | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for model in dict.fromkeys(row["model"] for row in rows):
        cells = []
        for config in configs:
            row = next((r for r in rows if r["model"] == model and r["config"] == config), None)
            base = next(
                (r for r in rows if r["model"] == "GPT-2 (SDPA)" and r["config"] == config), None
            )
            if row is None or row.get("tokens_per_s") is None:
                cells.append("—" if row is None else row.get("error", "—"))
                continue
            ratio = (
                f" ({row['tokens_per_s'] / base['tokens_per_s']:.2f}×)"
                if base and base.get("tokens_per_s")
                else ""
            )
            cells.append(f"{row['tokens_per_s'] / 1e3:.0f}k{ratio}, MFU {100 * row['mfu']:.0f}%")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def evaluation_memory(lengths: list[int], kernels: list[str]) -> list[dict]:
    """Peak GPU memory of one evaluation forward (bf16 autocast, batch 1) of the paper's MQMTAR
    model (L = 4, n_embd 512, 8 heads, pmem 2688) at each length: linear in T means no T × T
    tensor anywhere (the leaky averages are chunked scans, attention is fused)."""
    rows = []
    for kernel in kernels:
        config = ModelConfig(n_layer=4, n_embd=512, n_head=8, pmem_size=2688, kernel=kernel,
                             kernel_params=KERNELS[kernel])  # fmt: skip
        model = MemoryMosaics(config, 263).cuda().eval()
        weights = torch.cuda.memory_allocated()
        for length in lengths:
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(torch.randint(0, 263, (1, length), device="cuda"))
            peak = (torch.cuda.max_memory_allocated() - weights) / 2**30
            rows.append({"model": f"MM {kernel}", "config": "evaluation", "length": length,
                         "peak_gib_above_weights": peak})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="torch.compile's mode with --compile",
    )
    parser.add_argument(
        "--profile",
        nargs=2,
        metavar=("CONFIG", "MODEL"),
        help="print where the time of one model's training step goes, e.g. 'LM L=8' 'MM sparsemax'",
    )
    parser.add_argument(
        "--eval-memory",
        nargs="+",
        type=int,
        metavar="T",
        help="peak memory of one evaluation forward at these lengths (e.g. 1024 4096 16384)",
    )
    parser.add_argument("--out", help="append one JSON row per measurement to this file")
    parser.add_argument(
        "--report", nargs="+", metavar="JSONL", help="print the Markdown table of earlier runs"
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
        raise SystemExit("bench/model.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": str(date.today()),
        "compile": args.compile_mode if args.compile else False,
        "steps": args.steps,
        "commit": os.environ.get("BENCH_COMMIT", "unknown"),
    }
    if args.profile:
        profile(*args.profile, args.compile_mode if args.compile else None)
        return
    if args.eval_memory:
        for row in evaluation_memory(args.eval_memory, args.kernels):
            print(json.dumps({**row, **meta}), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**row, **meta}) + "\n")
        return
    rows = []
    for config in args.configs:
        shape = CONFIGS[config]
        for model_name in ["GPT-2 (SDPA)", *(f"MM {kernel}" for kernel in args.kernels)]:
            torch.cuda.reset_peak_memory_stats()
            try:
                row = measure(config, build(model_name, shape), shape, args)
            except torch.OutOfMemoryError:
                row = {"config": config, "error": "out of memory"}
            torch.cuda.empty_cache()
            rows.append({"model": model_name, **row, **meta})
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()

"""The fused kernels as `torch.library` custom ops (so torch.compile keeps one graph), the same
forward and backward as an autograd.Function for eager mode (`differentiable_forward`), and the
launch configuration.

Tuning is bounded by construction: the tile is chosen from the shape class (next power of two of
N, capped at 64; 32 when a row of D elements exceeds 256 bytes) and so is the warp count, one for
every kernel of a call, so no shape is ever autotuned. The forward and backward kernels must share
one tile and warp count anyway: the top-k selection compares recomputed scores bitwise with the
forward's. Benchmarks compare other launches through MOSAIC_FUSED_LAUNCH (`parsed_override`).
"""

import functools
import json
import math
import os

import torch
import triton
from torch import Tensor

from mosaic_core.fused import triton_kernels as tk

HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.dot needs ≥ 16 and tiles a power of two
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KINDS = {"entmax": 0, "relu": 1, "topk_softmax": 2, "topk_uniform": 3}
_ENTMAX, _RELU = KINDS["entmax"], KINDS["relu"]
_NEWTON_TOLERANCE = (
    1e-5  # relative step size at which τ's search stops; the weights are then normalised
)
_NEWTON_MAX_ITERS = (
    40  # never reached in practice: Newton converges in ≤ 10 steps, bisection guards it
)
STATS = 5  # per row: three thresholds, the normaliser, the passes its query block made
REGISTERS: dict[str, dict[str, int]] = {}  # kernel → n_regs, n_spills of its latest compiled launch


def _note_registers(name: str, compiled) -> None:
    """Keep the register use Triton reports for a compiled launch (none in the interpreter)."""
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is not None:
        REGISTERS[name] = {"n_regs": int(n_regs), "n_spills": int(compiled.n_spills)}


LAUNCH_ENV = "MOSAIC_FUSED_LAUNCH"  # benchmarks only: JSON overriding the tile and launches below
ROLES = ("statistics", "forward", "backward")
_CALL_KEYS = {"block": (16, 32, 64, 128), "num_warps": (1, 2, 4, 8, 16)}  # one value per call
_ROLE_KEYS = ("num_stages", "maxnreg")  # per kernel role; null drops a default


@functools.cache
def parsed_override(text: str) -> dict:
    """The override as a dict, refused (ValueError naming what is allowed) unless every key is
    known and every value allowed. Tile and warps are per call, not per kernel: top-k's backward
    must recompute the forward's scores bit for bit."""
    override = json.loads(text) if text else {}
    allowed = (
        f"{LAUNCH_ENV} takes a JSON object with 'block' in {_CALL_KEYS['block']}, 'num_warps' in "
        f"{_CALL_KEYS['num_warps']} and per role {ROLES} an object of {_ROLE_KEYS}"
    )
    if not isinstance(override, dict):
        raise ValueError(f"{allowed}; got {text}")
    for key, value in override.items():
        call_key = key in _CALL_KEYS and type(value) is int and value in _CALL_KEYS[key]
        role_key = key in ROLES and isinstance(value, dict) and set(value) <= set(_ROLE_KEYS)
        if not (call_key or role_key):
            raise ValueError(f"{allowed}; got {key}={value}")
    return override


def _override() -> dict:
    """The launch override of MOSAIC_FUSED_LAUNCH, e.g. '{"block": 128, "num_warps": 8,
    "statistics": {"num_stages": 2}}': how bench/kernels.py --launch compares configurations;
    never set in training."""
    return parsed_override(os.environ.get(LAUNCH_ENV, ""))


def block_size(length: int, head_dim: int, dtype: torch.dtype) -> int:
    """Query and key tile (equal, so causal tiles line up) for a shape class."""
    widest = 64 if head_dim * dtype.itemsize <= 256 else 32
    widest = _override().get("block", widest)
    return max(16, min(widest, triton.next_power_of_2(length)))


def num_warps(block: int, head_dim: int) -> int:
    """Warps for a tile: 4 up to 64 × 64 (BLOCK, D) accumulators, so a warp owns whole rows and
    the per-row sums and maxima of every pass stay within warps (on an H100 at N = 4096, D = 64,
    bf16, 4 warps against 8: forward 0.57 against 1.15 ms, statistics 2.6 against 3.5 ms, backward
    1.3 against 2.4 ms; bench/data/kernels-h100-launch-configs.jsonl); 8 for wider tiles."""
    return _override().get("num_warps", 4 if block * head_dim <= 64 * 64 else 8)


def launch(role: str, block: int, head_dim: int, kind: int) -> dict:
    """num_warps (and num_stages, maxnreg) of one kernel role: the defaults, or the override's."""
    chosen = {"num_warps": num_warps(block, head_dim)}
    if role == "statistics" and kind == _ENTMAX:
        # 128 registers (about 30 spilled) let twice the blocks share an SM: on an H100 at
        # N = 4096, D = 64, 4 warps, statistics 2.01 against 2.23 ms uncapped (sparsemax), 1.93
        # against 2.04 (1.5-entmax), in one run (bench/data/kernels-h100-host.jsonl); wide tiles
        # (D ≥ 128, 8 warps) had the cap before, unmeasured since
        chosen["maxnreg"] = 128
    chosen |= _override().get(role, {})
    return {key: value for key, value in chosen.items() if value is not None}  # null: no cap


def _power_codes(alpha: float) -> tuple[int, int]:
    """Compile-time codes of the exponents r = 1/(α−1) and r − 1: integers by products, else −1."""
    r = 1.0 / (alpha - 1.0)
    if abs(r - round(r)) < 1e-9 and 1 <= round(r) <= 4:
        return round(r), round(r) - 1
    return -1, -1


def _meta(
    q: Tensor, kind: int, alpha: float, fallback: bool, causal: bool, offset: int, dropout_p: float
) -> dict:
    p_code, g_code = _power_codes(alpha)
    return {
        "D": q.shape[-1],
        "KIND": kind,
        "P_CODE": p_code,
        "G_CODE": g_code,
        "FALLBACK": fallback,
        "CAUSAL": causal,
        "OFFSET": offset,
        "DROPOUT": dropout_p > 0,
        "BLOCK": block_size(q.shape[-2], q.shape[-1], q.dtype),
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


_SEARCH_META = (
    "D",
    "KIND",
    "P_CODE",
    "G_CODE",
    "CAUSAL",
    "OFFSET",
    "BLOCK",
    "PRECISION",
)


def _grid(q: Tensor, block: int) -> tuple[int, int]:
    return triton.cdiv(q.shape[-2], block), math.prod(q.shape[:-2])


def _u_shape(q: Tensor, kind: int) -> tuple[int, ...]:
    return tuple(q.shape) if kind in (_ENTMAX, _RELU) else (0,)


def _score_scale(kind: int, scale: float, alpha: float) -> float:
    """Entmax works on x = (α−1)·s: its thresholds and powers are in those units."""
    return scale * (alpha - 1.0) if kind == _ENTMAX else scale


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    c: Tensor,
    seed: Tensor,
    kind: int,
    alpha: float,
    a: float,
    top_k: int,
    fallback: bool,
    causal: bool,
    offset: int,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, row statistics, U) for (B, H, N, D) contiguous q, k, v; U, in float32, is what ρ is
    taken against: the G-weighted mean of v for entmax, the output for the ReLU family, none
    otherwise."""
    n = q.shape[-2]
    out = torch.empty_like(q)
    stats = torch.empty(*q.shape[:-1], STATS, device=q.device, dtype=torch.float32)
    u = torch.empty(_u_shape(q, kind), device=q.device, dtype=torch.float32)
    meta = _meta(q, kind, alpha, fallback, causal, offset, dropout_p)
    grid = _grid(q, meta["BLOCK"])
    x_scale = _score_scale(kind, scale, alpha)
    if kind != _RELU:
        search = {key: meta[key] for key in _SEARCH_META}
        compiled = tk.statistics_kernel[grid](
            q,
            k,
            stats,
            x_scale,
            alpha,
            top_k,
            n,
            CERTIFY=1 <= meta["P_CODE"] <= 3,
            TOL=_NEWTON_TOLERANCE,
            MAX_ITERS=_NEWTON_MAX_ITERS,
            **search,
            **launch("statistics", meta["BLOCK"], meta["D"], kind),
        )
        _note_registers("statistics", compiled)
    meta |= launch("forward", meta["BLOCK"], meta["D"], kind)
    compiled = tk.forward_kernel[grid](
        q, k, v, c, out, stats, u, int(seed), x_scale, alpha, a, dropout_p, n, **meta
    )
    _note_registers("forward", compiled)
    return out, stats, u


fused_forward = torch.library.custom_op(
    "mosaic::fused_attention", attention_forward, mutates_args=()
)


@fused_forward.register_fake
def _(q, k, v, c, seed, kind, alpha, a, top_k, fallback, causal, offset, scale, dropout_p):
    stats = q.new_empty(*q.shape[:-1], STATS, dtype=torch.float32)
    return (
        torch.empty_like(q),
        stats,
        q.new_empty(_u_shape(q, kind), dtype=torch.float32),
    )


def attention_backward(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    u: Tensor,
    seed: Tensor,
    kind: int,
    alpha: float,
    a: float,
    fallback: bool,
    causal: bool,
    offset: int,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dc); dc, the gradient of the ReLU family's per-row offset, is empty otherwise."""
    d_out = d_out.contiguous()
    # ρ_i = Σ_j G_ij dp_ij / Σ_j G_ij: dO·U for entmax and the ReLU family, dO·O for top-k (the
    # product promotes dO to float32 in its one kernel)
    rho = (d_out * (out.float() if u.numel() == 0 else u)).sum(-1)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dc = torch.zeros(q.shape[:-1] if kind == _RELU else (0,), device=q.device, dtype=torch.float32)
    meta = _meta(q, kind, alpha, fallback, causal, offset, dropout_p)
    meta |= launch("backward", meta["BLOCK"], meta["D"], kind)
    grid = _grid(q, meta["BLOCK"])
    args = (int(seed), _score_scale(kind, scale, alpha), alpha, a, dropout_p, q.shape[-2])
    atomic = not deterministic()
    dq = (
        torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        if atomic
        else torch.empty_like(q)
    )
    compiled = tk.backward_kv_kernel[grid](
        q, k, v, stats, d_out, rho, dk, dv, dq, dc, *args, ATOMIC=atomic, **meta
    )
    _note_registers("backward_kv", compiled)
    if atomic:
        return dq.to(q.dtype), dk, dv, dc
    compiled = tk.backward_q_kernel[grid](q, k, v, stats, d_out, rho, dq, dc, *args, **meta)
    _note_registers("backward_q", compiled)
    return dq, dk, dv, dc


def deterministic() -> bool:
    """The two-kernel backward, whose dQ sums in a fixed order: under
    torch.use_deterministic_algorithms(True) or MOSAIC_FUSED_DETERMINISTIC=1. Otherwise one
    kernel adds each key block's share of dQ atomically (float32; order varies run to run)."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get(
        "MOSAIC_FUSED_DETERMINISTIC", "0"
    ) not in ("", "0")


fused_backward = torch.library.custom_op(
    "mosaic::fused_attention_backward", attention_backward, mutates_args=()
)


@fused_backward.register_fake
def _(
    d_out, q, k, v, out, stats, u, seed, kind, alpha, a, fallback, causal, offset, scale, dropout_p
):
    dc = q.new_empty(q.shape[:-1] if kind == _RELU else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dc


_SCALARS = ("kind", "alpha", "a", "top_k", "fallback", "causal", "offset", "scale", "dropout_p")


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, c, seed, *scalars = inputs
    out, stats, u = output
    ctx.save_for_backward(q, k, v, out, stats, u, seed)
    ctx.scalars = dict(zip(_SCALARS, scalars))


def _gradients(ctx, d_out: Tensor, backward) -> tuple:
    """The inputs' gradients through `backward`: the custom op under torch.compile, else the
    plain function."""
    q, k, v, out, stats, u, seed = ctx.saved_tensors
    s = ctx.scalars
    scalars = [s[name] for name in _SCALARS if name != "top_k"]
    dq, dk, dv, dc = backward(d_out, q, k, v, out, stats, u, seed, *scalars)
    return dq, dk, dv, dc if s["kind"] == _RELU else None, None, *([None] * len(_SCALARS))


fused_forward.register_autograd(
    lambda ctx, d_out, _d_stats, _d_u: _gradients(ctx, d_out, fused_backward),
    setup_context=_setup_context,
)


class FusedAttention(torch.autograd.Function):
    """Eager mode's entry to the same forward and backward: a custom op's dispatch costs ~100 µs
    of host time per call with these 14 arguments (its autograd layer rebuilds the schema's
    argument list per argument), a Function ~12 µs (CPU, torch 2.13), and at N ≤ 128 the host
    time is the whole step. torch.compile keeps the custom op (one graph, no break)."""

    @staticmethod
    def forward(ctx, q, k, v, c, seed, *scalars):
        output = attention_forward(q, k, v, c, seed, *scalars)
        _setup_context(ctx, (q, k, v, c, seed, *scalars), output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    def backward(ctx, d_out, _d_stats, _d_u):
        if torch.is_grad_enabled():  # create_graph: refused as the custom op refuses it
            raise RuntimeError(
                "the fused attention kernels have no double backward (their backward is "
                "closed-form Triton); use backend='reference' for higher-order gradients"
            )
        return _gradients(ctx, d_out, attention_backward)


def differentiable_forward(*args) -> tuple[Tensor, Tensor, Tensor]:
    """(out, row statistics, U) of attention_forward with autograd, through the custom op when
    torch.compile traces it and through FusedAttention otherwise."""
    if torch.compiler.is_compiling():
        return fused_forward(*args)
    return FusedAttention.apply(*args)


def row_max(q: Tensor, k: Tensor, causal: bool, offset: int, scale: float) -> tuple[Tensor, Tensor]:
    """Each row's largest allowed score (0 in a row that sees no key, whose weights are 0
    whatever its offset) and the earliest key that attains it (no gradient)."""
    m = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    arg = torch.empty(q.shape[:-1], device=q.device, dtype=torch.int32)
    block = block_size(q.shape[-2], q.shape[-1], q.dtype)
    tk.row_max_kernel[_grid(q, block)](
        q,
        k,
        m,
        arg,
        scale,
        q.shape[-2],
        D=q.shape[-1],
        CAUSAL=causal,
        OFFSET=offset,
        BLOCK=block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **launch("statistics", block, q.shape[-1], _RELU),
    )
    return m, arg


row_max_op = torch.library.custom_op("mosaic::row_max", row_max, mutates_args=())


@row_max_op.register_fake
def _(q, k, causal, offset, scale):
    return q.new_empty(q.shape[:-1], dtype=torch.float32), q.new_empty(
        q.shape[:-1], dtype=torch.int32
    )


def keep_mask(
    seed: int, dropout_p: float, batch_heads: int, length: int, device: torch.device
) -> Tensor:
    """(batch_heads, N, N) booleans: which weights the fused kernels keep for this seed."""
    keep = torch.empty(batch_heads, length, length, device=device, dtype=torch.bool)
    block = 16
    tk.keep_mask_kernel[(triton.cdiv(length, block), batch_heads)](
        keep, seed, dropout_p, length, BLOCK=block
    )
    return keep

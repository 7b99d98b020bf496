"""Fused Triton attention for every compact kernel: α-entmax (any α ∈ (1, 2]), the ReLU family and
top-k, forward and backward, causal, strictly causal or unmasked, with attention-weight dropout.

No N×N tensor is ever stored; the backward recomputes the scores (see `triton_kernels`). Needs the
`triton` package (the gpu extra); runs on CUDA, or on the CPU through Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mosaic_core.fused import ops
from mosaic_core.kernel_specs import FusedCall

__all__ = ["fused_applies", "fused_attention", "fused_passes", "keep_mask", "ops"]


def fused_applies(q: Tensor, k: Tensor) -> bool:
    """True when the fused kernels take these (B, H, N, D) tensors: square, a tile-able D, a float type."""
    return (
        q.dim() == 4
        and q.shape == k.shape
        and q.shape[-1] in ops.HEAD_DIMS
        and q.dtype in ops.DTYPES
        and q.shape[-2] > 0
    )


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    call: FusedCall,
    *,
    mask_mode: str | None,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """weights(scale · q kᵀ) @ v through the fused kernels, with dropout of the weights."""
    return _forward(q, k, v, call, mask_mode, scale, dropout_p)[0]


def fused_passes(
    q: Tensor, k: Tensor, v: Tensor, call: FusedCall, *, mask_mode: str | None, scale: float
) -> Tensor:
    """(B, H, query blocks) float: the passes over the keys each query block's forward made
    (relumax's separate row-maximum pass included)."""
    stats = _forward(q.detach(), k.detach(), v.detach(), call, mask_mode, scale, 0.0)[1]
    block = ops.block_size(q.shape[-2], q.shape[-1], q.dtype)
    return stats[..., ::block, ops.STATS - 1] + int(call.anchored)


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    call: FusedCall,
    mask_mode: str | None,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward op's (out, row statistics, U)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    causal, offset = mask_mode is not None, int(mask_mode == "strict_causal")
    seed = (
        torch.randint(2**31 - 1, (), dtype=torch.int64)
        if dropout_p > 0
        else torch.zeros((), dtype=torch.int64)
    )
    c = (
        _row_offsets(q, k, call, causal, offset, scale)
        if call.kind == "relu"
        else q.new_empty(0, dtype=torch.float32)
    )
    return ops.differentiable_forward(
        q,
        k,
        v,
        c,
        seed,
        ops.KINDS[call.kind],
        call.alpha,
        call.a,
        call.top_k,
        call.fallback,
        causal,
        offset,
        scale,
        dropout_p,
    )


def _row_offsets(
    q: Tensor, k: Tensor, call: FusedCall, causal: bool, offset: int, scale: float
) -> Tensor:
    """c of w = [a·s + c]_+ per row: b, or b − max_j s_ij for the max-anchored kernel (relumax;
    the max is 0 in a row that sees no key, whose weights are 0 whatever c is). A number b stays
    a number (a tensor made from one is copied from pageable host memory, which waits for the
    stream)."""
    batch, heads, n, _ = q.shape
    if isinstance(call.b, Tensor):
        b = call.b.to(q.device, torch.float32).squeeze(-1).expand(batch, heads, n)
        return (b - _RowMax.apply(q, k, causal, offset, scale) if call.anchored else b).contiguous()
    if call.anchored:
        return float(call.b) - _RowMax.apply(q, k, causal, offset, scale)
    return torch.full((batch, heads, n), float(call.b), device=q.device, dtype=torch.float32)


class _RowMax(torch.autograd.Function):
    """Each row's largest allowed score (the kernels' own float32 dot product), differentiable:
    its gradient reaches the query and the earliest key that attains it."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, causal: bool, offset: int, scale: float) -> Tensor:
        row_max = ops.row_max_op if torch.compiler.is_compiling() else ops.row_max
        top, arg = row_max(q, k, causal, offset, scale)
        ctx.save_for_backward(q, k, arg)
        ctx.scale = scale
        return top

    @staticmethod
    def backward(ctx, d_top: Tensor):
        q, k, arg = ctx.saved_tensors
        best = arg.long().unsqueeze(-1).expand(q.shape)  # (B, H, N, D): each row's key index
        weight = (d_top * ctx.scale).unsqueeze(-1)  # float32
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = (weight * k.gather(-2, best)).to(q.dtype)
        if ctx.needs_input_grad[1]:  # keys that are the maximum of several rows add up
            dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
            dk = dk.scatter_add_(-2, best, weight * q).to(k.dtype)
        return dq, dk, None, None, None


def keep_mask(
    seed: int, dropout_p: float, batch_heads: int, length: int, device: torch.device | str
) -> Tensor:
    """(batch_heads, N, N) booleans: the weights the fused kernels keep with this seed."""
    return ops.keep_mask(seed, dropout_p, batch_heads, length, torch.device(device))

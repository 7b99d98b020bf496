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
    return ops.fused_forward(
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
    """c of w = [a·s + c]_+ per row: b, or b − max_j s_ij for the max-anchored kernel (relumax).

    The maximum is written as a differentiable expression of the best key, so its gradient
    reaches that key and the query through autograd.
    """
    batch, heads, n, d = q.shape
    b = torch.as_tensor(call.b, dtype=torch.float32, device=q.device)
    if not call.anchored:
        return b.squeeze(-1).expand(batch, heads, n).contiguous()
    _, arg = ops.row_max(q.detach(), k.detach(), causal, offset, scale)
    best_key = k.gather(-2, arg.long().unsqueeze(-1).expand(-1, -1, -1, d))
    top = scale * (q.float() * best_key.float()).sum(-1)
    seen = (
        torch.arange(n, device=q.device) >= offset
        if causal
        else torch.ones(n, dtype=torch.bool, device=q.device)
    )
    return torch.where(seen, b.squeeze(-1) - top, 0.0).contiguous()


def keep_mask(
    seed: int, dropout_p: float, batch_heads: int, length: int, device: torch.device | str
) -> Tensor:
    """(batch_heads, N, N) booleans: the weights the fused kernels keep with this seed."""
    return ops.keep_mask(seed, dropout_p, batch_heads, length, torch.device(device))

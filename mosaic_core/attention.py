"""Nadaraya–Watson attention over (q, k, v): the reference, and fast paths that must agree with it.

Backends:
- "reference": dense scores and `attention_weights`; exact, O(N²) memory. The oracle.
- "fast": `scaled_dot_product_attention` for softmax; AdaSplash's Triton kernels for sparsemax and
  α-entmax, and our fused Triton kernels for normrelu and relumax (`triton_relu`), on CUDA where
  their conditions hold; every other case computed in query chunks with recomputation in
  backward, so no N×N tensor is kept at long N.
- "auto": "fast" for CUDA tensors, "reference" otherwise.

Memory Mosaics needs the strictly causal mask (query t sees keys j ≤ t−1). Kernels with only a
causal mask get it by shifting the queries one step: q'_i = q_{i+1} (a zero row appended) under the
causal mask gives output t+1 at row i; the result is shifted back with a zero row 0.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mosaic_core.kernels import attention_weights, resolve_kernel

MASK_MODES: tuple[str | None, ...] = ("strict_causal", "causal", None)
BACKENDS = ("auto", "reference", "fast")

_ADASPLASH_HEAD_DIMS = {16, 32, 64, 128, 256}
_TRITON_HEAD_DIMS = {16, 32, 64, 128, 256}  # tl.dot needs ≥ 16, tiles need a power of two
_ADASPLASH_MIN_LENGTH = 128  # its block-mask tiles and backward assume at least this many rows
_ADASPLASH_MAX_SCORE = 5000.0  # it masks with −10000: larger scores could outrank masked keys
_ADASPLASH_V1_ITERS = 10  # bisection steps of its block-mask kernel (α ≠ 1.5 or non-causal)
_ADASPLASH_V2_ITERS = 2  # Halley–bisection steps of its causal 1.5-entmax kernel
_CHUNK_BUDGET_BYTES = 512 * 2**20  # float32 scores held per query chunk


def causal_mask(n_queries: int, n_keys: int, mask_mode: str | None, *, offset: int = 0, device: Any = None) -> Tensor | None:
    """Boolean (n_queries, n_keys) mask, True where query `offset + i` may see key j; None for no mask."""
    if mask_mode is None:
        return None
    query = torch.arange(offset, offset + n_queries, device=device)[:, None]
    key = torch.arange(n_keys, device=device)[None, :]
    return key <= query - 1 if mask_mode == "strict_causal" else key <= query


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel: str,
    /,
    *,
    mask_mode: str | None = "strict_causal",
    scale: float = 1.0,
    backend: str = "auto",
    dropout_p: float = 0.0,
    **params: Any,
) -> Tensor:
    """dropout(weights(scale · q kᵀ)) @ v for (..., N, D) tensors; queries with no allowed key output 0.

    `dropout_p` drops attention weights (and rescales the rest by 1/(1 − p)) as in the reference
    Memory Mosaics; pass 0 at evaluation. A fast path that cannot drop weights refuses rather
    than skip it (`AttentionDropoutUnsupported`).
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask_mode {mask_mode!r}; allowed: {', '.join(map(str, MASK_MODES))}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    name, p = resolve_kernel(kernel, **params)
    if backend == "auto":
        backend = "fast" if q.is_cuda else "reference"
    if backend == "reference":
        return _dense(q, k, v, name=name, params=p, mask_mode=mask_mode, scale=scale, offset=0, dropout_p=dropout_p)
    square = q.shape[-2] == k.shape[-2]
    if name == "softmax" and square:
        return _sdpa(q, k, v, mask_mode=mask_mode, scale=scale, dropout_p=dropout_p)
    if name in ("sparsemax", "entmax") and square and _adasplash_applies(q, k, scale):
        _refuse_dropout(dropout_p, "AdaSplash")
        return _adasplash(q, k, v, alpha=p.get("alpha", 2.0), mask_mode=mask_mode, scale=scale)
    if name in ("normrelu", "relumax") and square and mask_mode is not None and _triton_relu_applies(q):
        _refuse_dropout(dropout_p, "the fused ReLU kernels")
        return _triton_relu(q, k, v, name, mask_mode=mask_mode, scale=scale, **p)
    return _chunked(q, k, v, name=name, params=p, mask_mode=mask_mode, scale=scale, dropout_p=dropout_p)


class AttentionDropoutUnsupported(ValueError):
    """Attention-weight dropout was asked of a fast path that cannot apply it."""


def _refuse_dropout(dropout_p: float, path: str) -> None:
    if dropout_p > 0:
        raise AttentionDropoutUnsupported(
            f"attention-weight dropout (model.attn_dropout={dropout_p:g}) is not implemented in {path}; "
            "use model.attention_backend: reference, which applies it")


def _dense(q: Tensor, k: Tensor, v: Tensor, *, name: str, params: dict[str, Any], mask_mode: str | None,
           scale: float, offset: int, dropout_p: float = 0.0) -> Tensor:
    if q.dtype in (torch.float16, torch.bfloat16):
        # scores rounded to bf16 would move keys across a compact kernel's support boundary,
        # where its gradient jumps: form them in float32 from the half-precision inputs
        q, k = q.float(), k.float()
    scores = scale * (q @ k.transpose(-2, -1))
    mask = causal_mask(q.shape[-2], k.shape[-2], mask_mode, offset=offset, device=q.device)
    weights = attention_weights(scores, name, mask=mask, **params)
    return F.dropout(weights, dropout_p).to(v.dtype) @ v


def _chunked(q: Tensor, k: Tensor, v: Tensor, *, name: str, params: dict[str, Any], mask_mode: str | None,
             scale: float, dropout_p: float = 0.0) -> Tensor:
    """Dense attention one block of queries at a time; backward recomputes each block's weights
    (with the RNG state of the forward, so a dropped weight stays dropped)."""
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    rows = math.prod(q.shape[:-2])
    chunk = max(16, min(n_queries, _CHUNK_BUDGET_BYTES // max(1, rows * n_keys * 4)))
    outputs = []
    for start in range(0, n_queries, chunk):
        stop = min(n_queries, start + chunk)
        seen = n_keys if mask_mode is None else min(n_keys, stop)  # later keys are masked for every row
        block = functools.partial(_dense, name=name, params=params, mask_mode=mask_mode, scale=scale, offset=start,
                                  dropout_p=dropout_p)
        args = (q[..., start:stop, :], k[..., :seen, :], v[..., :seen, :])
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            outputs.append(checkpoint(block, *args, use_reentrant=False))
        else:
            outputs.append(block(*args))
    return torch.cat(outputs, dim=-2)


@torch.compiler.disable  # see _adasplash
def _triton_relu(q: Tensor, k: Tensor, v: Tensor, name: str, **kwargs: Any) -> Tensor:
    from mosaic_core.triton_relu import relu_attention

    return relu_attention(q, k, v, name, **kwargs)


def _shift_queries(q: Tensor) -> Tensor:
    return torch.cat([q[..., 1:, :], torch.zeros_like(q[..., :1, :])], dim=-2)


def _unshift_output(out: Tensor) -> Tensor:
    return torch.cat([torch.zeros_like(out[..., :1, :]), out[..., :-1, :]], dim=-2)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, mask_mode: str | None, scale: float, dropout_p: float = 0.0) -> Tensor:
    if mask_mode == "strict_causal":
        out = F.scaled_dot_product_attention(_shift_queries(q), k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
        return _unshift_output(out)
    return F.scaled_dot_product_attention(q, k, v, is_causal=mask_mode == "causal", scale=scale, dropout_p=dropout_p)


@functools.cache
def _usable_on_cuda(module: str) -> bool:
    """True when CUDA is here and `module` (from the `gpu` extra) imports."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def adasplash_available() -> bool:
    """True when AdaSplash's Triton kernels can run here."""
    return _usable_on_cuda("adasplash")


def triton_available() -> bool:
    """True when our own Triton kernels can run here."""
    return _usable_on_cuda("triton")


def _triton_relu_applies(q: Tensor) -> bool:
    return q.is_cuda and q.dim() == 4 and q.shape[-1] in _TRITON_HEAD_DIMS and triton_available()


def _adasplash_applies(q: Tensor, k: Tensor, scale: float) -> bool:
    if not (q.is_cuda and q.dim() == 4 and adasplash_available()):
        return False
    if q.shape[-1] not in _ADASPLASH_HEAD_DIMS or q.shape[-2] < _ADASPLASH_MIN_LENGTH:
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    bound = abs(scale) * q.detach().norm(dim=-1).amax() * k.detach().norm(dim=-1).amax()
    return bound.item() <= _ADASPLASH_MAX_SCORE


@torch.compiler.disable  # run as is under torch.compile: Dynamo's tracing of Triton kernels breaks them
def _adasplash(q: Tensor, k: Tensor, v: Tensor, *, alpha: float, mask_mode: str | None, scale: float) -> Tensor:
    """AdaSplash with our conventions: any scale, the strict mask, any N (always through `varlen`)."""
    from adasplash import adasplash_v1, adasplash_v2

    batch, _, length, head_dim = q.shape
    q = q * (scale * math.sqrt(head_dim))  # AdaSplash always scales by 1/√D
    if mask_mode == "strict_causal":
        q = _shift_queries(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    varlen = torch.full((batch,), length, dtype=torch.int32, device=q.device)
    causal = mask_mode is not None
    if alpha == 1.5 and causal:
        out = adasplash_v2(q, k, v, niter=_ADASPLASH_V2_ITERS, varlen=varlen)
    else:
        out = adasplash_v1(q, k, v, alpha=alpha, is_causal=causal, varlen=varlen, niter=_ADASPLASH_V1_ITERS)
    return _unshift_output(out) if mask_mode == "strict_causal" else out


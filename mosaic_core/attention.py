"""Nadaraya–Watson attention over (q, k, v): the reference, and fast paths that must agree with it.

Backends:
- "reference": dense scores and `attention_weights`; exact, O(N²) memory. The oracle.
- "fast": `scaled_dot_product_attention` for softmax and our fused Triton kernels
  (`mosaic_core.fused`) for every other kernel, on CUDA where their conditions hold (square
  attention, D ∈ {16, …, 256}, a float type); every other case computed in query chunks with
  recomputation in backward, so no N×N tensor is kept at long N.
- "adasplash": AdaSplash's Triton kernels for sparsemax and α-entmax where they apply (the
  benchmark's anchor; no dropout), "fast" otherwise.
- "auto": "fast" for CUDA tensors, "reference" otherwise.

`attention_path` says which of these paths a kernel takes.

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

from mosaic_core.kernel_specs import fused_call, resolve_kernel
from mosaic_core.kernels import attention_weights

# how far back the newest key a query sees lies: causal j ≤ t, strictly causal j ≤ t − 1 (Memory
# Mosaics), and j ≤ t − 2, the mask the paper's LM/length code gives three kernels (SPEC §3)
MASK_LAGS: dict[str, int] = {"causal": 0, "strict_causal": 1, "causal_lag2": 2}
MASK_MODES: tuple[str | None, ...] = (*MASK_LAGS, None)
BACKENDS = ("auto", "reference", "fast", "adasplash")

_ADASPLASH_HEAD_DIMS = {16, 32, 64, 128, 256}
_ADASPLASH_MIN_LENGTH = 128  # its block-mask tiles and backward assume at least this many rows
_ADASPLASH_MAX_SCORE = 5000.0  # it masks with −10000: larger scores could outrank masked keys
_ADASPLASH_V1_ITERS = 10  # bisection steps of its block-mask kernel (α ≠ 1.5 or non-causal)
_ADASPLASH_V2_ITERS = 2  # Halley–bisection steps of its causal 1.5-entmax kernel
_CHUNK_BUDGET_BYTES = 512 * 2**20  # float32 scores held per query chunk


def causal_mask(
    n_queries: int, n_keys: int, mask_mode: str | None, *, offset: int = 0, device: Any = None
) -> Tensor | None:
    """Boolean (n_queries, n_keys) mask, True where query `offset + i` may see key j; None for no mask."""
    if mask_mode is None:
        return None
    query = torch.arange(offset, offset + n_queries, device=device)[:, None]
    key = torch.arange(n_keys, device=device)[None, :]
    return key <= query - MASK_LAGS[mask_mode]


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
    Memory Mosaics; pass 0 at evaluation. AdaSplash cannot drop weights and refuses
    (`AttentionDropoutUnsupported`); every other path applies it.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(
            f"unknown mask_mode {mask_mode!r}; allowed: {', '.join(map(str, MASK_MODES))}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    name, p = resolve_kernel(kernel, **params)
    path = _path(name, p, q, k, backend)
    if mask_mode == "causal_lag2" and path not in ("reference", "chunked"):
        # the fast paths know j ≤ t − 1: query t + 1 under it sees j ≤ t − 1 = (t + 1) − 2
        shifted = attend(_shift_queries(q), k, v, name, mask_mode="strict_causal", scale=scale,
                         backend=backend, dropout_p=dropout_p, **p)  # fmt: skip
        return _unshift_output(shifted)
    if path == "reference":
        return _dense(
            q,
            k,
            v,
            name=name,
            params=p,
            mask_mode=mask_mode,
            scale=scale,
            offset=0,
            dropout_p=dropout_p,
        )
    if path == "sdpa":
        return _sdpa(q, k, v, mask_mode=mask_mode, scale=scale, dropout_p=dropout_p)
    if path == "fused":
        from mosaic_core.fused import fused_attention

        return fused_attention(
            q, k, v, fused_call(name, **p), mask_mode=mask_mode, scale=scale, dropout_p=dropout_p
        )
    if path == "adasplash" and _adasplash_bounded(q, k, scale):
        _refuse_dropout(dropout_p, "AdaSplash")
        return _adasplash(q, k, v, alpha=p.get("alpha", 2.0), mask_mode=mask_mode, scale=scale)
    return _chunked(
        q, k, v, name=name, params=p, mask_mode=mask_mode, scale=scale, dropout_p=dropout_p
    )


def attention_path(
    kernel: str,
    params: dict[str, Any],
    device: Any,
    *,
    backend: str = "auto",
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    length: int = 128,
) -> str:
    """The path `attend` takes for square (B, H, N, D) attention with this kernel on `device`:
    "reference", "sdpa", "fused", "adasplash" or "chunked" (for logs and --dry-run)."""
    name, p = resolve_kernel(kernel, **params)
    q = torch.empty(1, 1, length, head_dim, dtype=dtype, device="meta")
    return _path(name, p, q, q, backend, is_cuda=torch.device(device).type == "cuda")


def _path(
    name: str,
    params: dict[str, Any],
    q: Tensor,
    k: Tensor,
    backend: str,
    *,
    is_cuda: bool | None = None,
) -> str:
    is_cuda = q.is_cuda if is_cuda is None else is_cuda
    if backend == "auto":
        backend = "fast" if is_cuda else "reference"
    if backend == "reference":
        return "reference"
    square = q.shape[-2] == k.shape[-2]
    if name == "softmax":
        return "sdpa" if square else "chunked"
    if not (is_cuda and square):
        return "chunked"
    if backend == "adasplash" and name in ("sparsemax", "entmax") and _adasplash_applies(q):
        return "adasplash"
    if fused_call(name, **params) is not None and triton_available():
        from mosaic_core.fused import fused_applies

        return "fused" if fused_applies(q, k) else "chunked"
    return "chunked"


class AttentionDropoutUnsupported(ValueError):
    """Attention-weight dropout was asked of a fast path that cannot apply it."""


def _refuse_dropout(dropout_p: float, path: str) -> None:
    if dropout_p > 0:
        raise AttentionDropoutUnsupported(
            f"attention-weight dropout (model.attn_dropout={dropout_p:g}) is not implemented in {path}; "
            "use model.attention_backend: fast, whose fused kernels apply it"
        )


def _dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    name: str,
    params: dict[str, Any],
    mask_mode: str | None,
    scale: float,
    offset: int,
    dropout_p: float = 0.0,
) -> Tensor:
    if q.dtype in (torch.float16, torch.bfloat16):
        # scores rounded to bf16 would move keys across a compact kernel's support boundary,
        # where its gradient jumps: form them in float32 from the half-precision inputs
        q, k = q.float(), k.float()
    scores = scale * (q @ k.transpose(-2, -1))
    mask = causal_mask(q.shape[-2], k.shape[-2], mask_mode, offset=offset, device=q.device)
    weights = attention_weights(scores, name, mask=mask, **params)
    return F.dropout(weights, dropout_p).to(v.dtype) @ v


def _chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    name: str,
    params: dict[str, Any],
    mask_mode: str | None,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Dense attention one block of queries at a time; backward recomputes each block's weights
    (with the RNG state of the forward, so a dropped weight stays dropped)."""
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    rows = math.prod(q.shape[:-2])
    chunk = max(16, min(n_queries, _CHUNK_BUDGET_BYTES // max(1, rows * n_keys * 4)))
    outputs = []
    for start in range(0, n_queries, chunk):
        stop = min(n_queries, start + chunk)
        # later keys are masked for every row
        seen = n_keys if mask_mode is None else min(n_keys, stop)
        block = functools.partial(
            _dense,
            name=name,
            params=params,
            mask_mode=mask_mode,
            scale=scale,
            offset=start,
            dropout_p=dropout_p,
        )
        args = (q[..., start:stop, :], k[..., :seen, :], v[..., :seen, :])
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            outputs.append(checkpoint(block, *args, use_reentrant=False))
        else:
            outputs.append(block(*args))
    return torch.cat(outputs, dim=-2)


def _shift_queries(q: Tensor) -> Tensor:
    return torch.cat([q[..., 1:, :], torch.zeros_like(q[..., :1, :])], dim=-2)


def _unshift_output(out: Tensor) -> Tensor:
    return torch.cat([torch.zeros_like(out[..., :1, :]), out[..., :-1, :]], dim=-2)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, mask_mode: str | None, scale: float, dropout_p: float = 0.0
) -> Tensor:
    if mask_mode == "strict_causal":
        out = F.scaled_dot_product_attention(
            _shift_queries(q), k, v, is_causal=True, scale=scale, dropout_p=dropout_p
        )
        return _unshift_output(out)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=mask_mode == "causal", scale=scale, dropout_p=dropout_p
    )


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


def _adasplash_applies(q: Tensor) -> bool:
    return (
        q.dim() == 4
        and adasplash_available()
        and q.shape[-1] in _ADASPLASH_HEAD_DIMS
        and q.shape[-2] >= _ADASPLASH_MIN_LENGTH
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def _adasplash_bounded(q: Tensor, k: Tensor, scale: float) -> bool:
    """AdaSplash masks with −10000: larger scores could outrank masked keys (checked on the data)."""
    bound = abs(scale) * q.detach().norm(dim=-1).amax() * k.detach().norm(dim=-1).amax()
    return bound.item() <= _ADASPLASH_MAX_SCORE


def _adasplash(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    if (
        torch.compiler.is_compiling()
    ):  # run as is: Dynamo's tracing of its Triton kernels breaks them
        return torch.compiler.disable(_adasplash_eager)(q, k, v, **kwargs)
    return _adasplash_eager(q, k, v, **kwargs)


def _adasplash_eager(
    q: Tensor, k: Tensor, v: Tensor, *, alpha: float, mask_mode: str | None, scale: float
) -> Tensor:
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
        out = adasplash_v1(
            q, k, v, alpha=alpha, is_causal=causal, varlen=varlen, niter=_ADASPLASH_V1_ITERS
        )
    return _unshift_output(out) if mask_mode == "strict_causal" else out

"""Fused Triton kernels for the ReLU family of Epanechnikov attention: normrelu and relumax.

Both weigh key j for query i by w_ij = [a·s_ij + c_i]_+ with s = scale·q·k under a causal mask,
and return Σ_j w_ij v_j / Σ_j w_ij:
- normrelu: a = 1/γ, c_i = b (a constant per head);
- relumax:  a = 1,   c_i = b − max_j s_ij, the row maximum found by a first pass.
Like flash attention, no N×N tensor is ever stored: the forward keeps the output and the row
sums l_i, the backward recomputes the scores block by block. The maximum's gradient (relumax)
and the uniform fallback of rows with no positive weight (normrelu) are added in PyTorch.

Backward: with O_i = Σ w_ij v_j / l_i and Δ_i = dO_i·O_i, on the support (a·s + c > 0)
dw_ij = (dO_i·v_j − Δ_i) / l_i, ds_ij = a·dw_ij, dc_i = Σ_j dw_ij, dv_j = Σ_i w_ij dO_i / l_i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 64  # query and key tile (equal, so causal tiles line up)


@triton.jit
def _row_max_kernel(Q, K, M, IDX, scale, N, D: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr,
                    PRECISION: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    q = tl.load(Q + bh * N * D + rows[:, None] * D + dims[None, :], mask=rows[:, None] < N, other=0.0)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    for start in range(0, (pid + 1) * BLOCK, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        k = tl.load(K + bh * N * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < N, other=0.0)
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)
        allowed = (cols[None, :] <= rows[:, None] - OFFSET) & (cols[None, :] < N)
        s = tl.where(allowed, s, float("-inf"))
        block_best = tl.max(s, 1)
        block_arg = tl.argmax(s, 1).to(tl.int32) + start
        arg = tl.where(block_best > best, block_arg, arg)  # strict: the earliest maximum wins
        best = tl.maximum(best, block_best)
    tl.store(M + bh * N + rows, best, mask=rows < N)
    tl.store(IDX + bh * N + rows, arg, mask=rows < N)


@triton.jit
def _forward_kernel(Q, K, V, C, O, L, scale, a, N, D: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr,
                    PRECISION: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    q = tl.load(Q + bh * N * D + rows[:, None] * D + dims[None, :], mask=rows[:, None] < N, other=0.0)
    c = tl.load(C + bh * N + rows, mask=rows < N, other=0.0)
    acc = tl.zeros([BLOCK, D], tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, (pid + 1) * BLOCK, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        k = tl.load(K + bh * N * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < N, other=0.0)
        v = tl.load(V + bh * N * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < N, other=0.0)
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)
        allowed = (cols[None, :] <= rows[:, None] - OFFSET) & (cols[None, :] < N)
        w = tl.where(allowed, tl.maximum(a * s + c[:, None], 0.0), 0.0).to(tl.float32)
        total += tl.sum(w, 1)
        acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
    out = tl.where(total[:, None] > 0, acc / tl.where(total > 0, total, 1.0)[:, None], 0.0)
    tl.store(O + bh * N * D + rows[:, None] * D + dims[None, :], out.to(O.dtype.element_ty), mask=rows[:, None] < N)
    tl.store(L + bh * N + rows, total, mask=rows < N)


@triton.jit
def _backward_kv_kernel(Q, K, V, C, DO, L, DELTA, DK, DV, scale, a, N, D: tl.constexpr, OFFSET: tl.constexpr,
                        BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    k = tl.load(K + bh * N * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < N, other=0.0)
    v = tl.load(V + bh * N * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < N, other=0.0)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    for start in range(pid * BLOCK, N, BLOCK):  # only queries at or after this key block see it
        rows = start + tl.arange(0, BLOCK)
        in_range = rows < N
        q = tl.load(Q + bh * N * D + rows[:, None] * D + dims[None, :], mask=in_range[:, None], other=0.0)
        do = tl.load(DO + bh * N * D + rows[:, None] * D + dims[None, :], mask=in_range[:, None], other=0.0)
        c = tl.load(C + bh * N + rows, mask=in_range, other=0.0)
        total = tl.load(L + bh * N + rows, mask=in_range, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=in_range, other=0.0)
        inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)
        pre = (a * s + c[:, None]).to(tl.float32)
        active = (cols[None, :] <= rows[:, None] - OFFSET) & in_range[:, None] & (cols[None, :] < N) & (pre > 0)
        w = tl.where(active, pre, 0.0) * inv[:, None]
        dv += tl.dot(tl.trans(w.to(do.dtype)), do, input_precision=PRECISION)
        dw = (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None]) * inv[:, None]
        ds = tl.where(active, a * dw, 0.0).to(tl.float32)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK + bh * N * D + cols[:, None] * D + dims[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=cols[:, None] < N)
    tl.store(DV + bh * N * D + cols[:, None] * D + dims[None, :], dv.to(DV.dtype.element_ty), mask=cols[:, None] < N)


@triton.jit
def _backward_q_kernel(Q, K, V, C, DO, L, DELTA, DQ, DC, scale, a, N, D: tl.constexpr, OFFSET: tl.constexpr,
                       BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    in_range = rows < N
    q = tl.load(Q + bh * N * D + rows[:, None] * D + dims[None, :], mask=in_range[:, None], other=0.0)
    do = tl.load(DO + bh * N * D + rows[:, None] * D + dims[None, :], mask=in_range[:, None], other=0.0)
    c = tl.load(C + bh * N + rows, mask=in_range, other=0.0)
    total = tl.load(L + bh * N + rows, mask=in_range, other=0.0)
    delta = tl.load(DELTA + bh * N + rows, mask=in_range, other=0.0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    dq = tl.zeros([BLOCK, D], tl.float32)
    dc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, (pid + 1) * BLOCK, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        k = tl.load(K + bh * N * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < N, other=0.0)
        v = tl.load(V + bh * N * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < N, other=0.0)
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)
        pre = (a * s + c[:, None]).to(tl.float32)
        active = (cols[None, :] <= rows[:, None] - OFFSET) & (cols[None, :] < N) & (pre > 0)
        dw = tl.where(active, (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None]) * inv[:, None], 0.0)
        dc += tl.sum(dw, 1)
        dq += tl.dot((a * dw).to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + bh * N * D + rows[:, None] * D + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_range[:, None])
    tl.store(DC + bh * N + rows, dc, mask=in_range)


def _precision(q: Tensor) -> str:
    """float32 inputs get float32 products (not TF32), so they agree with the float32 reference."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _grid(n: int, batch_heads: int) -> tuple[int, int]:
    return triton.cdiv(n, _BLOCK), batch_heads


class _ReluAttention(torch.autograd.Function):
    """(q, k, v, c) -> (out, l) for w = [a·s + c]_+; `l` (the row sums) carries no gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, c: Tensor, a: float, scale: float, offset: int):
        batch, heads, n, d = q.shape
        out = torch.empty_like(q)
        total = torch.empty(batch, heads, n, device=q.device, dtype=torch.float32)
        _forward_kernel[_grid(n, batch * heads)](q, k, v, c, out, total, scale, a, n, D=d, OFFSET=offset, BLOCK=_BLOCK,
                                                 PRECISION=_precision(q))
        ctx.save_for_backward(q, k, v, c, out, total)
        ctx.a, ctx.scale, ctx.offset = a, scale, offset
        ctx.mark_non_differentiable(total)
        return out, total

    @staticmethod
    def backward(ctx, d_out: Tensor, _d_total: Tensor):
        q, k, v, c, out, total = ctx.saved_tensors
        batch, heads, n, d = q.shape
        d_out = d_out.contiguous()
        delta = (d_out.float() * out.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dc = torch.empty_like(c)
        grid = _grid(n, batch * heads)
        args = (ctx.scale, ctx.a, n)
        meta = {"D": d, "OFFSET": ctx.offset, "BLOCK": _BLOCK, "PRECISION": _precision(q)}
        _backward_kv_kernel[grid](q, k, v, c, d_out, total, delta, dk, dv, *args, **meta)
        _backward_q_kernel[grid](q, k, v, c, d_out, total, delta, dq, dc, *args, **meta)
        return dq, dk, dv, dc, None, None, None


def relu_attention(q: Tensor, k: Tensor, v: Tensor, kernel: str, *, mask_mode: str, scale: float,
                   b: float | Tensor, gamma: float = 1.0) -> Tensor:
    """normrelu or relumax attention over (B, H, N, D) tensors with a causal or strictly causal mask."""
    offset = 1 if mask_mode == "strict_causal" else 0
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, n, d = q.shape
    seen = (torch.arange(n, device=q.device) - offset + 1).clamp(min=0)  # keys each query may see
    if kernel == "relumax":
        with torch.no_grad():
            best = torch.empty(batch, heads, n, device=q.device, dtype=torch.float32)
            arg = torch.empty(batch, heads, n, device=q.device, dtype=torch.int32)
            _row_max_kernel[_grid(n, batch * heads)](q, k, best, arg, scale, n, D=d, OFFSET=offset, BLOCK=_BLOCK,
                                                     PRECISION=_precision(q))
        # the maximum as a differentiable expression: its gradient reaches the best key and the query
        best_key = k.gather(-2, arg.long().unsqueeze(-1).expand(-1, -1, -1, d))
        top = scale * (q.float() * best_key.float()).sum(-1)
        c = torch.where(seen > 0, b - top, 0.0)
        a = 1.0
    else:
        c = torch.as_tensor(b, dtype=torch.float32, device=q.device).squeeze(-1).expand(batch, heads, n)
        a = 1.0 / gamma
    out, total = _ReluAttention.apply(q, k, v, c.float().contiguous(), a, scale, offset)
    if kernel == "normrelu":  # no positive weight: uniform over the keys the query may see
        prefix = torch.cumsum(v.float(), dim=-2)
        shifted = torch.cat([torch.zeros_like(prefix[..., :offset, :]), prefix[..., : n - offset, :]], dim=-2)
        uniform = (shifted / seen.clamp(min=1).unsqueeze(-1)).to(v.dtype)
        out = torch.where(total.unsqueeze(-1) > 0, out, uniform)
    return out

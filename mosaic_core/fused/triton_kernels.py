"""The Triton programs behind `mosaic_core.fused`: one forward and two backward kernels for every
fused attention kernel, chosen at compile time by KIND.

Every kernel weighs key j for query i by w_ij = f(s_ij; row statistics of row i), s = SCALE·q·k,
and returns Σ_j w_ij v_j / normaliser_i. The row statistics are found in the forward by passes
over the key blocks of the row (never storing N×N):

- ENTMAX (α-entmax, α ∈ (1, 2]; s in x = (α−1)·scale·q·k units): w = [x − τ]_+^r, r = 1/(α−1).
  τ solves Σ_j [x_j − τ]_+^r = 1. Newton's method on φ(τ) = ‖[x − τ]_+‖_r − 1 (convex and
  decreasing, so from τ₀ = max − 1 it climbs monotonically to the root; for sparsemax it is
  Michelot's algorithm, exact in finitely many steps), safeguarded by a bisection bracket
  [max − 1, max − n^{1−α}], until every row of the block has converged. stats = (τ, Z = Σw).
- RELU (normrelu, relumax): w = [a·s + c]_+ with c per row an input (b, or b − max for relumax);
  with FALLBACK (normrelu), a row with no positive weight is uniform over its allowed keys.
  stats = (c, l = Σw).
- TOPK_SOFTMAX / TOPK_UNIFORM: the k-th largest score t per row by a counting search over the
  order-preserving integer image of the float scores (three cut points per pass, so at most 16
  passes, usually far fewer), then, only where the k-th score is tied, a pass that finds the last
  tied key that still fits (earliest keys win). Selection: s > t, or s = t and j ≤ J.
  stats = (t, J, max, l).

Backward (closed forms, scores recomputed block by block): with p the normalised weights,
dp_ij = dO_i·v_j and ρ_i = Σ_j g_ij dp_ij / Σ_j g_ij, ds_ij = G_ij (dp_ij − ρ_i), where
G = p^{2−α}/(α−1) for entmax (its Jacobian, Peters et al. 2019; ρ from U_i = Σ g v / Σ g kept by
the forward), G = a·[w > 0]/l for the ReLU family and G = p for top-k softmax (ρ_i = dO_i·O_i,
for the ReLU family with O_i kept in float32 as U_i: an output rounded to bf16 would be amplified
by a/l in rows of small mass l), G = 0 for top-k uniform and for uniform-fallback rows. For the same
reason the forward's normalisers sum the weights as rounded to v's dtype for its weighted sums, so a
one-key row returns exactly its v and ρ carries no rounding residue (bf16 normrelu, b = −5, N = 16:
dk off by 2.9 against an exact 0 on an H200 with unrounded sums).

Dropout (DROPOUT): weight (i, j) of head bh is kept iff philox(seed, (bh·N + i)·N + j) ≥ p, in the
forward and again in the backward, so the same weights are dropped in both.
"""

from __future__ import annotations

import triton
import triton.language as tl

ENTMAX: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
TOPK_SOFTMAX: tl.constexpr = tl.constexpr(2)
TOPK_UNIFORM: tl.constexpr = tl.constexpr(3)


@triton.jit
def _power(d, e, CODE: tl.constexpr):
    """d^e for d ≥ 0 (0 where d = 0); CODE 0–4 is an integer e done by products, −1 any real e."""
    if CODE == 0:
        return tl.where(d > 0, 1.0, 0.0)
    elif CODE == 1:
        return d
    elif CODE == 2:
        return d * d
    elif CODE == 3:
        return d * d * d
    elif CODE == 4:
        dd = d * d
        return dd * dd
    else:
        return tl.where(d > 0, tl.exp2(e * tl.log2(tl.where(d > 0, d, 1.0))), 0.0)


@triton.jit
def _load_rows(ptr, offset, rows, N, D: tl.constexpr):
    dims = tl.arange(0, D)
    return tl.load(
        ptr + offset + rows[:, None] * D + dims[None, :], mask=rows[:, None] < N, other=0.0
    )


@triton.jit
def _store_rows(ptr, offset, rows, N, value, D: tl.constexpr):
    dims = tl.arange(0, D)
    tl.store(
        ptr + offset + rows[:, None] * D + dims[None, :],
        value.to(ptr.dtype.element_ty),
        mask=rows[:, None] < N,
    )


@triton.jit
def _scores(
    q, k, rows, cols, N, SCALE, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr
):
    """(SCALE·q kᵀ, allowed) for one tile; -0.0 becomes +0.0 so equal scores compare equal bitwise."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * SCALE + 0.0
    allowed = (cols[None, :] < N) & (rows[:, None] < N)
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= rows[:, None] - OFFSET)
    return s, allowed


@triton.jit
def _keep(seed, bh, rows, cols, N, p_drop):
    offsets = (bh * N + rows.to(tl.int64))[:, None] * N + cols[None, :]
    return tl.rand(seed, offsets) >= p_drop


@triton.jit
def _allowed_count(rows, N, CAUSAL: tl.constexpr, OFFSET: tl.constexpr):
    if CAUSAL:
        n = tl.minimum(tl.maximum(rows - OFFSET + 1, 0), N)
    else:
        n = tl.zeros_like(rows) + N
    return tl.where(rows < N, n, 0)


@triton.jit
def _key_end(pid, N, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any row of query block `pid` may see."""
    if CAUSAL:
        return tl.minimum((pid + 1) * BLOCK, N)
    else:
        return N


@triton.jit
def _ordinal(s):
    """Order-preserving map of float32 to int32 (for −0.0-free inputs)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _from_ordinal(key):
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _unnormalised(
    s,
    allowed,
    cols,
    t0,
    t1,
    t2,
    uniform,
    a,
    r,
    KIND: tl.constexpr,
    P_CODE: tl.constexpr,
    G_CODE: tl.constexpr,
):
    """(w, g): the kernel's unnormalised weights and the factor its score gradient is built from."""
    if KIND == ENTMAX:
        d = tl.where(allowed, s - t0[:, None], 0.0)
        d = tl.maximum(d, 0.0)
        w = _power(d, r, P_CODE)
        g = _power(d, r - 1.0, G_CODE)
    elif KIND == RELU:
        pre = tl.where(allowed, a * s + t0[:, None], 0.0)
        w = tl.maximum(pre, 0.0)
        g = tl.where(pre > 0, a, 0.0)
        w = tl.where(uniform[:, None], tl.where(allowed, 1.0, 0.0), w)
        g = tl.where(uniform[:, None], 0.0, g)
    else:
        chosen = allowed & (
            (s > t0[:, None]) | ((s == t0[:, None]) & (cols[None, :] <= t1[:, None]))
        )
        if KIND == TOPK_SOFTMAX:
            w = tl.where(chosen, tl.exp(s - t2[:, None]), 0.0)
            g = w
        else:
            w = tl.where(chosen, 1.0, 0.0)
            g = tl.zeros_like(w)
    return w, g


@triton.jit
def _row_max(
    q,
    K,
    kv,
    rows,
    pid,
    N,
    SCALE,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(max, earliest argmax, min) of the allowed scores of each row."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    least = tl.full([BLOCK], float("inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    for start in range(0, _key_end(pid, N, BLOCK, CAUSAL), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s, allowed = _scores(
            q, _load_rows(K, kv, cols, N, D), rows, cols, N, SCALE, CAUSAL, OFFSET, PRECISION
        )
        block_best = tl.max(tl.where(allowed, s, float("-inf")), 1)
        block_arg = tl.argmax(tl.where(allowed, s, float("-inf")), 1).to(tl.int32) + start
        arg = tl.where(block_best > best, block_arg, arg)  # strict: the earliest maximum wins
        best = tl.maximum(best, block_best)
        least = tl.minimum(least, tl.min(tl.where(allowed, s, float("inf")), 1))
    return best, arg, least


@triton.jit
def _entmax_threshold(
    q,
    K,
    kv,
    rows,
    pid,
    N,
    SCALE,
    alpha,
    r,
    n_allowed,
    top,
    TOL: tl.constexpr,
    MAX_ITERS: tl.constexpr,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
    P_CODE: tl.constexpr,
    G_CODE: tl.constexpr,
):
    """τ per row by safeguarded Newton on ‖[x − τ]_+‖_r = 1, one pass over the keys per step."""
    has = n_allowed > 0
    top = tl.where(has, top, 0.0)
    lo = top - 1.0
    hi = top - tl.exp2((1.0 - alpha) * tl.log2(tl.maximum(n_allowed, 1).to(tl.float32)))
    tau = lo
    tol = TOL * tl.maximum(tl.abs(top), 1.0)
    moving = tl.max(has.to(tl.int32)) > 0
    step = 0
    while moving & (step < MAX_ITERS):
        f = tl.zeros([BLOCK], tl.float32)
        slope = tl.zeros([BLOCK], tl.float32)
        for start in range(0, _key_end(pid, N, BLOCK, CAUSAL), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s, allowed = _scores(
                q, _load_rows(K, kv, cols, N, D), rows, cols, N, SCALE, CAUSAL, OFFSET, PRECISION
            )
            d = tl.maximum(tl.where(allowed, s - tau[:, None], 0.0), 0.0)
            f += tl.sum(_power(d, r, P_CODE), 1)
            slope += tl.sum(_power(d, r - 1.0, G_CODE), 1)
        lo = tl.where(f >= 1.0, tl.maximum(lo, tau), lo)
        hi = tl.where(f < 1.0, tl.minimum(hi, tau), hi)
        # Newton on φ = f^{1/r} − 1: τ += (f − f^{1−1/r}) / Σ[x − τ]_+^{r−1}
        f_pow = tl.exp2((1.0 - 1.0 / r) * tl.log2(tl.maximum(f, 1e-30)))
        new = tau + (f - f_pow) / tl.where(slope > 0, slope, 1.0)
        safe = (slope > 0) & (new >= lo) & (new <= hi)
        new = tl.where(safe, new, 0.5 * (lo + hi))
        new = tl.where(has, new, 0.0)
        moving = tl.max((tl.abs(new - tau) > tol).to(tl.int32)) > 0
        tau = new
        step += 1
    return tau


@triton.jit
def _count_at_least(
    q,
    K,
    kv,
    rows,
    pid,
    N,
    SCALE,
    c1,
    c2,
    c3,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    n1 = tl.zeros([BLOCK], tl.int32)
    n2 = tl.zeros([BLOCK], tl.int32)
    n3 = tl.zeros([BLOCK], tl.int32)
    for start in range(0, _key_end(pid, N, BLOCK, CAUSAL), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s, allowed = _scores(
            q, _load_rows(K, kv, cols, N, D), rows, cols, N, SCALE, CAUSAL, OFFSET, PRECISION
        )
        key = _ordinal(s)
        n1 += tl.sum((allowed & (key >= c1[:, None])).to(tl.int32), 1)
        n2 += tl.sum((allowed & (key >= c2[:, None])).to(tl.int32), 1)
        n3 += tl.sum((allowed & (key >= c3[:, None])).to(tl.int32), 1)
    return n1, n2, n3


@triton.jit
def _topk_threshold(
    q,
    K,
    kv,
    rows,
    pid,
    N,
    SCALE,
    top_k,
    n_allowed,
    top,
    least,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(t, J): the k-th largest allowed score and the last tied key that still fits (earliest win)."""
    search = n_allowed > top_k
    lo = _ordinal(tl.where(search, least, 0.0))  # count(key ≥ lo) ≥ k
    hi = _ordinal(tl.where(search, top, 0.0)) + 1  # count(key ≥ hi) < k
    n_lo = n_allowed
    n_hi = tl.zeros([BLOCK], tl.int32)
    done = ~search
    step = 0
    while (tl.min(done.to(tl.int32)) == 0) & (step < 40):
        span = hi.to(tl.int64) - lo.to(tl.int64)
        c1 = (lo + span // 4).to(tl.int32)
        c2 = (lo + span // 2).to(tl.int32)
        c3 = (lo + (3 * span) // 4).to(tl.int32)
        n1, n2, n3 = _count_at_least(
            q, K, kv, rows, pid, N, SCALE, c1, c2, c3, D, CAUSAL, OFFSET, BLOCK, PRECISION
        )
        new_lo = tl.where(n3 >= top_k, c3, tl.where(n2 >= top_k, c2, tl.where(n1 >= top_k, c1, lo)))
        new_n_lo = tl.where(
            n3 >= top_k, n3, tl.where(n2 >= top_k, n2, tl.where(n1 >= top_k, n1, n_lo))
        )
        new_hi = tl.where(n1 < top_k, c1, tl.where(n2 < top_k, c2, tl.where(n3 < top_k, c3, hi)))
        new_n_hi = tl.where(
            n1 < top_k, n1, tl.where(n2 < top_k, n2, tl.where(n3 < top_k, n3, n_hi))
        )
        lo = tl.where(done, lo, new_lo)
        n_lo = tl.where(done, n_lo, new_n_lo)
        hi = tl.where(done, hi, new_hi)
        n_hi = tl.where(done, n_hi, new_n_hi)
        done = done | (n_lo == top_k) | (hi - lo <= 1)
        step += 1
    t = tl.where(search, _from_ordinal(lo), float("-inf"))
    tied = search & (n_lo > top_k)  # more keys equal t than there is room for
    room = top_k - n_hi
    last = tl.full([BLOCK], 2147483647, tl.int32)
    if tl.max(tied.to(tl.int32)) > 0:
        seen = tl.zeros([BLOCK], tl.int32)
        last = tl.where(tied, -1, last)
        for start in range(0, _key_end(pid, N, BLOCK, CAUSAL), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s, allowed = _scores(
                q, _load_rows(K, kv, cols, N, D), rows, cols, N, SCALE, CAUSAL, OFFSET, PRECISION
            )
            equal = (allowed & (s == t[:, None])).to(tl.int32)
            fits = (equal > 0) & ((seen[:, None] + tl.cumsum(equal, 1)) <= room[:, None])
            block_last = tl.max(tl.where(fits, cols[None, :], -1), 1)
            last = tl.where(tied, tl.maximum(last, block_last), last)
            seen += tl.sum(equal, 1)
    return t, last


@triton.jit
def forward_kernel(
    Q,
    K,
    V,
    C,
    O,
    STATS,
    U,
    seed,
    SCALE,
    alpha,
    a,
    p_drop,
    top_k,
    N,
    D: tl.constexpr,
    KIND: tl.constexpr,
    P_CODE: tl.constexpr,
    G_CODE: tl.constexpr,
    FALLBACK: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    DROPOUT: tl.constexpr,
    TOL: tl.constexpr,
    MAX_ITERS: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = bh * N * D
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    q = _load_rows(Q, kv, rows, N, D)
    n_allowed = _allowed_count(rows, N, CAUSAL, OFFSET)
    r = 1.0 / (alpha - 1.0)
    t1 = tl.zeros([BLOCK], tl.float32)
    t2 = tl.zeros([BLOCK], tl.float32)
    uniform = n_allowed < 0  # all False
    if KIND == RELU:
        t0 = tl.load(C + bh * N + rows, mask=row_ok, other=0.0)
    else:
        top, arg, least = _row_max(
            q, K, kv, rows, pid, N, SCALE, D, CAUSAL, OFFSET, BLOCK, PRECISION
        )
        if KIND == ENTMAX:
            t0 = _entmax_threshold(
                q,
                K,
                kv,
                rows,
                pid,
                N,
                SCALE,
                alpha,
                r,
                n_allowed,
                top,
                TOL,
                MAX_ITERS,
                D,
                CAUSAL,
                OFFSET,
                BLOCK,
                PRECISION,
                P_CODE,
                G_CODE,
            )
        else:
            t0, last = _topk_threshold(
                q,
                K,
                kv,
                rows,
                pid,
                N,
                SCALE,
                top_k,
                n_allowed,
                top,
                least,
                D,
                CAUSAL,
                OFFSET,
                BLOCK,
                PRECISION,
            )
            t1 = last.to(tl.float32)
            t2 = tl.where(n_allowed > 0, top, 0.0)
    acc = tl.zeros([BLOCK, D], tl.float32)
    acc_g = tl.zeros([BLOCK, D], tl.float32)
    acc_u = tl.zeros([BLOCK, D], tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    total_g = tl.zeros([BLOCK], tl.float32)
    keep_scale = 1.0 / (1.0 - p_drop)
    for start in range(0, _key_end(pid, N, BLOCK, CAUSAL), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s, allowed = _scores(
            q, _load_rows(K, kv, cols, N, D), rows, cols, N, SCALE, CAUSAL, OFFSET, PRECISION
        )
        v = _load_rows(V, kv, cols, N, D)
        w, g = _unnormalised(s, allowed, cols, t0, t1, t2, uniform, a, r, KIND, P_CODE, G_CODE)
        w, g = w.to(V.dtype.element_ty), g.to(V.dtype.element_ty)  # as the dots below see them
        total += tl.sum(w.to(tl.float32), 1)
        total_g += tl.sum(g.to(tl.float32), 1)
        u = tl.where(allowed, 1.0, 0.0)
        if DROPOUT:
            keep = _keep(seed, bh, rows, cols, N, p_drop)
            w = tl.where(keep, w * keep_scale, 0.0)
            g = tl.where(keep, g * keep_scale, 0.0)
            u = tl.where(keep, u * keep_scale, 0.0)
        acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
        if KIND == ENTMAX:
            acc_g += tl.dot(g.to(v.dtype), v, input_precision=PRECISION)
        if FALLBACK:
            acc_u += tl.dot(u.to(v.dtype), v, input_precision=PRECISION)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    if FALLBACK:
        empty = (total <= 0) & (n_allowed > 0)
        out = tl.where(
            empty[:, None], acc_u / tl.maximum(n_allowed, 1).to(tl.float32)[:, None], out
        )
    _store_rows(O, kv, rows, N, out, D)
    if KIND == ENTMAX:
        _store_rows(U, kv, rows, N, acc_g / tl.where(total_g > 0, total_g, 1.0)[:, None], D)
    elif KIND == RELU:
        _store_rows(U, kv, rows, N, out, D)
    base = STATS + (bh * N + rows) * 4
    tl.store(base, t0, mask=row_ok)
    tl.store(base + 1, t1, mask=row_ok)
    tl.store(base + 2, t2, mask=row_ok)
    tl.store(base + 3, total, mask=row_ok)


@triton.jit
def _row_state(
    STATS,
    bh,
    rows,
    N,
    alpha,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    KIND: tl.constexpr,
    FALLBACK: tl.constexpr,
):
    """(t0, t1, t2, uniform, inv, ginv): a row's statistics and the factors that normalise w and g."""
    row_ok = rows < N
    base = STATS + (bh * N + rows) * 4
    t0 = tl.load(base, mask=row_ok, other=0.0)
    t1 = tl.load(base + 1, mask=row_ok, other=0.0)
    t2 = tl.load(base + 2, mask=row_ok, other=0.0)
    total = tl.load(base + 3, mask=row_ok, other=0.0)
    n_allowed = _allowed_count(rows, N, CAUSAL, OFFSET)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    uniform = n_allowed < 0
    if KIND == ENTMAX:  # G = p^{2−α}/(α−1) = [x − τ]^{r−1} Z^{α−2}/(α−1)
        ginv = tl.where(
            total > 0, tl.exp2((alpha - 2.0) * tl.log2(tl.where(total > 0, total, 1.0))), 0.0
        )
        ginv = ginv / (alpha - 1.0)
    elif KIND == TOPK_UNIFORM:
        ginv = tl.zeros_like(inv)
    else:
        ginv = inv
    if FALLBACK:
        uniform = (total <= 0) & (n_allowed > 0)
        inv = tl.where(uniform, 1.0 / tl.maximum(n_allowed, 1).to(tl.float32), inv)
    return t0, t1, t2, uniform, inv, ginv


@triton.jit
def backward_kv_kernel(
    Q,
    K,
    V,
    STATS,
    DO,
    RHO,
    DK,
    DV,
    seed,
    SCALE,
    alpha,
    a,
    p_drop,
    N,
    D: tl.constexpr,
    KIND: tl.constexpr,
    P_CODE: tl.constexpr,
    G_CODE: tl.constexpr,
    FALLBACK: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = bh * N * D
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    k = _load_rows(K, kv, cols, N, D)
    v = _load_rows(V, kv, cols, N, D)
    r = 1.0 / (alpha - 1.0)
    keep_scale = 1.0 / (1.0 - p_drop)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    first = pid * BLOCK if CAUSAL else 0  # earlier queries never see this key block
    for start in range(first, N, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        q = _load_rows(Q, kv, rows, N, D)
        do = _load_rows(DO, kv, rows, N, D)
        rho = tl.load(RHO + bh * N + rows, mask=rows < N, other=0.0)
        t0, t1, t2, uniform, inv, ginv = _row_state(
            STATS, bh, rows, N, alpha, CAUSAL, OFFSET, KIND, FALLBACK
        )
        s, allowed = _scores(q, k, rows, cols, N, SCALE, CAUSAL, OFFSET, PRECISION)
        w, g = _unnormalised(s, allowed, cols, t0, t1, t2, uniform, a, r, KIND, P_CODE, G_CODE)
        p = w * inv[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
        if DROPOUT:
            keep = _keep(seed, bh, rows, cols, N, p_drop)
            p = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        if KIND != TOPK_UNIFORM:
            ds = g * ginv[:, None] * (dp - rho[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_rows(DK, kv, cols, N, dk * SCALE, D)
    _store_rows(DV, kv, cols, N, dv, D)


@triton.jit
def backward_q_kernel(
    Q,
    K,
    V,
    STATS,
    DO,
    RHO,
    DQ,
    DC,
    seed,
    SCALE,
    alpha,
    a,
    p_drop,
    N,
    D: tl.constexpr,
    KIND: tl.constexpr,
    P_CODE: tl.constexpr,
    G_CODE: tl.constexpr,
    FALLBACK: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = bh * N * D
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    q = _load_rows(Q, kv, rows, N, D)
    do = _load_rows(DO, kv, rows, N, D)
    rho = tl.load(RHO + bh * N + rows, mask=rows < N, other=0.0)
    t0, t1, t2, uniform, inv, ginv = _row_state(
        STATS, bh, rows, N, alpha, CAUSAL, OFFSET, KIND, FALLBACK
    )
    r = 1.0 / (alpha - 1.0)
    keep_scale = 1.0 / (1.0 - p_drop)
    dq = tl.zeros([BLOCK, D], tl.float32)
    dc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, _key_end(pid, N, BLOCK, CAUSAL), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        k = _load_rows(K, kv, cols, N, D)
        v = _load_rows(V, kv, cols, N, D)
        s, allowed = _scores(q, k, rows, cols, N, SCALE, CAUSAL, OFFSET, PRECISION)
        w, g = _unnormalised(s, allowed, cols, t0, t1, t2, uniform, a, r, KIND, P_CODE, G_CODE)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, rows, cols, N, p_drop), dp * keep_scale, 0.0)
        ds = g * ginv[:, None] * (dp - rho[:, None])
        dc += tl.sum(ds, 1)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ, kv, rows, N, dq * SCALE, D)
    if KIND == RELU:
        tl.store(DC + bh * N + rows, dc / a, mask=rows < N)


@triton.jit
def row_max_kernel(
    Q,
    K,
    M,
    IDX,
    SCALE,
    N,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Row maximum and its earliest argmax (relumax's anchor)."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    q = _load_rows(Q, bh * N * D, rows, N, D)
    top, arg, _ = _row_max(
        q, K, bh * N * D, rows, pid, N, SCALE, D, CAUSAL, OFFSET, BLOCK, PRECISION
    )
    tl.store(M + bh * N + rows, top, mask=rows < N)
    tl.store(IDX + bh * N + rows, arg, mask=rows < N)


@triton.jit
def keep_mask_kernel(KEEP, seed, p_drop, N, BLOCK: tl.constexpr):
    """The dropout decisions of the fused kernels, as a (BH, N, N) tensor: for tests and references."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        keep = _keep(seed, bh, rows, cols, N, p_drop)
        tl.store(
            KEEP + (bh * N + rows)[:, None] * N + cols[None, :],
            keep,
            mask=(rows[:, None] < N) & (cols[None, :] < N),
        )

"""The Triton programs behind `mosaic_core.fused`: for every fused attention kernel (chosen at
compile time by KIND) a statistics kernel (the passes that find each row's threshold; none for the
ReLU family), an output kernel, and a backward kernel (plus a dQ kernel in deterministic mode).

Every kernel weighs key j for query i by w_ij = f(s_ij; row statistics of row i), s = SCALE·q·k,
and returns Σ_j w_ij v_j / normaliser_i. The row statistics are found in the forward by passes
over the key blocks of the row (never storing N×N). Each pass visits the key blocks that need no
mask first (no per-element bounds or causal test) and then, separately, the one block on the
diagonal (causal) or past the end of the keys (N not a multiple of BLOCK), where disallowed scores
become −inf; every weight below is 0 at −inf.

- ENTMAX (α-entmax, α ∈ (1, 2]; s in x = (α−1)·scale·q·k units): w = [x − τ]_+^r, r = 1/(α−1).
  τ solves Σ_j [x_j − τ]_+^r = 1 and lies in [max − 1, max − n^{1−α}]. A max pass, then one
  histogram pass (ENTMAX_BINS bins of width 1/ENTMAX_BINS below the max, counted per row and tile
  in 8-bit slots of int64 words) that brackets τ between bin edges and starts it; then passes that each evaluate,
  at the current τ_c, the power sums P_m = Σ_{x>τ_c} (x − τ_c)^m: they give a Newton step on
  ‖[x − τ]_+‖_r = 1 (always a lower bound on τ, the function being convex and decreasing) and,
  for r ∈ {1, 2, 3}, the root τ* of Σ_{x>τ_c} (x − τ)^r = 1, which is τ itself exactly when
  {x > τ_c} is the support. That is proved by the two-sided certificate max{x ≤ τ_c} ≤ τ* ≤
  min{x > τ_c} (then every key of the set is in the support at τ* and every other key out), and a
  certified row stops; other α stop when the Newton step falls below TOL. stats = (τ, ·, ·, Z).
- RELU (normrelu, relumax): w = [a·s + c]_+ with c per row an input (b, or b − max for relumax);
  with FALLBACK (normrelu), a row with no positive weight is uniform over its allowed keys.
  stats = (c, ·, ·, l = Σw).
- TOPK_SOFTMAX / TOPK_UNIFORM: the k-th largest score t per row by a counting search over the
  order-preserving uint32 image of the float scores (32 bins per pass, each a power of two wide,
  after a pass of 32 bins of score from min to max; it stops at a cut with exactly k keys above), then, only
  where the k-th score is tied, a pass that finds the last tied key that still fits (earliest
  keys win). Selection: s > t, or s = t and j ≤ J; rows with
  at most k keys take every key (t = −FLT_MAX, below any finite score). stats = (t, J, max, l).
stats[..., 4] is the number of passes over the keys the row's query block made (for benchmarks).

Backward (closed forms, scores recomputed block by block): with p the normalised weights,
dp_ij = dO_i·v_j and ρ_i = Σ_j g_ij dp_ij / Σ_j g_ij, ds_ij = G_ij (dp_ij − ρ_i), where
G = p^{2−α}/(α−1) for entmax (its Jacobian, Peters et al. 2019; ρ from U_i = Σ g v / Σ g kept by
the forward), G = a·[w > 0]/l for the ReLU family and G = p for top-k softmax (ρ_i = dO_i·O_i,
for the ReLU family with O_i kept in float32 as U_i: an output rounded to bf16 would be amplified
by a/l in rows of small mass l), G = 0 for top-k uniform and for uniform-fallback rows. For the same
reason the forward's normalisers sum the weights as rounded to v's dtype for its weighted sums, so a
one-key row returns exactly its v and ρ carries no rounding residue (bf16 normrelu, b = −5, N = 16:
dk off by 2.9 against an exact 0 on an H200 with unrounded sums). Padding rows past N load zeros
(q, dO and statistics), so they add nothing to dK and dV even in blocks built without a mask.

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
HIST_BINS: tl.constexpr = tl.constexpr(32)  # top-k's: four int64 of eight 8-bit slots
HIST_BITS: tl.constexpr = tl.constexpr(5)  # log2(HIST_BINS)
# α-entmax's: two int64 words; 16 bins made a 64-query block's statistics 0.6 ms faster than 32 at
# N = 4096 on an H100 for ≤ 0.25 more passes (bench/data/kernels-h100-hist16.jsonl)
ENTMAX_BINS: tl.constexpr = tl.constexpr(16)
LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)  # −FLT_MAX


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
def _load_rows(ptr, offset, rows, N, D: tl.constexpr, MASKED: tl.constexpr):
    """A (len(rows), D) tile; MASKED where the rows may run past N (those read as 0)."""
    ptrs = ptr + offset + rows[:, None] * D + tl.arange(0, D)[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


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
    q,
    k,
    rows,
    cols,
    N,
    SCALE,
    EDGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """SCALE·q kᵀ of one tile, −0.0 made +0.0 so equal scores compare equal bitwise; on an EDGE
    tile the scores a query may not see (past N, or causally hidden) are −inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * SCALE + 0.0
    if EDGE:
        s = tl.where(_allowed(rows, cols, N, CAUSAL, OFFSET), s, float("-inf"))
    return s


@triton.jit
def _allowed(rows, cols, N, CAUSAL: tl.constexpr, OFFSET: tl.constexpr):
    """(rows, cols) booleans: the keys each query may see (inside N, and causally visible)."""
    allowed = (cols[None, :] < N) & (rows[:, None] < N)
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= rows[:, None] - OFFSET)
    return allowed


@triton.jit
def _tile(
    q,
    K,
    kv,
    rows,
    start,
    N,
    SCALE,
    EDGE: tl.constexpr,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(scores, key indices) of the key block at `start` against the query tile q."""
    cols = start + tl.arange(0, BLOCK)
    k = _load_rows(K, kv, cols, N, D, EDGE)
    return _scores(q, k, rows, cols, N, SCALE, EDGE, CAUSAL, OFFSET, PRECISION), cols


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
def _key_blocks(pid, N, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """(inner, end) for query block `pid`: key blocks [0, inner) need no mask; [inner, end) is
    the diagonal block (causal) or the block past the last full one (N % BLOCK keys), if any."""
    if CAUSAL:
        inner = pid * BLOCK
        end = tl.minimum(inner + BLOCK, N)
    else:
        inner = (N // BLOCK) * BLOCK
        end = N
    return inner, end


@triton.jit
def _query_blocks(pid, N, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """(first, edge_end, inner_end) for key block `pid`: query blocks [first, edge_end) need a
    mask (the diagonal; or all of them when the key block runs past N, unmasked), then
    [edge_end, inner_end) need none, then [max(inner_end, edge_end), N) (a last partial block)
    need one again."""
    inner_end = (N // BLOCK) * BLOCK
    if CAUSAL:
        first = pid * BLOCK
        edge_end = tl.minimum(first + BLOCK, N)
    else:
        first = 0
        edge_end = tl.where((pid + 1) * BLOCK <= N, 0, N)
    return first, edge_end, inner_end


@triton.jit
def _radix_key(s):
    """Order-preserving map of float32 to uint32 (for −0.0-free inputs): the sign bit set on
    non-negative floats, every bit flipped on negative ones; −inf maps below every finite score."""
    bits = s.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 0, bits | 0x80000000, ~bits)


@triton.jit
def _from_radix_key(key):
    bits = tl.where((key >> 31) == 1, key & 0x7FFFFFFF, ~key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _unnormalised(
    s,
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
    FALLBACK: tl.constexpr,
):
    """(w, g): the kernel's unnormalised weights and the factor its score gradient is built from;
    both 0 at s = −inf (a > 0, and top-k's t0 is finite)."""
    if KIND == ENTMAX:
        d = tl.maximum(s - t0[:, None], 0.0)
        w = _power(d, r, P_CODE)
        g = _power(d, r - 1.0, G_CODE)
    elif KIND == RELU:
        pre = a * s + t0[:, None]
        w = tl.maximum(pre, 0.0)
        g = tl.where(pre > 0, a, 0.0)
        if FALLBACK:
            w = tl.where(uniform[:, None], tl.where(s > float("-inf"), 1.0, 0.0), w)
            g = tl.where(uniform[:, None], 0.0, g)
    else:
        chosen = (s > t0[:, None]) | ((s == t0[:, None]) & (cols[None, :] <= t1[:, None]))
        if KIND == TOPK_SOFTMAX:
            w = tl.where(chosen, tl.exp(s - t2[:, None]), 0.0)
            g = w
        else:
            w = tl.where(chosen, 1.0, 0.0)
            g = tl.zeros_like(w)
    return w, g


@triton.jit
def _max_blocks(
    # running results of the passes over the blocks
    best, arg, least,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # kernel parameters
    SCALE,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, WITH_ARG: tl.constexpr, WITH_LEAST: tl.constexpr, D: tl.constexpr,
    CAUSAL: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for start in range(lo, hi, BLOCK):
        s, cols = _tile(q, K, kv, rows, start, N, SCALE, EDGE, D, CAUSAL, OFFSET, BLOCK, PRECISION)
        block_best = tl.max(s, 1)
        if WITH_ARG:
            block_arg = tl.argmax(s, 1).to(tl.int32) + start
            arg = tl.where(block_best > best, block_arg, arg)  # strict: the earliest maximum wins
        best = tl.maximum(best, block_best)
        if WITH_LEAST:
            least = tl.minimum(least, tl.min(tl.where(s > float("-inf"), s, float("inf")), 1))
    return best, arg, least


@triton.jit
def _row_max(
    q,
    K,
    kv,
    rows,
    pid,
    N,
    SCALE,
    WITH_ARG: tl.constexpr,
    WITH_LEAST: tl.constexpr,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(max, earliest argmax if WITH_ARG, min if WITH_LEAST) of the allowed scores of each row:
    one pass."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    least = tl.full([BLOCK], float("inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    inner, end = _key_blocks(pid, N, BLOCK, CAUSAL)
    best, arg, least = _max_blocks(
        best, arg, least, q, K, kv, rows, 0, inner, N, SCALE, False, WITH_ARG, WITH_LEAST, D,
        CAUSAL, OFFSET, BLOCK, PRECISION,
    )  # fmt: skip
    best, arg, least = _max_blocks(
        best, arg, least, q, K, kv, rows, inner, end, N, SCALE, True, WITH_ARG, WITH_LEAST, D,
        CAUSAL, OFFSET, BLOCK, PRECISION,
    )  # fmt: skip
    return best, arg, least


@triton.jit
def _add_counts(counts, index, inside, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """counts (BLOCK, BINS) plus each row's number of tile keys in bin `index` (where inside),
    reduced as eight 8-bit slots of an int64 per row and word (a tile adds ≤ BLOCK ≤ 128)."""
    bins = tl.arange(0, BINS)
    bit = tl.full([BLOCK, BLOCK], 1, tl.int64) << (8 * (index & 7)).to(tl.int64)
    for word in tl.static_range(BINS // 8):
        packed = tl.sum(tl.where(inside & ((index >> 3) == word), bit, 0), 1)
        unpacked = (packed[:, None] >> (8 * (bins % 8)).to(tl.int64)[None, :]) & 255
        counts += tl.where((bins // 8 == word)[None, :], unpacked.to(tl.int32), 0)
    return counts


@triton.jit
def _histogram_blocks(
    # running results of the passes over the blocks
    counts,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows,
    # the row statistics so far
    top, per_bin,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # kernel parameters
    SCALE,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
    BINS: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Per-row key counts in BINS bins of width 1/per_bin below top."""
    for start in range(lo, hi, BLOCK):
        s, cols = _tile(q, K, kv, rows, start, N, SCALE, EDGE, D, CAUSAL, OFFSET, BLOCK, PRECISION)
        depth = (top[:, None] - s) * per_bin[:, None]  # ≥ 0 but in rows that skip the search
        depth = tl.minimum(tl.maximum(depth, 0.0), BINS).to(tl.int32)
        counts = _add_counts(counts, depth, depth < BINS, BINS, BLOCK)
    return counts


@triton.jit
def _histograms(
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows, pid,
    # sizes: the sequence length
    N,
    # kernel parameters
    SCALE,
    # the row statistics so far
    top, per_bin,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, BINS: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(BLOCK, BINS) counts: one pass counting keys in bins of width 1/per_bin below top."""
    counts = tl.zeros([BLOCK, BINS], tl.int32)
    inner, end = _key_blocks(pid, N, BLOCK, CAUSAL)
    counts = _histogram_blocks(
        counts, q, K, kv, rows, top, per_bin, 0, inner, N, SCALE, False, D, CAUSAL, OFFSET, BINS,
        BLOCK, PRECISION,
    )  # fmt: skip
    return _histogram_blocks(
        counts, q, K, kv, rows, top, per_bin, inner, end, N, SCALE, True, D, CAUSAL, OFFSET, BINS,
        BLOCK, PRECISION,
    )  # fmt: skip


@triton.jit
def _binned_sums(counts, shift, r, CODE: tl.constexpr):
    """Σ_b c_b·(shift − b/ENTMAX_BINS)_+^r over the bins; shift (BLOCK,) is the threshold's depth
    below the max, less where in its bin a key is put (far end, near end, centre)."""
    bins = tl.arange(0, ENTMAX_BINS).to(tl.float32) / ENTMAX_BINS
    return tl.sum(counts * _power(tl.maximum(shift[:, None] - bins[None, :], 0.0), r, CODE), 1)


@triton.jit
def _histogram_start(
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows, pid,
    # sizes: the sequence length
    N,
    # kernel parameters
    SCALE, alpha, r,
    # the row statistics so far
    n_allowed, top,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr,
    PRECISION: tl.constexpr, P_CODE: tl.constexpr, G_CODE: tl.constexpr,
):  # fmt: skip
    """(lo, hi, start) from one pass counting the keys per bin of width 1/ENTMAX_BINS below the max.
    At a bin edge θ below the max, Σ[x − τ]_+^r lies between the sums that put every key at the
    far and at the near end of its bin: an edge where the first reaches 1 is at or below τ, one
    where the second stays under 1 is above. The start solves the sum with keys at bin centres."""
    counts = _histograms(
        q, K, kv, rows, pid, N, SCALE, top, tl.zeros([BLOCK], tl.float32) + ENTMAX_BINS, D, CAUSAL,
        OFFSET, ENTMAX_BINS, BLOCK, PRECISION,
    ).to(tl.float32)  # fmt: skip
    theta_lo = tl.full([BLOCK], 1.0, tl.float32)  # τ ≥ max − theta_lo
    theta_hi = tl.exp2((1.0 - alpha) * tl.log2(tl.maximum(n_allowed, 1).to(tl.float32)))
    far = tl.zeros([BLOCK], tl.float32)  # the far-end sum at an edge is the near-end one a bin up
    for j in range(1, ENTMAX_BINS + 1):
        edge = tl.zeros([BLOCK], tl.float32) + j / ENTMAX_BINS
        near = _binned_sums(counts, edge, r, P_CODE)
        theta_lo = tl.where(far >= 1.0, tl.minimum(theta_lo, edge), theta_lo)
        theta_hi = tl.where(near < 1.0, tl.maximum(theta_hi, edge), theta_hi)
        far = near
    theta = theta_lo
    for _ in tl.static_range(6):  # Newton on the r-norm of the centred counts, from above
        h = _binned_sums(counts, theta - 0.5 / ENTMAX_BINS, r, P_CODE)
        slope = _binned_sums(counts, theta - 0.5 / ENTMAX_BINS, r - 1.0, G_CODE)
        h_pow = tl.exp2((1.0 - 1.0 / r) * tl.log2(tl.maximum(h, 1e-30)))
        theta = theta - (h - h_pow) / tl.where(slope > 0, slope, 1.0)
    theta = tl.minimum(tl.maximum(theta, theta_hi), theta_lo)
    return top - theta_lo, top - theta_hi, top - theta


@triton.jit
def _entmax_blocks(
    # running results of the passes over the blocks
    f, slope, p0, p1, least_in, most_out,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows,
    # the row statistics so far
    tau,
    # kernel parameters
    r,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # kernel parameters
    SCALE,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr, P_CODE: tl.constexpr, G_CODE: tl.constexpr,
    CERTIFY: tl.constexpr,
):  # fmt: skip
    for start in range(lo, hi, BLOCK):
        s, cols = _tile(q, K, kv, rows, start, N, SCALE, EDGE, D, CAUSAL, OFFSET, BLOCK, PRECISION)
        d = tl.maximum(s - tau[:, None], 0.0)
        f += tl.sum(_power(d, r, P_CODE), 1)
        slope += tl.sum(_power(d, r - 1.0, G_CODE), 1)
        if CERTIFY:
            inside = d > 0
            least_in = tl.minimum(least_in, tl.min(tl.where(inside, s, float("inf")), 1))
            most_out = tl.maximum(most_out, tl.max(tl.where(inside, float("-inf"), s), 1))
            if P_CODE >= 2:
                p0 += tl.sum(inside.to(tl.float32), 1)
            if P_CODE == 3:
                p1 += tl.sum(d, 1)
    return f, slope, p0, p1, least_in, most_out


@triton.jit
def _support_poly(delta, f, slope, p0, p1, P_CODE: tl.constexpr):
    """(g, −g′) at τ_c + δ for g(δ) = Σ_{x>τ_c} (x − τ_c − δ)^r, r = P_CODE ∈ {1, 2, 3}, from the
    power sums about τ_c (f = P_r, slope = P_{r−1}, p0 = P_0, p1 = P_1)."""
    if P_CODE == 1:
        g = f - delta * slope
        minus_dg = slope
    elif P_CODE == 2:
        g = f - delta * (2.0 * slope - delta * p0)
        minus_dg = 2.0 * (slope - delta * p0)
    else:
        g = f - delta * (3.0 * slope - delta * (3.0 * p1 - delta * p0))
        minus_dg = 3.0 * (slope - delta * (2.0 * p1 - delta * p0))
    return g, minus_dg


@triton.jit
def _certified_root(tau, lo, f, slope, p0, p1, least_in, most_out, TOL, P_CODE: tl.constexpr):
    """(τ*, certified): τ* solves g = 1 between the neighbouring scores a = max{x ≤ τ_c} (or lo)
    and b = min{x > τ_c}. There g is Σ[x − τ]_+^r itself, convex and decreasing, so g(a) ≥ 1 ≥
    g(b) proves the root is τ (the support is {x > τ_c}); Newton from a climbs to it."""
    a = tl.maximum(most_out, lo) - tau
    b = tl.where(least_in < float("inf"), least_in - tau, a)  # no key above τ_c: g ≡ 0, no root
    g_a, _ = _support_poly(a, f, slope, p0, p1, P_CODE)
    g_b, _ = _support_poly(b, f, slope, p0, p1, P_CODE)
    delta = a
    step = tl.zeros_like(a) + 1.0
    for _ in tl.static_range(12):
        g, minus_dg = _support_poly(delta, f, slope, p0, p1, P_CODE)
        step = (g - 1.0) / tl.where(minus_dg > 0, minus_dg, 1.0)
        delta = tl.minimum(delta + step, b)
    converged = tl.abs(step) <= TOL * tl.maximum(tl.abs(tau + delta), 1.0)
    return tau + delta, (g_a >= 1.0) & (g_b <= 1.0) & (b >= a) & converged


@triton.jit
def _entmax_threshold(
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows, pid,
    # sizes: the sequence length
    N,
    # kernel parameters
    SCALE, alpha, r,
    # the row statistics so far
    n_allowed, top,
    # compile-time: shape, kernel family, masks, tile, precision
    TOL: tl.constexpr, MAX_ITERS: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
    OFFSET: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, P_CODE: tl.constexpr,
    G_CODE: tl.constexpr, CERTIFY: tl.constexpr,
):  # fmt: skip
    """(τ, passes): the histogram bracket, then one pass per step until every row's τ is certified
    (CERTIFY) or its Newton step is below TOL."""
    has = n_allowed > 0
    top = tl.where(has, top, 0.0)
    lo, hi, start = _histogram_start(
        q, K, kv, rows, pid, N, SCALE, alpha, r, n_allowed, top, D, CAUSAL, OFFSET, BLOCK,
        PRECISION, P_CODE, G_CODE,
    )  # fmt: skip
    tau = tl.where(has, start, 0.0)
    tol = TOL * tl.maximum(tl.abs(top), 1.0)
    done = ~has
    inner, end = _key_blocks(pid, N, BLOCK, CAUSAL)
    passes = 1
    while (tl.min(done.to(tl.int32)) == 0) & (passes <= MAX_ITERS):
        zero = tl.zeros([BLOCK], tl.float32)
        sums = _entmax_blocks(
            zero, zero, zero, zero, zero + float("inf"), zero - float("inf"), q, K, kv, rows, tau,
            r, 0, inner, N, SCALE, False, D, CAUSAL, OFFSET, BLOCK, PRECISION, P_CODE, G_CODE,
            CERTIFY,
        )  # fmt: skip
        f, slope, p0, p1, least_in, most_out = _entmax_blocks(
            *sums, q, K, kv, rows, tau, r, inner, end, N, SCALE, True, D, CAUSAL, OFFSET, BLOCK,
            PRECISION, P_CODE, G_CODE, CERTIFY,
        )  # fmt: skip
        new, stop, lo, hi = _next_threshold(
            tau, lo, hi, f, slope, p0, p1, least_in, most_out, r, tol, TOL, P_CODE, CERTIFY
        )
        tau = tl.where(done, tau, new)
        done = done | stop
        passes += 1
    return tau, passes


@triton.jit
def _next_threshold(
    # the row statistics so far
    tau,
    # sizes: the blocks to visit (lo to hi)
    lo, hi,
    # running results of the passes over the blocks
    f, slope, p0, p1, least_in, most_out,
    # kernel parameters
    r, tol, TOL,
    # compile-time: shape, kernel family, masks, tile, precision
    P_CODE, CERTIFY: tl.constexpr,
):  # fmt: skip
    """(next τ, stop, lo, hi) from the sums at τ: the certified root, else a Halley step (r = 2, 3)
    or the Newton step on ‖[x − τ]_+‖_r = 1 (a lower bound of τ), kept in the bracket [lo, hi]."""
    lo = tl.where(f >= 1.0, tl.maximum(lo, tau), lo)
    hi = tl.where(f < 1.0, tl.minimum(hi, tau), hi)
    f_pow = tl.exp2((1.0 - 1.0 / r) * tl.log2(tl.maximum(f, 1e-30)))
    new = tl.maximum(tau + (f - f_pow) / tl.where(slope > 0, slope, 1.0), lo)
    new = tl.where((slope > 0) & (new <= hi), new, 0.5 * (lo + hi))
    if CERTIFY and P_CODE >= 2:  # Halley on f − 1: f″ = r(r−1)·Σ[x − τ]_+^{r−2} is p0 or p1
        if P_CODE == 2:
            bend = r * (r - 1.0) * p0
        else:
            bend = r * (r - 1.0) * p1
        grade = -r * slope
        denominator = 2.0 * grade * grade - (f - 1.0) * bend
        halley = tau - 2.0 * (f - 1.0) * grade / tl.where(denominator > 0, denominator, 1.0)
        better = (slope > 0) & (denominator > 0) & (halley >= lo) & (halley <= hi)
        new = tl.where(better, halley, new)
    stop = tl.abs(new - tau) <= tol
    if CERTIFY:
        root, certified = _certified_root(
            tau, lo, f, slope, p0, p1, least_in, most_out, TOL, P_CODE
        )
        new = tl.where(certified, root, new)
        stop = stop | certified
    return new, stop, lo, hi


@triton.jit
def _rank_blocks(
    # running results of the passes over the blocks
    counts, above,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows,
    # the row statistics so far
    base, shift,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # kernel parameters
    SCALE,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Per-row counts of keys whose radix key lies in bin i of [base, base + HIST_BINS·2^shift),
    and of keys above the bins (32-bit arithmetic: below base the offset wraps, unused)."""
    ushift = shift.to(tl.uint32)[:, None]
    for start in range(lo, hi, BLOCK):
        s, cols = _tile(q, K, kv, rows, start, N, SCALE, EDGE, D, CAUSAL, OFFSET, BLOCK, PRECISION)
        key = _radix_key(s)
        index = (key - base[:, None]) >> ushift
        reached = key >= base[:, None]
        inside = reached & (index < HIST_BINS)
        above += tl.sum((reached & (index >= HIST_BINS)).to(tl.int32), 1)
        counts = _add_counts(
            counts, tl.where(inside, index, 0).to(tl.int32), inside, HIST_BINS, BLOCK
        )
    return counts, above


@triton.jit
def _rank_step(counts, above, base, shift, top_k, BLOCK: tl.constexpr):
    """(base, n_lo, n_hi) of the bin holding the k-th largest key: the highest bin edge with at
    least k keys at or above it, the count there and the count at the next edge up."""
    bins = tl.arange(0, HIST_BINS)
    chosen = tl.zeros([BLOCK], tl.int32)
    n_lo = tl.zeros([BLOCK], tl.int32)
    n_hi = above
    for j in range(HIST_BINS):  # ascending: the last edge with ≥ k keys wins
        at_or_above = above + tl.sum(tl.where(bins[None, :] >= j, counts, 0), 1)
        ok = at_or_above >= top_k
        n_hi = tl.where(ok, n_hi, tl.where(chosen == j - 1, at_or_above, n_hi))
        chosen = tl.where(ok, j, chosen)
        n_lo = tl.where(ok, at_or_above, n_lo)
    return base + (chosen.to(tl.uint32) << shift.to(tl.uint32)), n_lo, n_hi


@triton.jit
def _tie_blocks(
    # running results of the passes over the blocks
    last, seen,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows,
    # the row statistics so far
    t, room, tied,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # kernel parameters
    SCALE,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for start in range(lo, hi, BLOCK):
        s, cols = _tile(q, K, kv, rows, start, N, SCALE, EDGE, D, CAUSAL, OFFSET, BLOCK, PRECISION)
        equal = (s == t[:, None]).to(tl.int32)
        fits = (equal > 0) & ((seen[:, None] + tl.cumsum(equal, 1)) <= room[:, None])
        block_last = tl.max(tl.where(fits, cols[None, :], -1), 1)
        last = tl.where(tied, tl.maximum(last, block_last), last)
        seen += tl.sum(equal, 1)
    return last, seen


@triton.jit
def _bin_shift(span):
    """The least shift (int32) with HIST_BINS·2^shift ≥ span (uint32, ≥ 1): the float estimate,
    raised by one where it falls short ((span − 1) >> shift still reaches HIST_BINS)."""
    shift = tl.maximum(tl.ceil(tl.log2(span.to(tl.float32))).to(tl.int32) - HIST_BITS, 0)
    short = ((span - 1) >> shift.to(tl.uint32)) >= HIST_BINS
    return tl.where(short, shift + 1, shift)


@triton.jit
def _value_window(
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows, pid,
    # sizes: the sequence length
    N,
    # kernel parameters
    SCALE, top_k,
    # the row statistics so far
    top, least,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """(base, shift) of the integer search's first bins: one pass counting the keys in 32 equal
    bins of score between the min and the max, the bin where the count from the top reaches k,
    widened by 1/32 of a bin each side against rounding (the search checks it and else starts
    from [min, max])."""
    width = (top - least) / HIST_BINS
    counts = _histograms(
        q, K, kv, rows, pid, N, SCALE, top, 1.0 / tl.maximum(width, 1e-30), D, CAUSAL, OFFSET,
        HIST_BINS, BLOCK, PRECISION,
    )  # fmt: skip
    bins = tl.arange(0, HIST_BINS)
    depth = tl.full([BLOCK], HIST_BINS, tl.float32)
    for j in range(HIST_BINS - 1, -1, -1):  # descending: the first bin reaching k wins
        depth = tl.where(tl.sum(tl.where(bins[None, :] <= j, counts, 0), 1) >= top_k, j, depth)
    base = _radix_key(top - (depth + 1.0 + 1.0 / 32) * width)
    end = _radix_key(top - (depth - 1.0 / 32) * width) + 1
    found = depth < HIST_BINS
    base = tl.where(found, base, _radix_key(least))
    end = tl.where(found, end, _radix_key(top) + 1)
    return base, _bin_shift(end - base)


@triton.jit
def _topk_threshold(
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K,
    # where: head offset, head, rows or columns of this block
    kv, rows, pid,
    # sizes: the sequence length
    N,
    # kernel parameters
    SCALE, top_k,
    # the row statistics so far
    n_allowed, top, least,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """(t, J, passes): a cut with exactly k allowed keys at or above it, or the k-th largest score
    when it is tied, and then the last tied key that still fits (earliest keys win). Each pass
    counts the keys in 32 bins of the order-preserving integer image of the scores that hold the
    k-th largest, so a pass divides the span by 32, exactly (integer arithmetic)."""
    search = n_allowed > top_k
    top, least = tl.where(search, top, 0.0), tl.where(search, least, 0.0)
    full_base = _radix_key(least)  # count(key ≥ base) ≥ k
    full_shift = _bin_shift(_radix_key(top) + 1 - full_base)
    base, shift = _value_window(
        q, K, kv, rows, pid, N, SCALE, top_k, top, least, D, CAUSAL, OFFSET, BLOCK, PRECISION
    )
    n_lo = n_allowed
    n_hi = tl.zeros([BLOCK], tl.int32)
    done = ~search
    inner, end = _key_blocks(pid, N, BLOCK, CAUSAL)
    passes = 1
    while (tl.min(done.to(tl.int32)) == 0) & (passes < 40):
        counts, above = _rank_blocks(
            tl.zeros([BLOCK, HIST_BINS], tl.int32), tl.zeros([BLOCK], tl.int32), q, K, kv, rows,
            base, shift, 0, inner, N, SCALE, False, D, CAUSAL, OFFSET, BLOCK, PRECISION,
        )  # fmt: skip
        counts, above = _rank_blocks(
            counts, above, q, K, kv, rows, base, shift, inner, end, N, SCALE, True, D, CAUSAL,
            OFFSET, BLOCK, PRECISION,
        )  # fmt: skip
        new_base, new_n_lo, new_n_hi = _rank_step(counts, above, base, shift, top_k, BLOCK)
        lost = ~done & (new_n_lo < top_k)  # the value window missed the k-th key: start over
        keep = done | lost
        n_lo = tl.where(keep, n_lo, new_n_lo)
        n_hi = tl.where(keep, n_hi, new_n_hi)
        done = done | (~lost & ((new_n_lo == top_k) | (shift == 0)))
        base = tl.where(done, tl.where(keep, base, new_base), tl.where(lost, full_base, new_base))
        shift = tl.where(lost, full_shift, tl.maximum(shift - HIST_BITS, 0))
        passes += 1
    t = tl.where(search, _from_radix_key(base), LOWEST)
    tied = search & (n_lo > top_k)  # more keys equal t than there is room for
    last = tl.full([BLOCK], 2147483647, tl.int32)
    if tl.max(tied.to(tl.int32)) > 0:
        seen = tl.zeros([BLOCK], tl.int32)
        room = top_k - n_hi
        last = tl.where(tied, -1, last)
        last, seen = _tie_blocks(
            last, seen, q, K, kv, rows, t, room, tied, 0, inner, N, SCALE, False, D, CAUSAL,
            OFFSET, BLOCK, PRECISION,
        )  # fmt: skip
        last, seen = _tie_blocks(
            last, seen, q, K, kv, rows, t, room, tied, inner, end, N, SCALE, True, D, CAUSAL,
            OFFSET, BLOCK, PRECISION,
        )  # fmt: skip
        passes += 1
    return t, last, passes


@triton.jit
def _output_blocks(
    # running results of the passes over the blocks
    acc, acc_g, total, total_g,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, K, V,
    # where: head offset, head, rows or columns of this block
    kv, bh, rows,
    # the row statistics so far (the uniform fallback comes after, in _uniform_fallback)
    t0, t1, t2,
    # kernel parameters
    seed, a, r, p_drop,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # kernel parameters
    SCALE,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, KIND: tl.constexpr, P_CODE: tl.constexpr,
    G_CODE: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    keep_scale = 1.0 / (1.0 - p_drop)
    for start in range(lo, hi, BLOCK):
        s, cols = _tile(q, K, kv, rows, start, N, SCALE, EDGE, D, CAUSAL, OFFSET, BLOCK, PRECISION)
        v = _load_rows(V, kv, cols, N, D, EDGE)
        w, g = _unnormalised(s, cols, t0, t1, t2, None, a, r, KIND, P_CODE, G_CODE, False)
        w, g = w.to(V.dtype.element_ty), g.to(V.dtype.element_ty)  # as the dots below see them
        total += tl.sum(w.to(tl.float32), 1)
        if KIND == ENTMAX:
            total_g += tl.sum(g.to(tl.float32), 1)
        if DROPOUT:
            keep = _keep(seed, bh, rows, cols, N, p_drop)
            w = tl.where(keep, w * keep_scale, 0.0)
            g = tl.where(keep, g * keep_scale, 0.0)
        acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
        if KIND == ENTMAX:
            acc_g += tl.dot(g.to(v.dtype), v, input_precision=PRECISION)
    return acc, acc_g, total, total_g


@triton.jit
def _uniform_blocks(
    # running results of the passes over the blocks
    acc,
    # the data: tensors in memory
    V,
    # where: head offset, head, rows of this block
    kv, bh, rows,
    # kernel parameters
    seed, p_drop,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # compile-time: shape, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc plus the sum of the values each row may see (dropout applied): the uniform fallback."""
    keep_scale = 1.0 / (1.0 - p_drop)
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = _load_rows(V, kv, cols, N, D, EDGE)
        u = tl.full([BLOCK, BLOCK], 1.0, tl.float32)
        if EDGE:
            u = tl.where(_allowed(rows, cols, N, CAUSAL, OFFSET), u, 0.0)
        if DROPOUT:
            u = tl.where(_keep(seed, bh, rows, cols, N, p_drop), u * keep_scale, 0.0)
        acc += tl.dot(u.to(v.dtype), v, input_precision=PRECISION)
    return acc


@triton.jit
def _uniform_fallback(
    # the output so far
    out,
    # the data: tensors in memory
    V,
    # where: head offset, head, rows or columns of this block
    kv, bh, rows, pid,
    # the row statistics so far
    total, n_allowed,
    # kernel parameters
    seed, p_drop,
    # sizes: the sequence length
    N,
    # compile-time: shape, masks, tile, precision
    D: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(out, passes made): out with rows of no positive weight (normrelu's FALLBACK) made the mean
    of their allowed values, by a pass over the values only in a query block that has such a row
    (on random keys and a low b, every block; a trained model's rows mostly have support)."""
    empty = (total <= 0) & (n_allowed > 0)
    passes = tl.zeros([BLOCK], tl.float32)
    if tl.max(empty.to(tl.int32)) > 0:
        acc = tl.zeros([BLOCK, D], tl.float32)
        inner, end = _key_blocks(pid, N, BLOCK, CAUSAL)
        acc = _uniform_blocks(
            acc, V, kv, bh, rows, seed, p_drop, 0, inner, N, False, D, CAUSAL, OFFSET, DROPOUT,
            BLOCK, PRECISION,
        )  # fmt: skip
        acc = _uniform_blocks(
            acc, V, kv, bh, rows, seed, p_drop, inner, end, N, True, D, CAUSAL, OFFSET, DROPOUT,
            BLOCK, PRECISION,
        )  # fmt: skip
        out = tl.where(empty[:, None], acc / tl.maximum(n_allowed, 1).to(tl.float32)[:, None], out)
        passes += 1.0
    return out, passes


@triton.jit
def statistics_kernel(
    # tensors in global memory (pointers)
    Q, K, STATS,
    # kernel parameters
    SCALE, alpha, top_k,
    # sizes: the sequence length
    N,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, KIND: tl.constexpr, P_CODE: tl.constexpr, G_CODE: tl.constexpr,
    CERTIFY: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, TOL: tl.constexpr,
    MAX_ITERS: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The row statistics of entmax and top-k (stats 0–2, and 4: the passes made): every pass but
    the output one, in a kernel that holds no (BLOCK, D) accumulator."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = bh * N * D
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    q = _load_rows(Q, kv, rows, N, D, True)
    n_allowed = _allowed_count(rows, N, CAUSAL, OFFSET)
    top, _, least = _row_max(
        q, K, kv, rows, pid, N, SCALE, False, KIND != ENTMAX, D, CAUSAL, OFFSET, BLOCK, PRECISION
    )
    if KIND == ENTMAX:
        t0, passes = _entmax_threshold(
            q, K, kv, rows, pid, N, SCALE, alpha, 1.0 / (alpha - 1.0), n_allowed, top, TOL,
            MAX_ITERS, D, CAUSAL, OFFSET, BLOCK, PRECISION, P_CODE, G_CODE, CERTIFY,
        )  # fmt: skip
        t1 = tl.zeros([BLOCK], tl.float32)
        t2 = tl.zeros([BLOCK], tl.float32)
    else:
        t0, last, passes = _topk_threshold(
            q, K, kv, rows, pid, N, SCALE, top_k, n_allowed, top, least, D, CAUSAL, OFFSET, BLOCK,
            PRECISION,
        )  # fmt: skip
        t1 = last.to(tl.float32)
        t2 = tl.where(n_allowed > 0, top, 0.0)
    base = STATS + (bh * N + rows) * 5
    tl.store(base, t0, mask=rows < N)
    tl.store(base + 1, t1, mask=rows < N)
    tl.store(base + 2, t2, mask=rows < N)
    tl.store(base + 4, tl.zeros([BLOCK], tl.float32) + (1 + passes), mask=rows < N)


@triton.jit
def forward_kernel(
    # tensors in global memory (pointers)
    Q, K, V, C, O, STATS, U,
    # kernel parameters
    seed, SCALE, alpha, a, p_drop,
    # sizes: the sequence length
    N,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, KIND: tl.constexpr, P_CODE: tl.constexpr, G_CODE: tl.constexpr,
    FALLBACK: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The output pass: out, U and the normaliser, from the statistics (the ReLU family's offset
    c is an input; the others' come from statistics_kernel)."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = bh * N * D
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    q = _load_rows(Q, kv, rows, N, D, True)
    n_allowed = _allowed_count(rows, N, CAUSAL, OFFSET)
    r = 1.0 / (alpha - 1.0)
    base = STATS + (bh * N + rows) * 5
    if KIND == RELU:
        t0 = tl.load(C + bh * N + rows, mask=row_ok, other=0.0)
        t1 = tl.zeros([BLOCK], tl.float32)
        t2 = tl.zeros([BLOCK], tl.float32)
        passes = tl.zeros([BLOCK], tl.float32)
    else:
        t0 = tl.load(base, mask=row_ok, other=0.0)
        t1 = tl.load(base + 1, mask=row_ok, other=0.0)
        t2 = tl.load(base + 2, mask=row_ok, other=0.0)
        passes = tl.load(base + 4, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK, D], tl.float32)
    acc_g = tl.zeros([BLOCK, D], tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    total_g = tl.zeros([BLOCK], tl.float32)
    inner, end = _key_blocks(pid, N, BLOCK, CAUSAL)
    acc, acc_g, total, total_g = _output_blocks(
        acc, acc_g, total, total_g, q, K, V, kv, bh, rows, t0, t1, t2, seed, a, r, p_drop, 0,
        inner, N, SCALE, False, D, KIND, P_CODE, G_CODE, CAUSAL, OFFSET, DROPOUT, BLOCK, PRECISION,
    )  # fmt: skip
    acc, acc_g, total, total_g = _output_blocks(
        acc, acc_g, total, total_g, q, K, V, kv, bh, rows, t0, t1, t2, seed, a, r, p_drop, inner,
        end, N, SCALE, True, D, KIND, P_CODE, G_CODE, CAUSAL, OFFSET, DROPOUT, BLOCK, PRECISION,
    )  # fmt: skip
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    passes += 1
    if FALLBACK:
        out, fallback_passes = _uniform_fallback(
            out, V, kv, bh, rows, pid, total, n_allowed, seed, p_drop, N, D, CAUSAL, OFFSET,
            DROPOUT, BLOCK, PRECISION,
        )  # fmt: skip
        passes += fallback_passes
    _store_rows(O, kv, rows, N, out, D)
    if KIND == ENTMAX:
        _store_rows(U, kv, rows, N, acc_g / tl.where(total_g > 0, total_g, 1.0)[:, None], D)
    elif KIND == RELU:
        _store_rows(U, kv, rows, N, out, D)
    if KIND == RELU:
        tl.store(base, t0, mask=row_ok)
        tl.store(base + 1, t1, mask=row_ok)
        tl.store(base + 2, t2, mask=row_ok)
    tl.store(base + 3, total, mask=row_ok)
    tl.store(base + 4, passes, mask=row_ok)


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
    """(t0, t1, t2, uniform, inv, ginv): a row's statistics and the factors that normalise w and g;
    all 0 for rows past N."""
    row_ok = rows < N
    base = STATS + (bh * N + rows) * 5
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
def _kv_blocks(
    # running results of the passes over the blocks
    dk, dv,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    k, v, Q, STATS, DO, RHO, DQ, DC,
    # where: head offset, head, rows or columns of this block
    kv, bh, cols,
    # kernel parameters
    seed, SCALE, alpha, a, r, p_drop,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, KIND: tl.constexpr, P_CODE: tl.constexpr,
    G_CODE: tl.constexpr, FALLBACK: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    keep_scale = 1.0 / (1.0 - p_drop)
    for start in range(lo, hi, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        q = _load_rows(Q, kv, rows, N, D, EDGE)
        do = _load_rows(DO, kv, rows, N, D, EDGE)
        rho = tl.load(RHO + bh * N + rows, mask=rows < N, other=0.0)
        t0, t1, t2, uniform, inv, ginv = _row_state(
            STATS, bh, rows, N, alpha, CAUSAL, OFFSET, KIND, FALLBACK
        )
        s = _scores(q, k, rows, cols, N, SCALE, EDGE, CAUSAL, OFFSET, PRECISION)
        w, g = _unnormalised(s, cols, t0, t1, t2, uniform, a, r, KIND, P_CODE, G_CODE, FALLBACK)
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
            if ATOMIC:  # this key block's share of dQ (and of dc), added into float32 buffers
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * SCALE
                dims = tl.arange(0, D)
                tl.atomic_add(
                    DQ + kv + rows[:, None] * D + dims[None, :],
                    dq,
                    mask=rows[:, None] < N,
                    sem="relaxed",  # only the sum after the kernel matters: no ordering needed
                )
                if KIND == RELU:
                    dc = tl.sum(ds, 1) / a
                    tl.atomic_add(DC + bh * N + rows, dc, mask=rows < N, sem="relaxed")
    return dk, dv


@triton.jit
def backward_kv_kernel(
    # tensors in global memory (pointers)
    Q, K, V, STATS, DO, RHO, DK, DV, DQ, DC,
    # kernel parameters
    seed, SCALE, alpha, a, p_drop,
    # sizes: the sequence length
    N,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, KIND: tl.constexpr, P_CODE: tl.constexpr, G_CODE: tl.constexpr,
    FALLBACK: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key block; with ATOMIC also its share of dQ (and dc) by atomic adds, which
    makes the backward one kernel that computes q kᵀ and dO vᵀ once per tile."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = bh * N * D
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    k = _load_rows(K, kv, cols, N, D, True)
    v = _load_rows(V, kv, cols, N, D, True)
    r = 1.0 / (alpha - 1.0)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    first, edge_end, inner_end = _query_blocks(pid, N, BLOCK, CAUSAL)
    dk, dv = _kv_blocks(
        dk, dv, k, v, Q, STATS, DO, RHO, DQ, DC, kv, bh, cols, seed, SCALE, alpha, a, r, p_drop,
        first, edge_end, N, True, D, KIND, P_CODE, G_CODE, FALLBACK, CAUSAL, OFFSET, DROPOUT,
        BLOCK, PRECISION, ATOMIC,
    )  # fmt: skip
    dk, dv = _kv_blocks(
        dk, dv, k, v, Q, STATS, DO, RHO, DQ, DC, kv, bh, cols, seed, SCALE, alpha, a, r, p_drop,
        edge_end, inner_end, N, False, D, KIND, P_CODE, G_CODE, FALLBACK, CAUSAL, OFFSET,
        DROPOUT, BLOCK, PRECISION, ATOMIC,
    )  # fmt: skip
    dk, dv = _kv_blocks(
        dk, dv, k, v, Q, STATS, DO, RHO, DQ, DC, kv, bh, cols, seed, SCALE, alpha, a, r, p_drop,
        tl.maximum(inner_end, edge_end), N, N, True, D, KIND, P_CODE, G_CODE, FALLBACK, CAUSAL,
        OFFSET, DROPOUT, BLOCK, PRECISION, ATOMIC,
    )  # fmt: skip
    _store_rows(DK, kv, cols, N, dk * SCALE, D)
    _store_rows(DV, kv, cols, N, dv, D)


@triton.jit
def _q_blocks(
    # running results of the passes over the blocks
    dq, dc,
    # the data: blocks in registers (lower case), tensors in memory (upper case)
    q, do, rho, K, V,
    # where: head offset, head, rows or columns of this block
    kv, bh, rows,
    # the row statistics so far
    t0, t1, t2, uniform, ginv,
    # kernel parameters
    seed, SCALE, a, r, p_drop,
    # sizes: the blocks to visit (lo to hi), the sequence length
    lo, hi, N,
    # compile-time: shape, kernel family, masks, tile, precision
    EDGE: tl.constexpr, D: tl.constexpr, KIND: tl.constexpr, P_CODE: tl.constexpr,
    G_CODE: tl.constexpr, FALLBACK: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    keep_scale = 1.0 / (1.0 - p_drop)
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        k = _load_rows(K, kv, cols, N, D, EDGE)
        v = _load_rows(V, kv, cols, N, D, EDGE)
        s = _scores(q, k, rows, cols, N, SCALE, EDGE, CAUSAL, OFFSET, PRECISION)
        w, g = _unnormalised(s, cols, t0, t1, t2, uniform, a, r, KIND, P_CODE, G_CODE, FALLBACK)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, rows, cols, N, p_drop), dp * keep_scale, 0.0)
        ds = g * ginv[:, None] * (dp - rho[:, None])
        if KIND == RELU:
            dc += tl.sum(ds, 1)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq, dc


@triton.jit
def backward_q_kernel(
    # tensors in global memory (pointers)
    Q, K, V, STATS, DO, RHO, DQ, DC,
    # kernel parameters
    seed, SCALE, alpha, a, p_drop,
    # sizes: the sequence length
    N,
    # compile-time: shape, kernel family, masks, tile, precision
    D: tl.constexpr, KIND: tl.constexpr, P_CODE: tl.constexpr, G_CODE: tl.constexpr,
    FALLBACK: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = bh * N * D
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    q = _load_rows(Q, kv, rows, N, D, True)
    do = _load_rows(DO, kv, rows, N, D, True)
    rho = tl.load(RHO + bh * N + rows, mask=rows < N, other=0.0)
    t0, t1, t2, uniform, inv, ginv = _row_state(
        STATS, bh, rows, N, alpha, CAUSAL, OFFSET, KIND, FALLBACK
    )
    r = 1.0 / (alpha - 1.0)
    dq = tl.zeros([BLOCK, D], tl.float32)
    dc = tl.zeros([BLOCK], tl.float32)
    inner, end = _key_blocks(pid, N, BLOCK, CAUSAL)
    dq, dc = _q_blocks(
        dq, dc, q, do, rho, K, V, kv, bh, rows, t0, t1, t2, uniform, ginv, seed, SCALE, a, r,
        p_drop, 0, inner, N, False, D, KIND, P_CODE, G_CODE, FALLBACK, CAUSAL, OFFSET, DROPOUT,
        BLOCK, PRECISION,
    )  # fmt: skip
    dq, dc = _q_blocks(
        dq, dc, q, do, rho, K, V, kv, bh, rows, t0, t1, t2, uniform, ginv, seed, SCALE, a, r,
        p_drop, inner, end, N, True, D, KIND, P_CODE, G_CODE, FALLBACK, CAUSAL, OFFSET, DROPOUT,
        BLOCK, PRECISION,
    )  # fmt: skip
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
    """Row maximum and its earliest argmax (relumax's anchor); 0 where a row sees no key."""
    pid, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    q = _load_rows(Q, bh * N * D, rows, N, D, True)
    top, arg, _ = _row_max(
        q, K, bh * N * D, rows, pid, N, SCALE, True, False, D, CAUSAL, OFFSET, BLOCK, PRECISION
    )
    tl.store(M + bh * N + rows, tl.where(top > float("-inf"), top, 0.0), mask=rows < N)
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

"""The fused Triton kernels (`mosaic_core.fused`) against the float64 reference of `kernels`.

Without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before
Triton is first imported): tiny shapes only (N ≤ 64, D = 16), the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs the triton package (the gpu extra)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mosaic_core import attention  # noqa: E402
from mosaic_core.attention import attend, attention_path  # noqa: E402
from mosaic_core.fused import _forward, fused_attention, fused_passes, keep_mask  # noqa: E402
from mosaic_core.fused import triton_kernels as tk  # noqa: E402
from mosaic_core.kernel_specs import fused_call  # noqa: E402
from mosaic_core.kernels import attention_weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = [
    ("sparsemax", {}),
    ("entmax", {"alpha": 1.5}),
    ("entmax", {"alpha": 4 / 3}),
    ("entmax", {"alpha": 1.7}),  # a non-integer power 1/(α−1)
    ("normrelu", {"gamma": 0.5, "b": -1.0}),
    ("relumax", {"b": 0.7}),
    ("topk_softmax", {"k": 5}),
    ("topk_uniform", {"k": 5}),
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()


def inputs(length: int, *, heads: int = 2, dim: int = 16, seed: int = 0, scale: float = 1.5):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [
        torch.randn(1, heads, length, dim, generator=gen, device=DEVICE) * scale for _ in range(3)
    ]


def run(path, q, k, v, kernel, params, probe, *, mask_mode, dropout_p=0.0, keep=None):
    """(out, [dq, dk, dv]) of the fused kernel (path "fused") or the float64 reference."""
    if path == "fused":
        tensors = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fused_attention(
            *tensors,
            fused_call(kernel, **params),
            mask_mode=mask_mode,
            scale=0.8,
            dropout_p=dropout_p,
        )
    else:
        tensors = [t.double().clone().requires_grad_() for t in (q, k, v)]
        if keep is None:
            out = attend(
                *tensors, kernel, mask_mode=mask_mode, scale=0.8, backend="reference", **params
            )
        else:
            mask = attention.causal_mask(q.shape[-2], q.shape[-2], mask_mode, device=q.device)
            weights = attention_weights(
                0.8 * tensors[0] @ tensors[1].transpose(-2, -1), kernel, mask=mask, **params
            )
            out = (weights * keep.view(weights.shape) / (1 - dropout_p)) @ tensors[2]
    grads = torch.autograd.grad((out * probe.to(out.dtype)).sum(), tensors, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def assert_matches(fused, reference, out_tol=1e-5, grad_tol=1e-4):
    assert relative_error(fused[0], reference[0]) <= out_tol
    for got, want in zip(fused[1], reference[1]):
        assert (got.double() - want).norm() <= grad_tol * max(want.norm(), 1.0)


@pytest.mark.parametrize("mask_mode", ["strict_causal", "causal"])
@pytest.mark.parametrize(("kernel", "params"), FUSED)
def test_fused_kernel_matches_reference_values_and_gradients(kernel, params, mask_mode):
    q, k, v = inputs(40)
    probe = torch.randn_like(q)
    fused = run("fused", q, k, v, kernel, params, probe, mask_mode=mask_mode)
    reference = run("reference", q, k, v, kernel, params, probe, mask_mode=mask_mode)
    assert_matches(fused, reference)
    if mask_mode == "strict_causal":  # position 0 sees no key: output 0
        assert torch.equal(fused[0][..., 0, :], torch.zeros_like(fused[0][..., 0, :]))


@pytest.mark.parametrize("length", [16, 64])
def test_shortest_and_one_tile_lengths_without_a_mask(length):
    q, k, v = inputs(length, seed=3)
    probe = torch.randn_like(q)
    for kernel, params in (("entmax", {"alpha": 1.5}), ("topk_softmax", {"k": 3})):
        fused = run("fused", q, k, v, kernel, params, probe, mask_mode=None)
        assert_matches(fused, run("reference", q, k, v, kernel, params, probe, mask_mode=None))


def test_top_k_ties_go_to_the_earliest_keys_as_in_the_reference():
    q, k, v = inputs(48, heads=1, seed=4)
    k[..., 20:30, :] = k[..., 10:11, :]  # eleven equal keys: every row that sees them has a tie
    q[..., 40:, :] = k[..., 10:11, :]  # … and rows whose k-th score is one of them
    probe = torch.randn_like(q)
    for kernel in ("topk_softmax", "topk_uniform"):
        fused = run("fused", q, k, v, kernel, {"k": 4}, probe, mask_mode="strict_causal")
        assert_matches(
            fused, run("reference", q, k, v, kernel, {"k": 4}, probe, mask_mode="strict_causal")
        )


@pytest.mark.parametrize("deterministic", ["0", "1"])
def test_normrelu_per_head_b_gets_its_gradient_and_empty_rows_fall_back_to_uniform(
    deterministic, monkeypatch
):
    """The model's normrelu: b = 1 − 2β² per head, most rows with no positive weight; b's
    gradient comes from the atomic one-kernel backward and from the two-kernel one."""
    monkeypatch.setenv("MOSAIC_FUSED_DETERMINISTIC", deterministic)
    k, _, v = inputs(48, heads=3, seed=5, scale=0.5)
    b = torch.tensor([-3.0, -0.2, 0.5], device=DEVICE)[:, None, None].requires_grad_()
    keys, values = k.clone().requires_grad_(), v.clone().requires_grad_()
    call = fused_call("normrelu", gamma=0.5, b=b)
    fused = fused_attention(keys, keys, values, call, mask_mode="strict_causal", scale=1.0)
    reference = attend(keys, keys, values, "normrelu", backend="reference", gamma=0.5, b=b)
    assert relative_error(fused, reference) < 1e-5
    probe = torch.randn_like(reference)
    got = torch.autograd.grad((fused * probe).sum(), [keys, values, b])
    want = torch.autograd.grad((reference * probe).sum(), [keys, values, b])
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-4


def test_relumax_ties_take_the_earliest_maximum():
    k, _, v = inputs(40, heads=1, seed=6)
    k[..., 25, :] = k[..., 13, :]
    out = fused_attention(k, k, v, fused_call("relumax"), mask_mode="strict_causal", scale=1.0)
    assert (
        relative_error(
            out, attend(k.double(), k.double(), v.double(), "relumax", backend="reference")
        )
        < 1e-5
    )


@pytest.mark.parametrize(("kernel", "params"), [FUSED[1], FUSED[4], FUSED[6]])
def test_dropout_drops_the_same_weights_forward_and_backward(kernel, params):
    """Same seed, same mask: the fused kernel equals the reference with the kernels' own keep-mask,
    in outputs and in gradients (which a backward with another mask would not match)."""
    q, k, v = inputs(32, seed=7)
    probe = torch.randn_like(q)
    torch.manual_seed(11)
    fused = run("fused", q, k, v, kernel, params, probe, mask_mode="causal", dropout_p=0.3)
    torch.manual_seed(11)
    seed = int(torch.randint(2**31 - 1, (), dtype=torch.int64))
    keep = keep_mask(seed, 0.3, 2, 32, DEVICE)
    assert 0.55 < keep.float().mean() < 0.85
    reference = run(
        "reference", q, k, v, kernel, params, probe, mask_mode="causal", dropout_p=0.3, keep=keep
    )
    assert_matches(fused, reference)


@pytest.mark.parametrize(("kernel", "params"), [FUSED[0], FUSED[4], FUSED[6]])
def test_a_launch_override_changes_the_tile_not_the_result(kernel, params, monkeypatch):
    """MOSAIC_FUSED_LAUNCH (bench/kernels.py --launch) with 16-key tiles: N = 40 becomes three
    query blocks, the last cut short, and the kernels still match the float64 reference."""
    monkeypatch.setenv(
        "MOSAIC_FUSED_LAUNCH", '{"block": 16, "num_warps": 2, "forward": {"num_stages": 2}}'
    )
    q, k, v = inputs(40, seed=13)
    probe = torch.randn_like(q)
    fused = run("fused", q, k, v, kernel, params, probe, mask_mode="strict_causal")
    assert_matches(
        fused, run("reference", q, k, v, kernel, params, probe, mask_mode="strict_causal")
    )
    call = fused_call(kernel, **params)
    counts = fused_passes(q, k, v, call, mask_mode="strict_causal", scale=0.8)
    assert counts.shape == (1, 2, 3)


@pytest.mark.parametrize(
    "override",
    [
        '{"forward": {"warps": 4}}',  # unknown key
        '{"forward": {"num_warps": 2}}',  # warps per kernel: top-k's selection would differ
        '{"block": 256}',  # 8-bit histogram slots hold at most 255 keys of a tile
        '{"block": 48}',
        '{"num_warps": true}',
        '{"statistics": 4}',
        "[]",
    ],
)
def test_a_launch_override_outside_what_is_allowed_is_refused(override, monkeypatch):
    monkeypatch.setenv("MOSAIC_FUSED_LAUNCH", override)
    q, k, v = inputs(16)
    with pytest.raises(ValueError, match="MOSAIC_FUSED_LAUNCH takes a JSON object with 'block'"):
        fused_attention(q, k, v, fused_call("sparsemax"), mask_mode="causal", scale=1.0)


def test_normrelu_counts_its_fallback_pass_only_in_blocks_that_make_it():
    """Two 64-query blocks, strictly causal: with b = 0.5 every row but the first (no key) has
    weight, so each block makes the output pass alone; with b = −50 every row falls back to the
    uniform mean, which is a second pass over the values."""
    k, _, v = inputs(128, heads=1, seed=14, scale=0.3)
    for b, passes in ((0.5, 1.0), (-50.0, 2.0)):
        call = fused_call("normrelu", gamma=0.5, b=b)
        counts = fused_passes(k, k, v, call, mask_mode="strict_causal", scale=1.0)
        assert counts.tolist() == [[[passes, passes]]]


def test_eager_double_backward_is_refused_as_the_custom_op_refuses_it():
    """The backward is closed-form Triton: a second derivative through it must raise, not come
    back silently without the attention's terms."""
    q, k, v = (t.requires_grad_() for t in inputs(16))
    out = fused_attention(
        q, k, v, fused_call("entmax", alpha=1.5), mask_mode="strict_causal", scale=1.0
    )
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), [q], create_graph=True)


@pytest.mark.parametrize(("kernel", "params"), [("entmax", {"alpha": 1.5}), ("relumax", {})])
def test_compiles_to_one_graph(kernel, params):
    """Custom ops with fake implementations and registered autograd (relumax's max through an
    autograd.Function around one): no graph break, and the eager path's gradients."""
    q, k, v = (t.requires_grad_() for t in inputs(16))

    def step(q, k, v):
        return fused_attention(
            q, k, v, fused_call(kernel, **params), mask_mode="strict_causal", scale=1.0
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    want = torch.autograd.grad(step(q, k, v).sum(), [q, k, v])
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, atol=1e-6)


def test_paths(monkeypatch):
    assert attention_path("sparsemax", {}, "cpu") == "reference"
    assert attention_path("sparsemax", {}, "cpu", backend="fast") == "chunked"
    monkeypatch.setattr(attention, "triton_available", lambda: True)
    assert attention_path("softmax", {}, "cuda") == "sdpa"
    assert attention_path("triweight", {}, "cuda", dtype=torch.bfloat16) == "fused"
    assert attention_path("entmax", {"alpha": 2.5}, "cuda") == "chunked"  # fused kernels take α ≤ 2
    # D not a power of two
    assert attention_path("topk_uniform", {"k": 8}, "cuda", head_dim=48) == "chunked"


def test_half_precision_output_is_normalised_by_the_weights_it_sums():
    """normrelu with b = −5 on Memory Mosaics keys (‖k‖ = 3): most rows keep one key of tiny mass l,
    where the exact key gradient is 0 and the backward multiplies ρ's rounding by a/l. The forward
    must divide by the sum of the weights as rounded for its weighted sum (fp16 here: the
    interpreter has no bf16); dividing by the unrounded sum gave dk off by 1.5 instead of < 1e-3."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    keys = torch.nn.functional.normalize(
        torch.randn(1, 2, 16, 64, generator=gen, device=DEVICE), dim=-1
    )
    values = torch.randn(1, 2, 16, 64, generator=gen, device=DEVICE)
    half = [(keys * 3).half().requires_grad_(), values.half().requires_grad_()]
    exact = [t.detach().double().requires_grad_() for t in half]
    fused = fused_attention(
        half[0],
        half[0],
        half[1],
        fused_call("normrelu", gamma=0.5, b=-5.0),
        scale=1.0,
        mask_mode="strict_causal",
    )
    reference = attend(exact[0], exact[0], exact[1], "normrelu", gamma=0.5, b=-5.0)
    probe = torch.randn(reference.shape, generator=gen, device=DEVICE, dtype=torch.float64)
    (fused.double() * probe).sum().backward()
    (reference * probe).sum().backward()
    assert relative_error(fused, reference) < 1e-3
    assert exact[0].grad.norm() < 1e-10  # every row: uniform fallback or a one-key support
    assert half[0].grad.double().norm() < 1e-2
    assert relative_error(half[1].grad, exact[1].grad) < 1e-2


def assert_certified(q: torch.Tensor, k: torch.Tensor, alpha: float, scale: float) -> None:
    """The kernel's τ (strictly causal rows) is the float64 root of Σ_{j∈S} (x_j − τ)^r = 1 on its
    support S = {x > τ} to float32 rounding, and S is that root's support."""
    stats = _forward(q, k, k, fused_call("entmax", alpha=alpha), "strict_causal", scale, 0.0)[1]
    n, r = q.shape[-2], round(1 / (alpha - 1))
    x = (alpha - 1) * scale * (q.double() @ k.double().transpose(-2, -1))
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    tau = stats[..., 0].double()
    support = allowed & (x > tau[..., None])
    rows = support.any(-1)
    low = torch.where(allowed & ~support, x, -torch.inf).amax(-1).maximum(tau - 1)
    high = torch.where(support, x, torch.inf).amin(-1)
    for _ in range(80):  # bisection on the support's polynomial, between its neighbours
        mid = (low + high) / 2
        above = (torch.where(support, x - mid[..., None], 0.0) ** r).sum(-1) >= 1
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    assert ((tau - low).abs() <= 4e-7 * low.abs().clamp(min=1.0))[rows].all()
    assert torch.equal(support[rows], (allowed & (x > low[..., None]))[rows])


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4 / 3])
def test_certified_threshold_is_the_float64_threshold_of_its_support(alpha):
    """For r = 1/(α−1) ∈ {1, 2, 3} the kernel stops on a certificate: its τ is exact for its
    support, which no tolerance on Newton steps gives (they stop up to 1e-5 short)."""
    q, k, _ = inputs(48, seed=8)
    assert_certified(q, k, alpha, 0.8)


@pytest.mark.parametrize(
    ("kernel", "params", "most"),
    [("sparsemax", {}, 5), ("entmax", {"alpha": 1.5}, 5), ("entmax", {"alpha": 4 / 3}, 5)]
    + [("normrelu", {"gamma": 0.5, "b": -7.0}, 2), ("relumax", {"b": 1.0}, 2)],
)
def test_forward_passes_over_the_keys_on_the_benchmark_scores(kernel, params, most):
    """The benchmark's scores (unit keys × β = 2, D = 64): a max pass, a histogram pass, at most
    two certified steps and the output pass for α-entmax; the output pass and relumax's max pass,
    or normrelu's uniform fallback (b = −7 leaves these rows without a positive weight)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    keys = torch.nn.functional.normalize(
        torch.randn(1, 2, 128, 64, generator=gen, device=DEVICE), dim=-1
    )
    counts = fused_passes(
        keys * 2, keys * 2, keys, fused_call(kernel, **params), mask_mode="strict_causal", scale=1.0
    )
    assert counts.shape == (1, 2, 2)
    assert counts.max() <= most


def assert_same_selection(kernel: str, n: int, dtype: torch.dtype) -> None:
    """With v = I (D = N) the forward's output row i is its weights over the keys, and with dO = I
    the backward's dV column i is the weights it recomputed: both select the same keys, and those
    the float64 reference selects, ties (nine repeated keys, and many equal scores) to the
    earliest. Entries in {−1, 0, 1} make every dot product exact, so equal keys score equal in
    any summation order (the interpreter's matmul rounds identical columns differently)."""
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    q, k = (torch.randint(-1, 2, (1, 2, n, n), generator=gen, device=DEVICE).float() for _ in "qk")
    k[..., 12:20, :] = k[..., 5:6, :]
    q[..., n - 8 :, :] = k[..., 5:6, :]
    q, k = q.to(dtype), k.to(dtype)
    eye = torch.eye(n, device=DEVICE, dtype=dtype).expand(1, 2, n, n)
    values = eye.clone().requires_grad_()
    out = fused_attention(
        q, k, values, fused_call(kernel, k=4), mask_mode="strict_causal", scale=0.8
    )
    (grad_v,) = torch.autograd.grad(out, [values], eye)
    assert torch.equal(grad_v.transpose(-2, -1) > 0, out > 0)
    reference = attend(
        q.double(), k.double(), eye.double(), kernel, scale=0.8, backend="reference", k=4
    )
    assert torch.equal(out > 0, reference > 0)


@triton.jit
def _keys_and_back(S, KEY, BACK, B: tl.constexpr):
    """Each score's radix key (as int64) and the score mapped back from it."""
    i = tl.arange(0, B)
    key = tk._radix_key(tl.load(S + i))
    tl.store(KEY + i, key.to(tl.int64))
    tl.store(BACK + i, tk._from_radix_key(key))


def test_radix_keys_order_the_scores_as_floats_and_map_back():
    """Top-k's 32-bit search counts in the uint32 image of the scores: its order must be the
    floats' order (negative, tiny, infinite scores included) and the image must invert exactly."""
    finfo = torch.finfo(torch.float32)
    scores = torch.tensor(
        [-float("inf"), finfo.min, -2.5, -1.0, -finfo.tiny, -1e-45, 0.0, 1e-45, finfo.tiny, 0.5,
         1.0, 1.0000001, finfo.max, float("inf"), 3.0, -3.0],
        device=DEVICE,
    )  # fmt: skip
    keys = torch.empty(16, dtype=torch.int64, device=DEVICE)
    back = torch.empty_like(scores)
    _keys_and_back[(1,)](scores, keys, back, B=16)
    assert torch.equal(back, scores)
    assert torch.equal(torch.argsort(keys), torch.argsort(scores))
    assert keys.min() >= 0 and keys.max() < 2**32


@pytest.mark.parametrize("kernel", ["topk_softmax", "topk_uniform"])
def test_top_k_forward_and_backward_select_the_same_keys(kernel):
    assert_same_selection(kernel, 32, torch.float32)


@pytest.mark.parametrize("mask_mode", ["strict_causal", "causal", None])
@pytest.mark.parametrize(("kernel", "params"), [FUSED[0], FUSED[3], FUSED[4], FUSED[5], FUSED[6]])
def test_blocks_without_a_mask_and_a_last_partial_block(kernel, params, mask_mode):
    """N = 80 is two 64-key tiles, the second cut short: tiles that build no mask, the diagonal
    tile and the tile past the end meet in every pass, forward and backward."""
    q, k, v = inputs(80, seed=10)
    probe = torch.randn_like(q)
    fused = run("fused", q, k, v, kernel, params, probe, mask_mode=mask_mode)
    assert_matches(fused, run("reference", q, k, v, kernel, params, probe, mask_mode=mask_mode))


@pytest.mark.parametrize(("kernel", "params"), [FUSED[1], FUSED[4], FUSED[6]])
def test_deterministic_two_kernel_backward_matches_reference_and_the_atomic_one(
    kernel, params, monkeypatch
):
    """MOSAIC_FUSED_DETERMINISTIC=1 keeps dQ out of atomic adds (a second kernel sums it in a
    fixed order): the same gradients as the one-kernel backward, to float32 rounding, and as the
    float64 reference."""
    q, k, v = inputs(80, seed=12)
    probe = torch.randn_like(q)
    atomic = run("fused", q, k, v, kernel, params, probe, mask_mode="strict_causal")
    monkeypatch.setenv("MOSAIC_FUSED_DETERMINISTIC", "1")
    fixed = run("fused", q, k, v, kernel, params, probe, mask_mode="strict_causal")
    assert_matches(
        fixed, run("reference", q, k, v, kernel, params, probe, mask_mode="strict_causal")
    )
    for got, want in zip(fixed[1], atomic[1]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels (pytest -m gpu tests/test_fused.py); the CPU tests above run there too

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "params"), FUSED)
def test_gpu_both_backwards_match_the_reference_on_memory_mosaics_keys(kernel, params, monkeypatch):
    """Compiled, float32, N = 1000 (16 tiles, the last cut short), queries = keys = unit vectors
    × 3: outputs, and gradients from the atomic one-kernel and the two-kernel backward, against
    the float64 reference (tolerances of tests/test_attention.py's GPU parity)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    k = torch.randn(1, 2, 1000, 64, generator=gen, device=DEVICE)
    k = torch.nn.functional.normalize(k, dim=-1) * 3
    v = torch.randn(1, 2, 1000, 64, generator=gen, device=DEVICE)
    probe = torch.randn_like(v)
    reference = run("reference", k, k, v, kernel, params, probe, mask_mode="strict_causal")
    for deterministic in ("0", "1"):
        monkeypatch.setenv("MOSAIC_FUSED_DETERMINISTIC", deterministic)
        fused = run("fused", k, k, v, kernel, params, probe, mask_mode="strict_causal")
        assert_matches(fused, reference, out_tol=1e-4, grad_tol=1e-3)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["topk_softmax", "topk_uniform"])
def test_gpu_top_k_forward_and_backward_select_the_same_keys(kernel, dtype):
    assert_same_selection(kernel, 64, dtype)

"""Attention backends agree with the dense reference; GPU fast paths are checked where CUDA exists."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_core import attention
from mosaic_core.attention import adasplash_available, attend, causal_mask

KERNELS = [
    ("softmax", {}),
    ("sparsemax", {}),
    ("entmax", {"alpha": 1.5}),
    ("entmax", {"alpha": 4 / 3}),
    ("normrelu", {"gamma": 0.5, "b": -0.5}),
    ("relumax", {"b": 1.0}),
    ("topk_softmax", {"k": 4}),
    ("topk_uniform", {"k": 4}),
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def qkv(
    batch: int,
    heads: int,
    length: int,
    dim: int,
    *,
    dtype=torch.float64,
    device="cpu",
    seed: int = 0,
):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.randn(batch, heads, length, dim, generator=gen, dtype=dtype, device=device)
        for _ in range(3)
    ]


@pytest.mark.parametrize("mask_mode", ["strict_causal", "causal", None])
@pytest.mark.parametrize(("kernel", "params"), KERNELS)
def test_fast_backend_on_cpu_equals_reference_with_gradients(
    kernel, params, mask_mode, monkeypatch
):
    """On CPU "fast" means SDPA for softmax and query chunks for the rest: same values, same grads."""
    # forces 16-query chunks
    monkeypatch.setattr(attention, "_CHUNK_BUDGET_BYTES", 2 * 3 * 40 * 8 * 4)
    tensors = [t.requires_grad_() for t in qkv(2, 3, 40, 8)]
    reference = attend(
        *tensors, kernel, mask_mode=mask_mode, scale=0.7, backend="reference", **params
    )
    grads_reference = torch.autograd.grad(reference.square().sum(), tensors, allow_unused=True)
    fast = attend(*tensors, kernel, mask_mode=mask_mode, scale=0.7, backend="fast", **params)
    grads_fast = torch.autograd.grad(fast.square().sum(), tensors, allow_unused=True)
    assert torch.allclose(fast, reference, atol=1e-12)
    for g_fast, g_ref in zip(grads_fast, grads_reference):  # top-k uniform has no gradient for q, k
        assert (g_fast is None) == (g_ref is None)
        assert g_fast is None or torch.allclose(g_fast, g_ref, atol=1e-10)


def test_chunked_backward_keeps_no_full_score_matrix(monkeypatch):
    """With checkpointed chunks, autograd saves chunk-sized tensors only, never (N, N)."""
    monkeypatch.setattr(attention, "_CHUNK_BUDGET_BYTES", 64 * 256 * 4)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 256, 8, dtype=torch.float32))
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend(q, k, v, "sparsemax", backend="fast").sum().backward()
    assert saved, "nothing was saved: the hook did not run"
    assert max(math.prod(shape) for shape in saved) < 256 * 256


def test_causal_mask_modes():
    assert causal_mask(3, 3, "strict_causal").tolist() == [
        [False] * 3,
        [True, False, False],
        [True, True, False],
    ]
    assert causal_mask(3, 3, "causal").tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    assert causal_mask(2, 4, "causal", offset=2).tolist() == [[True, True, True, False], [True] * 4]
    assert causal_mask(3, 3, None) is None


def test_bad_backend_and_mask_mode_are_errors():
    q, k, v = qkv(1, 1, 4, 2)
    with pytest.raises(ValueError, match="unknown backend 'gpu'; allowed: auto, reference, fast"):
        attend(q, k, v, "softmax", backend="gpu")
    with pytest.raises(ValueError, match="unknown mask_mode 'strict'"):
        attend(q, k, v, "softmax", mask_mode="strict")


@pytest.mark.parametrize(
    ("kernel", "params"), [kp for kp in KERNELS if not kp[0].startswith("topk")]
)
def test_half_precision_inputs_keep_their_dtype_and_match_float32(kernel, params):
    """bf16 in, bf16 out, within bf16 rounding of float32 (top-k is excluded: a bf16-rounded tie
    legitimately changes which keys are selected)."""
    q, k, v = qkv(1, 2, 50, 8, dtype=torch.float32)
    exact = attend(q, k, v, kernel, backend="reference", **params)
    half = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), kernel, backend="fast", **params)
    assert half.dtype == torch.bfloat16
    assert relative_error(half, exact) < 2e-2


# ---------------------------------------------------------------------------------------------
# GPU: the Triton / SDPA fast paths against the reference (run on the device machine)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_KERNELS = [
    ("softmax", {}),
    ("sparsemax", {}),
    ("entmax", {"alpha": 1.5}),
    ("entmax", {"alpha": 4 / 3}),
    ("entmax", {"alpha": 1.7}),
    ("relumax", {"b": 1.0}),
    ("normrelu", {"gamma": 0.5, "b": -5.0}),
    ("topk_softmax", {"k": 32}),
    ("topk_uniform", {"k": 32}),
]
# normwise relative error ‖got − want‖ / ‖want‖ for (outputs, gradients): normwise so that the rare
# top-k selection that flips on a bf16-rounded tie does not fail an otherwise exact kernel
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2)}


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [16, 80, 128, 1000, 4096])
@pytest.mark.parametrize(("kernel", "params"), GPU_KERNELS)
def test_gpu_fast_path_matches_reference(kernel, params, length, dtype):
    if dtype == torch.bfloat16 and kernel.startswith("topk"):
        pytest.skip("top-k selection flips on bf16-rounded ties; the fp32 case checks the kernel")
    torch.manual_seed(0)
    # Memory Mosaics inputs: unit keys times β (scores β² cos), queries = keys
    beta = 3.0
    k = torch.nn.functional.normalize(torch.randn(1, 2, length, 64, device="cuda"), dim=-1) * beta
    v = torch.randn(1, 2, length, 64, device="cuda")
    fast_inputs = [k.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()]
    ref_inputs = [t.detach().float().requires_grad_() for t in fast_inputs]
    fast = attend(fast_inputs[0], fast_inputs[0], fast_inputs[1], kernel, backend="fast", **params)
    ref = attend(ref_inputs[0], ref_inputs[0], ref_inputs[1], kernel, backend="reference", **params)
    probe = torch.randn_like(ref)
    (fast.float() * probe).sum().backward()
    (ref * probe).sum().backward()
    out_tol, grad_tol = TOLERANCES[dtype]
    # position 0 sees no key
    assert torch.equal(fast[..., 0, :].float(), torch.zeros_like(ref[..., 0, :]))
    assert relative_error(fast, ref) <= out_tol
    for got, want in zip(fast_inputs, ref_inputs):
        # no gradient path (top-k uniform's constant weights) is a zero gradient; where the exact
        # gradient is zero (one-key supports, uniform fallback rows) rounding is judged absolutely
        got, want = (torch.zeros_like(t) if t.grad is None else t.grad for t in (got, want))
        assert (got.float() - want).norm() <= grad_tol * max(want.norm(), 1.0)


@cuda
@pytest.mark.gpu
def test_adasplash_backend_is_used_for_compact_kernels_when_installed(monkeypatch):
    if not adasplash_available():
        pytest.skip("adasplash is not installed")
    calls = []
    original = attention._adasplash
    monkeypatch.setattr(
        attention, "_adasplash", lambda *a, **kw: calls.append(kw["alpha"]) or original(*a, **kw)
    )
    q, k, v = qkv(1, 2, 256, 64, dtype=torch.float32, device="cuda")
    q = torch.nn.functional.normalize(q, dim=-1)
    for kernel, params in (("sparsemax", {}), ("entmax", {"alpha": 1.5}), ("triweight", {})):
        attend(q, q, v, kernel, backend="adasplash", **params)
    assert calls == [2.0, 1.5, 4 / 3]
    # scores up to 1e6: AdaSplash's −1e4 mask fails
    attend(q * 1e3, q * 1e3, v, "sparsemax", backend="adasplash")
    assert len(calls) == 3

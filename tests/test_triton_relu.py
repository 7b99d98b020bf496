"""The fused Triton normrelu/relumax kernels against the dense reference.

Without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before
Triton is first imported), so the kernels' logic is tested on any machine with `triton`.
"""

from __future__ import annotations

import pytest
import torch

triton_relu = pytest.importorskip("mosaic_core.triton_relu", reason="needs the triton package (the gpu extra)")

from mosaic_core.attention import attend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    ("relumax", {"b": 1.0}),
    ("relumax", {"b": 0.3}),
    ("normrelu", {"gamma": 0.5, "b": -1.0}),
    ("normrelu", {"gamma": 2.0, "b": 0.2}),
]


def inputs(batch: int = 2, heads: int = 2, length: int = 100, dim: int = 16, *, beta: float = 2.0, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(batch, heads, length, dim, generator=gen, device=DEVICE), dim=-1)
    values = torch.randn(batch, heads, length, dim, generator=gen, device=DEVICE)
    return keys * beta, values


def gradients(out: torch.Tensor, tensors: list[torch.Tensor], probe: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out.float() * probe).sum(), tensors))


@pytest.mark.parametrize("mask_mode", ["strict_causal", "causal"])
@pytest.mark.parametrize(("kernel", "params"), CASES)
def test_fused_kernel_matches_reference_values_and_gradients(kernel, params, mask_mode):
    keys, values = inputs()
    noise = torch.randn(keys.shape, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE)
    queries = (keys + 0.3 * noise).requires_grad_()
    keys, values = keys.requires_grad_(), values.requires_grad_()
    tensors = [queries, keys, values]
    fused = triton_relu.relu_attention(queries, keys, values, kernel, mask_mode=mask_mode, scale=0.8, **params)
    reference = attend(queries, keys, values, kernel, mask_mode=mask_mode, scale=0.8, backend="reference", **params)
    assert torch.allclose(fused, reference, atol=1e-5)
    probe = torch.randn_like(reference)
    for got, want in zip(gradients(fused, tensors, probe), gradients(reference, tensors, probe)):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_normrelu_per_head_b_gets_its_gradient_and_empty_rows_fall_back_to_uniform():
    """The model's normrelu: b = 1 − 2β² per head, most rows with no positive weight."""
    keys, values = inputs(heads=3, length=70, beta=1.5)
    b = torch.tensor([-3.0, -0.2, 0.5], device=DEVICE)[:, None, None].requires_grad_()
    tensors = [keys.requires_grad_(), values.requires_grad_(), b]
    fused = triton_relu.relu_attention(keys, keys, values, "normrelu", mask_mode="strict_causal", scale=1.0,
                                       gamma=0.5, b=b)
    reference = attend(keys, keys, values, "normrelu", mask_mode="strict_causal", backend="reference", gamma=0.5, b=b)
    assert torch.allclose(fused, reference, atol=1e-5)
    probe = torch.randn_like(reference)
    for got, want in zip(gradients(fused, tensors, probe), gradients(reference, tensors, probe)):
        assert torch.allclose(got, want, atol=1e-4)


def test_relumax_first_position_outputs_zero_and_ties_take_the_earliest_maximum():
    keys, values = inputs(batch=1, heads=1, length=66)
    keys[..., 5, :] = keys[..., 3, :]  # an exact tie for the best key of the rows that see both
    out = triton_relu.relu_attention(keys, keys, values, "relumax", mask_mode="strict_causal", scale=1.0, b=1.0)
    reference = attend(keys, keys, values, "relumax", backend="reference", b=1.0)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
    assert torch.allclose(out, reference, atol=1e-5)

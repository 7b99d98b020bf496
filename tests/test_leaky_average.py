"""The chunked leaky average equals the recurrence and the T × T form it replaced, values and gradients."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.leaky_average import chunk_size, leaky_average

RATES = [0.0, 0.05, 0.5, 5.0, 40.0]  # λ = 0 is a plain running sum; 40 underflows past a few lags


def by_recurrence(k: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """k̃_t = e^{−λ}·k̃_{t−1} + k_t, one step at a time (float64)."""
    state, out = torch.zeros_like(k[:, :, 0]), []
    for t in range(k.shape[-2]):
        state = torch.exp(-rate)[:, None] * state + k[:, :, t]
        out.append(state)
    return torch.stack(out, dim=2)


def by_decay_matrix(k: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """The quadratic form the model used before: (H, T, T) decays times the keys."""
    t = torch.arange(k.shape[-2])
    lag = (t[:, None] - t[None, :]).to(k.dtype)
    return (torch.exp(-rate[:, None, None] * lag.clamp(min=0)) * (lag >= 0)) @ k


def keys(length: int, dtype=torch.float64, heads: int = len(RATES)) -> tuple:
    generator = torch.Generator().manual_seed(length)
    k = torch.randn(2, heads, length, 3, generator=generator, dtype=dtype)
    return k, torch.tensor(RATES[:heads], dtype=dtype)


@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 63, 64, 65, 131, 512, 1000, 4096])
def test_the_chunked_scan_equals_the_recurrence_in_float64(length):
    k, rate = keys(length)
    expected = by_recurrence(k, rate)
    assert torch.allclose(leaky_average(k, rate), expected, rtol=1e-12, atol=1e-12)
    if length <= 1000:  # the T × T form at 4 096 would hold 5 × 4096² decays
        assert torch.allclose(by_decay_matrix(k, rate), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64, 200])
def test_any_chunk_size_gives_the_same_sums(chunk):
    k, rate = keys(131)
    assert torch.allclose(leaky_average(k, rate, chunk), by_recurrence(k, rate), atol=1e-12)


@pytest.mark.parametrize("length", [5, 131, 700])
def test_gradients_of_keys_and_rates_match_the_decay_matrix_form(length):
    k, rate = keys(length)
    upstream = torch.randn(k.shape, dtype=k.dtype, generator=torch.Generator().manual_seed(1))
    grads = []
    for form in (leaky_average, by_decay_matrix):
        k_, rate_ = k.clone().requires_grad_(), rate.clone().requires_grad_()
        (form(k_, rate_) * upstream).sum().backward()
        grads.append((k_.grad, rate_.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_inputs_are_summed_in_float32(dtype):
    k, rate = keys(1000)
    out = leaky_average(k.to(dtype), rate.to(dtype))
    assert out.dtype == torch.float32
    # the only error left is the inputs' own rounding (and float32 sums)
    expected = by_recurrence(k.to(dtype).double(), rate.to(dtype).double())
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_autocast_does_not_round_the_sums_to_bf16():
    k, rate = keys(300, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = leaky_average(k, rate)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), by_recurrence(k.double(), rate.double()), atol=1e-5)


def test_memory_is_linear_in_the_length():
    """No tensor of the computation holds T² elements: the largest is a few times the keys."""
    for length in (1024, 16384):
        k, rate = keys(length, torch.float32, heads=2)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel()) or t, lambda t: t
        ):
            leaky_average(k.requires_grad_(), rate.requires_grad_()).sum().backward()
        assert max(sizes) <= 2 * k.numel() + 2 * 64 * 64  # keys (padded) or a decay matrix
        assert chunk_size(length) <= 64

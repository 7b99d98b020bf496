"""Kernels against independent oracles: the `entmax` package, closed forms, brute-force loops."""

from __future__ import annotations

import math

import entmax
import pytest
import torch

from mosaic_core.attention import attend
from mosaic_core.kernel_specs import KERNEL_SPECS, kernel_label, resolve_kernel
from mosaic_core.kernels import (
    KERNELS,
    attention_weights,
    entmax_threshold,
    kernel_diagnostics,
    support_size,
)

ALL_KERNELS = [
    ("softmax", {}),
    ("sparsemax", {}),
    ("entmax", {"alpha": 1.5}),
    ("entmax", {"alpha": 4 / 3}),
    ("entmax", {"alpha": 1.75}),
    ("normrelu", {"gamma": 0.5, "b": 0.2}),
    ("relumax", {"b": 1.0}),
    ("topk_softmax", {"k": 3}),
    ("topk_uniform", {"k": 3}),
]


def scores64(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return (
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * scale
    )


@pytest.mark.parametrize(
    ("kernel", "params", "oracle"),
    [
        ("sparsemax", {}, lambda x: entmax.sparsemax(x, dim=-1)),
        ("entmax", {"alpha": 1.5}, lambda x: entmax.entmax15(x, dim=-1)),
        ("entmax", {"alpha": 2.0}, lambda x: entmax.sparsemax(x, dim=-1)),
        ("entmax", {"alpha": 4 / 3}, lambda x: entmax.entmax_bisect(x, 4 / 3, dim=-1, n_iter=100)),
        ("entmax", {"alpha": 1.25}, lambda x: entmax.entmax_bisect(x, 1.25, dim=-1, n_iter=100)),
        ("entmax", {"alpha": 1.75}, lambda x: entmax.entmax_bisect(x, 1.75, dim=-1, n_iter=100)),
        ("softmax", {}, lambda x: torch.softmax(x, dim=-1)),
    ],
)
def test_agrees_with_entmax_package_in_float64(kernel, params, oracle):
    x = scores64(64, 37)
    assert torch.allclose(attention_weights(x, kernel, **params), oracle(x), atol=1e-10, rtol=0)


def test_sparsemax_closed_form():
    p = attention_weights(torch.tensor([-2.0, 0.0, 0.5], dtype=torch.float64), "sparsemax")
    assert torch.allclose(p, torch.tensor([0.0, 0.25, 0.75], dtype=torch.float64), atol=1e-15)


def test_entmax15_closed_form_two_keys():
    # p = [s/2 − τ]_+², two keys with scores (0, 2): (−τ)² + (1 − τ)² = 1 gives τ = 0 → p = (0, 1)
    p = attention_weights(torch.tensor([0.0, 2.0], dtype=torch.float64), "biweight")
    assert torch.equal(p, torch.tensor([0.0, 1.0], dtype=torch.float64))
    # scores (0, 1): τ² + (1/2 − τ)² = 1 with τ < 0 gives τ = (1/2 − √(7/4)) / 2, both keys in the support
    p = attention_weights(torch.tensor([0.0, 1.0], dtype=torch.float64), "biweight")
    tau = (0.5 - math.sqrt(1.75)) / 2
    assert torch.allclose(
        p, torch.tensor([tau**2, (0.5 - tau) ** 2], dtype=torch.float64), atol=1e-14
    )


@pytest.mark.parametrize(("kernel", "params"), ALL_KERNELS)
def test_rows_are_on_the_simplex_with_exact_zeros_off_the_mask(kernel, params):
    x = scores64(8, 20, seed=1)
    mask = torch.rand(8, 20, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[0] = False  # a fully masked row: all zero, no NaN
    mask[1] = False
    mask[1, 5] = True  # a single allowed key gets all the weight
    p = attention_weights(x, kernel, mask=mask, **params)
    assert not torch.isnan(p).any()
    assert (p >= 0).all()
    assert torch.equal(p[~mask], torch.zeros_like(p[~mask]))
    assert torch.equal(p[0], torch.zeros(20, dtype=p.dtype))
    assert p[1, 5] == 1.0
    assert torch.allclose(p[1:].sum(-1), torch.ones(7, dtype=p.dtype), atol=1e-12)


@pytest.mark.parametrize(("kernel", "params"), ALL_KERNELS)
def test_minus_inf_scores_act_as_masked(kernel, params):
    x = scores64(4, 9, seed=3)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[:, 2] = False
    mask[3] = False
    with_mask = attention_weights(x, kernel, mask=mask, **params)
    with_inf = attention_weights(x.masked_fill(~mask, -math.inf), kernel, **params)
    assert torch.equal(with_mask, with_inf)


@pytest.mark.parametrize(("kernel", "params"), ALL_KERNELS)
def test_dim_argument(kernel, params):
    x = scores64(5, 6, 7, seed=4)
    assert torch.equal(
        attention_weights(x, kernel, dim=1, **params),
        attention_weights(x.transpose(1, 2), kernel, **params).transpose(1, 2),
    )


def test_huge_scores_stay_finite():
    x = torch.tensor([[1e4, 1e4 - 0.5, -1e4, 0.0]], dtype=torch.float32)
    for kernel, params in ALL_KERNELS:
        p = attention_weights(x, kernel, **params)
        assert torch.isfinite(p).all() and math.isclose(p.sum().item(), 1.0, abs_tol=1e-5), kernel


def test_entmax_approaches_softmax_as_alpha_goes_to_one():
    x = scores64(16, 10, seed=5, scale=1.0)
    gaps = [
        (attention_weights(x, "entmax", alpha=a) - torch.softmax(x, -1)).abs().max().item()
        for a in (1.5, 1.1, 1.01, 1.001)
    ]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-3


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4 / 3, 1.25])
def test_threshold_reproduces_the_weights(alpha):
    x = scores64(32, 15, seed=6)
    tau = entmax_threshold(x, alpha)
    p = ((alpha - 1) * x - tau[:, None]).clamp(min=0) ** (1 / (alpha - 1))
    assert torch.allclose(p, attention_weights(x, "entmax", alpha=alpha), atol=1e-10)
    if alpha == 2.0:  # sparsemax's τ by its own closed form
        assert torch.allclose(
            tau, entmax.sparsemax(x, -1).new_tensor([_sparsemax_tau(row) for row in x]), atol=1e-12
        )


def _sparsemax_tau(row: torch.Tensor) -> float:
    """Martins & Astudillo (2016): support size k = max{j : 1 + j z_(j) > Σ_{i≤j} z_(i)}."""
    z = sorted(row.tolist(), reverse=True)
    k = max(j for j in range(1, len(z) + 1) if 1 + j * z[j - 1] > sum(z[:j]))
    return (sum(z[:k]) - 1) / k


def test_threshold_of_fully_masked_row_is_nan():
    x = scores64(2, 4)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    tau = entmax_threshold(x, 1.5, mask=mask)
    assert math.isfinite(tau[0].item()) and math.isnan(tau[1].item())


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4 / 3])
def test_proposition_1_entmax_is_compact_kernel_regression(alpha):
    """α-entmax(Kq/γ) = NW with [1 − ‖k−q‖²/h²]_+^r, r = 1/(α−1), h = sqrt(2 − 2rγτ), unit-norm keys."""
    gen = torch.Generator().manual_seed(7)
    keys = torch.nn.functional.normalize(
        torch.randn(50, 8, generator=gen, dtype=torch.float64), dim=-1
    )
    query = torch.nn.functional.normalize(
        torch.randn(8, generator=gen, dtype=torch.float64), dim=-1
    )
    values = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    gamma = 0.2
    r = 1 / (alpha - 1)
    scores = keys @ query / gamma
    weights = attention_weights(scores, "entmax", alpha=alpha)
    h = math.sqrt(2 - 2 * r * gamma * entmax_threshold(scores, alpha).item())
    kernel = (1 - ((keys - query) ** 2).sum(-1) / h**2).clamp(min=0) ** r
    assert 1 < support_size(weights).item() < 50  # a genuinely compact, non-trivial support
    assert torch.allclose(weights, kernel / kernel.sum(), atol=1e-10)
    assert torch.allclose(weights @ values, (kernel / kernel.sum()) @ values, atol=1e-10)


def test_softmax_is_gaussian_kernel_regression():
    gen = torch.Generator().manual_seed(8)
    keys = torch.nn.functional.normalize(
        torch.randn(30, 5, generator=gen, dtype=torch.float64), dim=-1
    )
    query = torch.nn.functional.normalize(
        torch.randn(5, generator=gen, dtype=torch.float64), dim=-1
    )
    h = 0.7
    kernel = torch.exp(-((keys - query) ** 2).sum(-1) / (2 * h**2))
    assert torch.allclose(
        attention_weights(keys @ query / h**2, "softmax"), kernel / kernel.sum(), atol=1e-12
    )


def test_normrelu_is_fixed_bandwidth_epanechnikov():
    gen = torch.Generator().manual_seed(9)
    keys = torch.nn.functional.normalize(
        torch.randn(40, 4, generator=gen, dtype=torch.float64), dim=-1
    )
    query = torch.nn.functional.normalize(
        torch.randn(4, generator=gen, dtype=torch.float64), dim=-1
    )
    h = 1.1
    kernel = (1 - ((keys - query) ** 2).sum(-1) / h**2).clamp(min=0)
    weights = attention_weights(keys @ query, "normrelu", gamma=h**2 / 2, b=1 - 2 / h**2)
    assert 0 < support_size(weights).item() < 40
    assert torch.allclose(weights, kernel / kernel.sum(), atol=1e-12)


def test_normrelu_all_zero_row_is_uniform_over_allowed_keys():
    p = attention_weights(
        torch.tensor([-3.0, -2.0, -5.0]),
        "normrelu",
        gamma=1.0,
        b=0.0,
        mask=torch.tensor([True, True, False]),
    )
    assert torch.equal(p, torch.tensor([0.5, 0.5, 0.0]))


def test_relumax_keeps_exactly_the_keys_within_b_of_the_max():
    x = torch.tensor([3.0, 2.5, 2.0, 1.9, -1.0], dtype=torch.float64)
    p = attention_weights(x, "relumax", b=1.0)
    assert (p > 0).tolist() == [True, True, False, False, False]
    assert torch.allclose(p, torch.tensor([1.0, 0.5, 0, 0, 0], dtype=torch.float64) / 1.5)


def test_topk_picks_exactly_k_and_breaks_ties_by_position():
    x = torch.tensor([1.0, 5.0, 3.0, 5.0, 3.0, 3.0])
    p = attention_weights(x, "topk_uniform", k=3)
    # the earlier 3.0 wins the tie
    assert p.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 0, 0])
    q = attention_weights(x, "topk_softmax", k=3)
    expected = torch.softmax(torch.tensor([5.0, 3.0, 5.0]), -1)
    assert torch.allclose(q[[1, 2, 3]], expected) and q[[0, 4, 5]].sum() == 0
    few = attention_weights(
        x, "topk_uniform", k=3, mask=torch.tensor([True, False, False, False, False, True])
    )
    assert few.tolist() == [0.5, 0, 0, 0, 0, 0.5]  # fewer allowed keys than k: all of them


@pytest.mark.parametrize(
    ("kernel", "params"), [kp for kp in ALL_KERNELS if kp[0] != "topk_uniform"]
)
def test_gradcheck(kernel, params):
    x = scores64(3, 7, seed=10).requires_grad_()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False
    assert torch.autograd.gradcheck(
        lambda s: attention_weights(s, kernel, mask=mask, **params), (x,)
    )


@pytest.mark.parametrize(("kernel", "params"), ALL_KERNELS)
def test_strict_causal_attention_equals_a_per_query_loop(kernel, params):
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = attend(q, k, v, kernel, mask_mode="strict_causal", scale=0.5, **params)
    for t in range(9):
        if t == 0:
            assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # no key before position 0
            continue
        w = attention_weights(0.5 * q[:, t : t + 1] @ k[:, :t].transpose(1, 2), kernel, **params)
        assert torch.allclose(out[:, t : t + 1], w @ v[:, :t], atol=1e-12)


def test_causal_mask_includes_the_diagonal():
    q = torch.randn(1, 4, 2)
    out = attend(q, q, torch.eye(4).unsqueeze(0), "sparsemax", mask_mode="causal")
    assert out[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("entmax", {"alpha": 1.0}, "alpha must be > 1"),
        ("entmax", {"alpha": 0.5}, "alpha must be > 1"),
        ("topk_softmax", {"k": 0}, "k must be an integer >= 1"),
        ("topk_uniform", {"k": 2.5}, "k must be an integer >= 1"),
        ("relumax", {"b": 0.0}, "b must be > 0"),
        ("normrelu", {"gamma": -1.0}, "gamma must be > 0"),
        ("gausian", {}, "unknown kernel 'gausian'; allowed: softmax, sparsemax"),
        ("softmax", {"alpha": 1.5}, "has no parameter 'alpha'; allowed: none"),
        ("triweight", {"alpha": 1.5}, "fixes alpha=1.33333"),
    ],
)
def test_bad_parameters_are_clear_errors(name, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        attention_weights(torch.zeros(3), name, **params)


def test_aliases_and_labels():
    assert resolve_kernel("triweight") == ("entmax", {"alpha": 4 / 3})
    assert resolve_kernel("gaussian_knn", k=16) == ("topk_softmax", {"k": 16})
    assert [kernel_label(n) for n in ("gaussian", "epanechnikov", "biweight", "triweight")] == [
        "Gaussian",
        "Epanechnikov (sparsemax)",
        "Biweight",
        "Triweight",
    ]
    assert kernel_label("topk_softmax", k=32) == "Gaussian kNN, k = 32"
    assert kernel_label("uniform_knn", k=16) == "Uniform kNN, k = 16"
    assert kernel_label("relumax") == "Epanechnikov (ReLUmax)"
    assert kernel_label("entmax", alpha=1.2) == "1.2-entmax"


@pytest.mark.parametrize(
    ("kernel", "params"), [kp for kp in ALL_KERNELS if kp[0] != "topk_uniform"]
)
def test_plus_inf_scores_take_all_the_weight(kernel, params):
    x = torch.tensor([[0.5, math.inf, -1.0, math.inf], [0.5, 0.2, -1.0, 3.0]], dtype=torch.float64)
    p = attention_weights(x, kernel, **params)
    assert p[0].tolist() == [0.0, 0.5, 0.0, 0.5]
    # rows without +inf unaffected
    assert torch.equal(p[1], attention_weights(x[1], kernel, **params))


def test_plus_inf_in_top_k_uniform_ranks_first():
    p = attention_weights(torch.tensor([0.5, math.inf, -1.0, 2.0]), "topk_uniform", k=2)
    assert p.tolist() == [0.0, 0.5, 0.0, 0.5]


def test_topk_selection_matches_a_stable_sort_on_many_ties():
    gen = torch.Generator().manual_seed(12)
    x = torch.randint(0, 4, (200, 17), generator=gen).double()  # heavy ties
    mask = torch.rand(200, 17, generator=gen) > 0.2
    for k in (1, 3, 8, 17, 30):
        order = torch.sort(
            x.masked_fill(~mask, -math.inf), dim=-1, descending=True, stable=True
        ).indices[:, :k]
        expected = torch.zeros_like(mask).scatter(-1, order, True) & mask
        assert torch.equal(attention_weights(x, "topk_uniform", k=k, mask=mask) > 0, expected)


@pytest.mark.parametrize(
    ("kernel", "params"),
    [
        ("sparsemax", {}),
        ("entmax", {"alpha": 1.5}),
        ("entmax", {"alpha": 4 / 3}),
        ("normrelu", {"gamma": 1.0, "b": -0.6}),
        ("relumax", {"b": 0.05}),
    ],
)
def test_diagnosed_bandwidth_bounds_the_support(kernel, params):
    """A compact kernel's support is exactly the keys within its bandwidth h of the query."""
    gen = torch.Generator().manual_seed(13)
    keys = torch.nn.functional.normalize(
        torch.randn(64, 6, generator=gen, dtype=torch.float64), dim=-1
    )
    queries = torch.nn.functional.normalize(
        torch.randn(20, 6, generator=gen, dtype=torch.float64), dim=-1
    )
    temperature = 0.25
    scores = queries @ keys.T / temperature
    diagnostics = kernel_diagnostics(scores, kernel, temperature=temperature, **params)
    distance = torch.cdist(queries, keys)
    inside = distance < diagnostics.bandwidth[:, None]
    weights = attention_weights(scores, kernel, **params)
    assert torch.equal(weights > 0, inside)
    assert torch.equal(diagnostics.support_size, inside.sum(-1))
    assert (diagnostics.support_size > 0).all()


def test_diagnostics_of_softmax_top_k_and_empty_rows():
    scores = scores64(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    softmax = kernel_diagnostics(scores, "softmax", mask=mask, temperature=0.49)
    assert torch.allclose(softmax.bandwidth[:2], torch.full((2,), 0.7, dtype=torch.float64))
    assert math.isnan(softmax.bandwidth[2].item())
    assert softmax.support_size.tolist() == [5, 5, 0]
    topk = kernel_diagnostics(scores, "topk_softmax", mask=mask, k=2)
    assert topk.bandwidth is None and topk.support_size.tolist() == [2, 2, 0]


def test_diagnostics_per_head_temperature_broadcasts():
    scores = scores64(2, 3, 4, 6)  # (batch, heads, queries, keys)
    temperature = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None]
    d = kernel_diagnostics(scores, "sparsemax", temperature=temperature)
    tau = entmax_threshold(scores, 2.0)
    assert d.bandwidth.shape == (2, 3, 4)
    expected = (2 - 2 * temperature.squeeze(-1) * tau).clamp(min=0).sqrt()
    assert torch.allclose(d.bandwidth, expected)


def test_every_kernel_a_config_can_name_has_its_mathematics():
    """The torch-free table of names and the references are keyed alike, in one order."""
    assert list(KERNELS) == list(KERNEL_SPECS)

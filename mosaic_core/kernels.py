"""Attention kernels: maps from scores to Nadaraya–Watson weights on the probability simplex.

Softmax is the Gaussian kernel; sparsemax and α-entmax are the compact Epanechnikov / biweight /
triweight kernels with an adaptive bandwidth (Proposition 1 of the paper); normalized ReLU and
ReLUmax are Epanechnikov with a fixed or max-anchored bandwidth; top-k softmax and top-k uniform
are Gaussian and uniform k-nearest-neighbour regression.

Every kernel here is the pure-PyTorch reference: exact (sort-based where a closed form exists,
bisection otherwise), differentiable, and the oracle any faster backend is tested against.
Masked keys (mask False, or score −inf) get weight exactly 0; a row with no allowed key is all 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class FusedCall:
    """How a kernel runs in the fused Triton kernels (`mosaic_core.fused`): which family, with what.

    entmax: w = [(α−1)s − τ]_+^{1/(α−1)}; relu: w = [a·s + c]_+ with c = b, or b − max s when
    `anchored`, uniform over the allowed keys when all are 0 and `fallback`; topk_*: the top_k keys.
    """

    kind: str
    alpha: float = 2.0
    a: float = 1.0
    b: float | Tensor = 0.0
    anchored: bool = False
    fallback: bool = False
    top_k: int = 0


@dataclass(frozen=True)
class Kernel:
    """One kernel, all in one place: parameters, checks, label, reference, bandwidth, fast path.

    `checks` are (parameter, predicate, what is allowed); `bandwidth_squared(s, allowed, T, params)`
    gives h² per query (None: the kernel has no bandwidth); `fused(params)` gives the fused
    kernels' call, or None where the fast path is SDPA (softmax) or query chunks.
    """

    name: str
    reference: Callable[..., Tensor]
    label: Callable[[dict[str, Any]], str]
    defaults: dict[str, float] = field(default_factory=dict)
    aliases: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: tuple[tuple[str, Callable[[Any], bool], str], ...] = ()
    bandwidth_squared: Callable[..., Tensor] | None = None
    fused: Callable[[dict[str, Any]], FusedCall | None] | None = None


# the largest α-entmax trained stably: a 1-layer model trained in float32 stayed finite up to α = 32
# on 8-token sequences and 16 on 128 (NaN at step 2 from 40 and 24), and at α = 4 on 512: the
# longer the sequences, the lower the limit
MAX_ENTMAX_ALPHA = 4.0
_BISECT_ITERS = 60  # halves the initial bracket (width ≤ 1) down to float64 resolution


def resolve_kernel(name: str, **params: Any) -> tuple[str, dict[str, float]]:
    """Canonical name and complete, validated parameters for a kernel named by name or alias.

    Raises ValueError with a one-line message naming what is wrong and what is allowed.
    """
    if name in KERNEL_ALIASES:
        canonical, fixed = KERNEL_ALIASES[name]
        clash = {p for p in params if p in fixed and not math.isclose(params[p], fixed[p])}
        if clash:
            p = sorted(clash)[0]
            raise ValueError(f"kernel {name!r} fixes {p}={fixed[p]:g}; got {p}={params[p]!r}")
        params = {**params, **fixed}
        name = canonical
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; allowed: {', '.join(KERNEL_NAMES)}")
    spec = KERNELS[name]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(spec.defaults) or "none"
        raise ValueError(f"kernel {name!r} has no parameter {unknown[0]!r}; allowed: {allowed}")
    resolved = {**spec.defaults, **params}
    for param, ok, allowed in spec.checks:
        if not ok(resolved[param]):
            raise ValueError(f"{name} {param} must be {allowed}; got {resolved[param]!r}")
    if "k" in resolved:
        resolved["k"] = int(resolved["k"])
    return name, resolved


def kernel_label(name: str, **params: Any) -> str:
    """The paper's row label for a kernel variant (Tables 1, 2 and 7)."""
    name, p = resolve_kernel(name, **params)
    return KERNELS[name].label(p)


def fused_call(name: str, **params: Any) -> FusedCall | None:
    """The fused kernels' call for a kernel variant; None where its fast path is not fused."""
    name, p = resolve_kernel(name, **params)
    fused = KERNELS[name].fused
    return None if fused is None else fused(p)


def attention_weights(
    scores: Tensor, kernel: str, *, mask: Tensor | None = None, dim: int = -1, **params: Any
) -> Tensor:
    """Kernel weights over `dim` for `scores`; `mask` is True where a key may be attended.

    Half-precision scores are computed in float32 (thresholds and sums need it) and returned in
    their own dtype. A score of +inf takes all the weight, shared equally among such keys (the
    limit of every kernel but top-k uniform, whose ranking handles +inf as it is).
    """
    name, p = resolve_kernel(kernel, **params)
    scores = scores.movedim(dim, -1)
    allowed = _allowed(scores, None if mask is None else mask.movedim(dim, -1))
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    infinite = (work == math.inf) & allowed
    reference = KERNELS[name].reference
    if name == "topk_uniform" or not infinite.any():
        weights = reference(work, allowed, **p)
    else:
        weights = reference(work.masked_fill(infinite, 0.0), allowed, **p)
        has_inf = infinite.any(-1, keepdim=True)
        weights = torch.where(
            has_inf, infinite / infinite.sum(-1, keepdim=True).clamp(min=1), weights
        )
    return weights.to(scores.dtype).movedim(-1, dim)


def entmax_threshold(
    scores: Tensor, alpha: float, *, mask: Tensor | None = None, dim: int = -1
) -> Tensor:
    """τ of α-entmax in the convention p = [(α−1)s − τ]_+^{1/(α−1)} (α = 2: sparsemax's τ).

    τ fixes the adaptive bandwidth of Proposition 1, h = sqrt(2 − 2rγτ) with r = 1/(α−1).
    Rows with no allowed key get NaN: they have no threshold.
    """
    resolve_kernel("entmax", alpha=alpha)
    scores = scores.movedim(dim, -1)
    allowed = _allowed(scores, None if mask is None else mask.movedim(dim, -1))
    x, shift, any_allowed = _shifted_entmax_input(scores, allowed, alpha)
    tau = _threshold(x, alpha) + shift.squeeze(-1)
    return tau.masked_fill(~any_allowed.squeeze(-1), math.nan)


def support_size(weights: Tensor, dim: int = -1) -> Tensor:
    """Number of keys with non-zero weight per query: the kernel's effective neighbourhood."""
    return (weights > 0).sum(dim)


@dataclass(frozen=True)
class KernelDiagnostics:
    """What a kernel did per query: how many keys it used, and its bandwidth where it has one."""

    support_size: Tensor
    bandwidth: Tensor | None  # h in ‖k − q‖ units; None for the top-k kernels, NaN for empty rows


def kernel_diagnostics(
    scores: Tensor,
    kernel: str,
    *,
    mask: Tensor | None = None,
    dim: int = -1,
    temperature: float | Tensor = 1.0,
    **params: Any,
) -> KernelDiagnostics:
    """Support size and kernel bandwidth per query, for scores s = k·q / temperature on unit vectors.

    Bandwidths (Proposition 1 and its corollaries): softmax is Gaussian with h = sqrt(T);
    α-entmax is compact with the adaptive h = sqrt(2 − 2 r T τ), r = 1/(α−1); normrelu has the
    fixed h = sqrt(2 + 2 T γ b); relumax is anchored at the best key, h = sqrt(2 (1 − T (max s − b))).
    """
    name, p = resolve_kernel(kernel, **params)
    weights = attention_weights(scores, name, mask=mask, dim=dim, **p)
    support = support_size(weights, dim)
    s = (
        scores.movedim(dim, -1).float()
        if scores.dtype in (torch.float16, torch.bfloat16)
        else scores.movedim(dim, -1)
    )
    allowed = _allowed(s, None if mask is None else mask.movedim(dim, -1))
    empty = ~allowed.any(-1)
    temperature = torch.as_tensor(temperature, dtype=s.dtype, device=s.device).squeeze(-1)
    bandwidth_squared = KERNELS[name].bandwidth_squared
    if bandwidth_squared is None:
        return KernelDiagnostics(support, None)
    h_squared = bandwidth_squared(s, allowed, temperature, p).expand(s.shape[:-1])
    bandwidth = h_squared.clamp(min=0).sqrt().masked_fill(empty, math.nan)
    return KernelDiagnostics(support, bandwidth)


# --------------------------------------------------------------------------------------------
# internals: every function below works on the last dimension


def _allowed(scores: Tensor, mask: Tensor | None) -> Tensor:
    allowed = scores != -math.inf
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a boolean tensor (True = may attend); got {mask.dtype}")
        allowed = allowed & mask
    return allowed


def _softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    any_allowed = allowed.any(-1, keepdim=True)
    masked = scores.masked_fill(~allowed, -math.inf).masked_fill(~any_allowed, 0.0)
    return torch.softmax(masked, dim=-1) * allowed


def _shifted_entmax_input(
    scores: Tensor, allowed: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(α−1)·scores shifted so the row max is 0, with masked keys pushed out of the support.

    τ ≥ max − 1 always, so a key at max − 2 can never be in the support: masked keys sit there,
    which keeps every later computation finite (no −inf arithmetic). Rows with no allowed key are
    computed as all-zero scores (a harmless uniform row) and multiplied by 0 afterwards.
    """
    x = (alpha - 1) * scores
    any_allowed = allowed.any(-1, keepdim=True)
    shift = x.masked_fill(~allowed, -math.inf).amax(-1, keepdim=True)
    shift = shift.masked_fill(~any_allowed, 0.0).detach()
    # empty rows: benign, zeroed later
    x = (x - shift).masked_fill(~allowed, -2.0).masked_fill(~any_allowed, 0.0)
    return x, shift, any_allowed


def _threshold(x: Tensor, alpha: float) -> Tensor:
    """τ for inputs x = (α−1)·s along the last dim: exact by sorting for α ∈ {2, 1.5}, else bisection."""
    if alpha == 2.0:
        return _sparsemax_threshold(x)
    if alpha == 1.5:
        return _entmax15_threshold(x)
    return _bisect_threshold(x, alpha)


def _sparsemax_threshold(x: Tensor) -> Tensor:
    z, _ = torch.sort(x, dim=-1, descending=True)
    rho = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    cumsum = z.cumsum(-1)
    support = (1 + rho * z > cumsum).sum(-1, keepdim=True)
    return ((cumsum.gather(-1, support - 1) - 1) / support.to(x.dtype)).squeeze(-1)


def _entmax15_threshold(x: Tensor) -> Tensor:
    """Exact 1.5-entmax threshold (Peters et al., 2019, Algorithm 2) for p = [x − τ]_+²."""
    z, _ = torch.sort(x, dim=-1, descending=True)
    rho = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = z.cumsum(-1) / rho
    mean_sq = (z * z).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean * mean)) / rho
    tau = mean - torch.sqrt(delta.clamp(min=0))
    support = (tau <= z).sum(-1, keepdim=True)
    return tau.gather(-1, support - 1).squeeze(-1)


def _bisect_threshold(x: Tensor, alpha: float) -> Tensor:
    """τ with Σ [x − τ]_+^{1/(α−1)} = 1 by bisection; x has row max 0."""
    power = 1 / (alpha - 1)
    n = x.shape[-1]
    lo = torch.full(x.shape[:-1], -1.0, dtype=x.dtype, device=x.device)  # sum ≥ 1 here
    hi = torch.full_like(lo, -((1 / n) ** (alpha - 1)))  # sum ≤ 1 here
    for _ in range(_BISECT_ITERS):
        mid = (lo + hi) / 2
        total = (x - mid.unsqueeze(-1)).clamp(min=0).pow(power).sum(-1)
        too_low = total >= 1
        lo = torch.where(too_low, mid, lo)
        hi = torch.where(too_low, hi, mid)
    return (lo + hi) / 2


class _Entmax(torch.autograd.Function):
    """p = [x − τ]_+^{1/(α−1)} on the last dim, x = (α−1)·s, with the closed-form backward.

    With respect to the scores s the Jacobian is diag(g) − g gᵀ / Σg, g = p^{2−α} on the
    support (Peters et al., 2019); with respect to x it carries an extra 1/(α−1).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        tau = _threshold(x, alpha).unsqueeze(-1)
        p = (x - tau).clamp(min=0).pow(1 / (alpha - 1))
        if alpha not in (2.0, 1.5):  # bisection leaves a residual of float resolution
            p = p / p.sum(-1, keepdim=True)
        ctx.save_for_backward(p)
        ctx.alpha = alpha
        return p

    @staticmethod
    def backward(ctx: Any, grad_p: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        g = (
            (p > 0).to(p.dtype)
            if ctx.alpha == 2.0
            else torch.where(p > 0, p.pow(2 - ctx.alpha), 0.0)
        )
        gy = g * grad_p
        grad_s = gy - g * gy.sum(-1, keepdim=True) / g.sum(-1, keepdim=True)
        return grad_s / (ctx.alpha - 1), None


def _entmax(scores: Tensor, allowed: Tensor, alpha: float) -> Tensor:
    x, _, any_allowed = _shifted_entmax_input(scores, allowed, alpha)
    # d x / d scores = α − 1: the chain rule is applied by autograd through `x` above
    return _Entmax.apply(x, float(alpha)) * allowed * any_allowed


def _sparsemax(scores: Tensor, allowed: Tensor) -> Tensor:
    return _entmax(scores, allowed, alpha=2.0)


def _normrelu(scores: Tensor, allowed: Tensor, gamma: float, b: float) -> Tensor:
    """[s/γ + b]_+ normalised; uniform over the allowed keys when every term is 0."""
    relu = torch.relu(scores.masked_fill(~allowed, 0.0) / gamma + b) * allowed
    total = relu.sum(-1, keepdim=True)
    uniform = allowed / allowed.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, relu / total.clamp(min=torch.finfo(scores.dtype).tiny), uniform)


def _relumax(scores: Tensor, allowed: Tensor, b: float) -> Tensor:
    """[b + s − max s]_+ normalised: Epanechnikov anchored at the best key, never empty."""
    s = scores.masked_fill(~allowed, -math.inf)
    top = s.amax(-1, keepdim=True).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    relu = torch.relu(b + scores.masked_fill(~allowed, 0.0) - top) * allowed
    return relu / relu.sum(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)


def _topk_selection(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest allowed scores; ties at the k-th score go to the earliest keys.

    torch.topk finds the k-th value in O(N) but breaks ties arbitrarily; the tie-break is ours.
    """
    s = scores.detach().masked_fill(~allowed, -math.inf)
    if k >= s.shape[-1]:
        return allowed
    kth = torch.topk(s, k, dim=-1).values[..., -1:]
    above = s > kth
    tied = s == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied keys still fit
    chosen = above | (tied & (tied.cumsum(-1) <= room))
    return chosen & allowed


def _topk_softmax(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    return _softmax(scores, _topk_selection(scores, allowed, k))


def _topk_uniform(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    chosen = _topk_selection(scores, allowed, k).to(scores.dtype)
    return chosen / chosen.sum(-1, keepdim=True).clamp(min=1)


def _entmax_bandwidth(s: Tensor, allowed: Tensor, temperature: Tensor, p: dict[str, Any]) -> Tensor:
    alpha = p.get("alpha", 2.0)
    return 2 - 2 * temperature * entmax_threshold(s, alpha, mask=allowed) / (alpha - 1)


def _relumax_bandwidth(
    s: Tensor, allowed: Tensor, temperature: Tensor, p: dict[str, Any]
) -> Tensor:
    return 2 * (1 - temperature * (s.masked_fill(~allowed, -math.inf).amax(-1) - p["b"]))


def _normrelu_bandwidth(
    s: Tensor, allowed: Tensor, temperature: Tensor, p: dict[str, Any]
) -> Tensor:
    b = torch.as_tensor(p["b"], dtype=s.dtype, device=s.device).squeeze(-1)
    return 2 + 2 * temperature * p["gamma"] * b


def _entmax_label(p: dict[str, Any]) -> str:
    for label, alpha in (
        ("Biweight", 1.5),
        ("Triweight", 4 / 3),
        ("Epanechnikov (sparsemax)", 2.0),
    ):
        if math.isclose(p["alpha"], alpha):
            return label
    return f"{p['alpha']:g}-entmax"


def _positive(x: Any) -> bool:
    return not isinstance(x, Tensor) and x > 0


def _count(x: Any) -> bool:
    return not isinstance(x, bool) and int(x) == x and x >= 1


_K_CHECK = (("k", _count, "an integer >= 1"),)

KERNELS: dict[str, Kernel] = {
    spec.name: spec
    for spec in (
        Kernel(
            "softmax",
            _softmax,
            lambda p: "Gaussian",
            aliases={"gaussian": {}},
            bandwidth_squared=lambda s, allowed, temperature, p: temperature,
        ),
        Kernel(
            "sparsemax",
            _sparsemax,
            lambda p: "Epanechnikov (sparsemax)",
            aliases={"epanechnikov": {}},
            bandwidth_squared=_entmax_bandwidth,
            fused=lambda p: FusedCall("entmax", alpha=2.0),
        ),
        Kernel(
            "entmax",
            _entmax,
            _entmax_label,
            defaults={"alpha": 1.5},
            aliases={"biweight": {"alpha": 1.5}, "triweight": {"alpha": 4 / 3}},
            checks=(
                (
                    "alpha",
                    lambda a: 1 < a <= MAX_ENTMAX_ALPHA,
                    f"> 1 and ≤ {MAX_ENTMAX_ALPHA:g} (α → 1 is softmax; above it training in "
                    "float32 turns NaN within a few steps, the sooner the longer the sequences)",
                ),
            ),
            bandwidth_squared=_entmax_bandwidth,
            fused=lambda p: FusedCall("entmax", alpha=p["alpha"]) if p["alpha"] <= 2 else None,
        ),
        Kernel(
            "normrelu",
            _normrelu,
            lambda p: "Epanechnikov (normReLU)",
            defaults={"gamma": 1.0, "b": 0.0},
            checks=(("gamma", _positive, "> 0"),),
            bandwidth_squared=_normrelu_bandwidth,
            fused=lambda p: FusedCall("relu", a=1 / p["gamma"], b=p["b"], fallback=True),
        ),
        Kernel(
            "relumax",
            _relumax,
            lambda p: "Epanechnikov (ReLUmax)" + ("" if p["b"] == 1.0 else f", b = {p['b']:g}"),
            defaults={"b": 1.0},
            checks=(("b", _positive, "> 0"),),
            bandwidth_squared=_relumax_bandwidth,
            fused=lambda p: FusedCall("relu", b=p["b"], anchored=True),
        ),
        Kernel(
            "topk_softmax",
            _topk_softmax,
            lambda p: f"Gaussian kNN, k = {p['k']}",
            defaults={"k": 32},
            aliases={"gaussian_knn": {}},
            checks=_K_CHECK,
            fused=lambda p: FusedCall("topk_softmax", top_k=p["k"]),
        ),
        Kernel(
            "topk_uniform",
            _topk_uniform,
            lambda p: f"Uniform kNN, k = {p['k']}",
            defaults={"k": 32},
            aliases={"uniform_knn": {}},
            checks=_K_CHECK,
            fused=lambda p: FusedCall("topk_uniform", top_k=p["k"]),
        ),
    )
}
"""Every kernel, each one entry: adding a kernel is adding a `Kernel` here."""

KERNEL_DEFAULTS: dict[str, dict[str, float]] = {
    name: spec.defaults for name, spec in KERNELS.items()
}
KERNEL_ALIASES: dict[str, tuple[str, dict[str, float]]] = {
    alias: (name, fixed) for name, spec in KERNELS.items() for alias, fixed in spec.aliases.items()
}
KERNEL_NAMES: list[str] = [*KERNELS, *KERNEL_ALIASES]

"""Every kernel's name, aliases, parameters with their checks, paper label and fused call: what
configs, sweep files, tables and run names need of a kernel, without torch.

`mosaic_core.kernels` holds the mathematics (the references and the bandwidths) for each name
here; a refusal of a bad sweep file therefore answers without importing torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


# the largest α-entmax trained stably: a 1-layer model trained in float32 stayed finite up to α = 32
# on 8-token sequences and 16 on 128 (NaN at step 2 from 40 and 24), and at α = 4 on 512: the
# longer the sequences, the lower the limit
MAX_ENTMAX_ALPHA = 4.0


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
class KernelSpec:
    """One kernel as configs name it: parameters, checks, label, fast path.

    `checks` are (parameter, predicate, what is allowed); `fused(params)` gives the fused kernels'
    call, or None where the fast path is SDPA (softmax) or query chunks.
    """

    name: str
    label: Callable[[dict[str, Any]], str]
    defaults: dict[str, float] = field(default_factory=dict)
    aliases: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: tuple[tuple[str, Callable[[Any], bool], str], ...] = ()
    fused: Callable[[dict[str, Any]], FusedCall | None] | None = None


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
    if name not in KERNEL_SPECS:
        raise ValueError(f"unknown kernel {name!r}; allowed: {', '.join(KERNEL_NAMES)}")
    spec = KERNEL_SPECS[name]
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
    return KERNEL_SPECS[name].label(p)


def fused_call(name: str, **params: Any) -> FusedCall | None:
    """The fused kernels' call for a kernel variant; None where its fast path is not fused."""
    name, p = resolve_kernel(name, **params)
    fused = KERNEL_SPECS[name].fused
    return None if fused is None else fused(p)


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
    # a number (a tensor is not one: these parameters are fixed, not learned)
    return isinstance(x, numbers.Real) and x > 0


def _count(x: Any) -> bool:
    return not isinstance(x, bool) and int(x) == x and x >= 1


_K_CHECK = (("k", _count, "an integer >= 1"),)

KERNEL_SPECS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec("softmax", lambda p: "Gaussian", aliases={"gaussian": {}}),
        KernelSpec(
            "sparsemax",
            lambda p: "Epanechnikov (sparsemax)",
            aliases={"epanechnikov": {}},
            fused=lambda p: FusedCall("entmax", alpha=2.0),
        ),
        KernelSpec(
            "entmax",
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
            fused=lambda p: FusedCall("entmax", alpha=p["alpha"]) if p["alpha"] <= 2 else None,
        ),
        KernelSpec(
            "normrelu",
            lambda p: "Epanechnikov (normReLU)",
            defaults={"gamma": 1.0, "b": 0.0},
            checks=(("gamma", _positive, "> 0"),),
            fused=lambda p: FusedCall("relu", a=1 / p["gamma"], b=p["b"], fallback=True),
        ),
        KernelSpec(
            "relumax",
            lambda p: "Epanechnikov (ReLUmax)" + ("" if p["b"] == 1.0 else f", b = {p['b']:g}"),
            defaults={"b": 1.0},
            checks=(("b", _positive, "> 0"),),
            fused=lambda p: FusedCall("relu", b=p["b"], anchored=True),
        ),
        KernelSpec(
            "topk_softmax",
            lambda p: f"Gaussian kNN, k = {p['k']}",
            defaults={"k": 32},
            aliases={"gaussian_knn": {}},
            checks=_K_CHECK,
            fused=lambda p: FusedCall("topk_softmax", top_k=p["k"]),
        ),
        KernelSpec(
            "topk_uniform",
            lambda p: f"Uniform kNN, k = {p['k']}",
            defaults={"k": 32},
            aliases={"uniform_knn": {}},
            checks=_K_CHECK,
            fused=lambda p: FusedCall("topk_uniform", top_k=p["k"]),
        ),
    )
}
"""Every kernel, each one entry here and its mathematics in `mosaic_core.kernels.KERNELS`."""

KERNEL_DEFAULTS: dict[str, dict[str, float]] = {
    name: spec.defaults for name, spec in KERNEL_SPECS.items()
}
KERNEL_ALIASES: dict[str, tuple[str, dict[str, float]]] = {
    alias: (name, fixed)
    for name, spec in KERNEL_SPECS.items()
    for alias, fixed in spec.aliases.items()
}
KERNEL_NAMES: list[str] = [*KERNEL_SPECS, *KERNEL_ALIASES]

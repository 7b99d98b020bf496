"""Sweep files: validation and expansion into one trial config per grid point.

Kernel parameters are conditional: α belongs to entmax, k to the top-k kernels, b to relumax, so
each entry of `kernels:` expands over its own parameters only. `grid:` is a Cartesian product over
any other config key, written as a dotted path (`model.n_layer: [1, 2]`, `seed: [0, 1, 2]`).
`cases:` are settings that go together (task MQMTAR at depth 4 with its lengths, sort at depth
2 with its own): trials = cases × kernel variants × grid points.
Everything is checked before anything starts; errors are one line naming the key and what is allowed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mosaic_core.config import TrialConfig, describe_validation_error, flatten
from mosaic_core.kernels import KERNEL_DEFAULTS, KERNEL_NAMES, kernel_label, resolve_kernel

KERNEL_KEYS = ("model.kernel", "model.kernel_params")  # set by `kernels:`, never by `grid:`


class SweepError(ValueError):
    """A sweep file that cannot run; the message is one line meant for the user."""


class Resources(BaseModel):
    """Logical Ray resources per trial: `gpu: 0.25` packs four trials on one GPU."""

    model_config = ConfigDict(extra="forbid")
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    kernels: list[str | dict[str, Any]] = Field(min_length=1)
    cases: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(1, ge=0, description="retries of a failing trial, each from its last checkpoint")


@dataclass(frozen=True)
class Trial:
    """One expanded grid point: its validated config and the keys that tell it from its siblings."""

    config: TrialConfig
    varying: dict[str, Any]

    @property
    def kernel_label(self) -> str:
        return kernel_label(self.config.model.kernel, **self.config.model.kernel_params)

    def describe(self) -> str:
        """A short unique name: `entmax(alpha=1.5) seed=0`."""
        return _name(self.varying)


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    resources: Resources
    trials: list[Trial]
    kernel_labels: list[str] = field(default_factory=list)  # table row order: as written in the file
    planned_seeds: int = 1
    max_failures: int = 1


def load_sweep(path: str | Path) -> Sweep:
    """Read, validate and expand a sweep file; any problem raises SweepError with one line."""
    path = Path(path)
    source = path.name
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"{source}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: a sweep file is a mapping with keys {', '.join(SweepFile.model_fields)}")
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as error:
        raise SweepError(describe_validation_error(error, SweepFile, source)) from None
    return expand(spec, source)


def expand(spec: SweepFile, source: str) -> Sweep:
    """Every (kernel variant × grid point) as a validated trial."""
    try:
        base = TrialConfig.model_validate(spec.base)
    except ValidationError as error:
        raise SweepError(describe_validation_error(error, TrialConfig, source, prefix="base.")) from None
    variants = [v for i, entry in enumerate(spec.kernels) for v in _kernel_variants(entry, f"{source}: kernels[{i}]")]
    # 'biweight' and {name: entmax, alpha: 1.5} are one variant: keep each once, in the order written
    kernels = list({(name, tuple(sorted(params.items()))): (name, params) for name, params in variants}.values())
    _check_grid(spec.grid, base, source)

    for case in spec.cases:
        if set(case) & set(KERNEL_KEYS):
            raise SweepError(f"{source}: cases cannot set {', '.join(KERNEL_KEYS)}; list kernel variants in 'kernels:'")
    grid_points = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]
    trials = []
    for case, (kernel, params), point in itertools.product(spec.cases, kernels, grid_points):
        tree = _with_overrides(spec.base, {**case, "model.kernel": kernel, "model.kernel_params": params, **point})
        shown_kernel = f"{kernel}({', '.join(_show(p, v) for p, v in params.items())})" if params else kernel
        shown_case = {key: value for key, value in case.items() if not isinstance(value, (list, dict))}
        varying = {**shown_case, "kernel": shown_kernel, **point}
        try:
            config = TrialConfig.model_validate(tree)
        except ValidationError as error:
            where = f"{source}: trial '{_name(varying)}'"
            raise SweepError(describe_validation_error(error, TrialConfig, where)) from None
        trials.append(Trial(config, varying))
    names = [trial.describe() for trial in trials]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise SweepError(f"{source}: two grid points make the same trial '{twice}'; list each value once")
    labels = list(dict.fromkeys(trial.kernel_label for trial in trials))
    seeds = len(spec.grid.get("seed", [None]))
    return Sweep(spec.name, spec.description, spec.resources, trials, labels, seeds, spec.max_failures)


def _name(varying: dict[str, Any]) -> str:
    return " ".join(_show(key, value) for key, value in varying.items())


def _show(key: str, value: Any) -> str:
    if key == "kernel":
        return str(value)
    if isinstance(value, float):  # short when exact, full precision otherwise: names must stay unique
        value = f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return f"{key}={value}"


def _kernel_variants(entry: str | dict[str, Any], where: str) -> list[tuple[str, dict[str, float]]]:
    """`entmax` or {name: entmax, alpha: [1.5, 1.33]} -> [(canonical name, full params), …]."""
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = dict(entry)
    name = entry.pop("name", None)
    if not isinstance(name, str):
        raise SweepError(f"{where}: a kernel entry needs a 'name'; allowed: {', '.join(KERNEL_NAMES)}")
    choices = {param: value if isinstance(value, list) else [value] for param, value in entry.items()}
    variants = []
    for values in itertools.product(*choices.values()):
        try:
            variants.append(resolve_kernel(name, **dict(zip(choices, values))))
        except ValueError as error:
            raise SweepError(f"{where}: {error}") from None
    return variants


def _check_grid(grid: dict[str, list[Any]], base: TrialConfig, source: str) -> None:
    allowed = [key for key in flatten(base.model_dump()) if key not in KERNEL_KEYS]  # keys of the base's task
    for key, values in grid.items():
        if key in KERNEL_KEYS:
            raise SweepError(f"{source}: grid key '{key}' is set by 'kernels:'; list kernel variants there "
                             f"(kernels: {', '.join(KERNEL_DEFAULTS)})")
        if key not in allowed:
            raise SweepError(f"{source}: unknown grid key '{key}'; allowed: {', '.join(allowed)}")
        if not values:
            raise SweepError(f"{source}: grid key '{key}' has an empty list of values")
        if len({yaml.safe_dump(v) for v in values}) < len(values):
            raise SweepError(f"{source}: grid key '{key}' repeats a value: {values}")


def _with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with dotted-path overrides applied."""
    tree = yaml.safe_load(yaml.safe_dump(base))  # deep copy of plain YAML data
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree

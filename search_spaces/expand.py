"""Sweep files: validation and expansion into one trial config per grid point.

Kernel parameters are conditional: α belongs to entmax, k to the top-k kernels, b to relumax, so
each entry of `kernels:` expands over its own parameters only. `grid:` is a Cartesian product over
any other config key, written as a dotted path (`model.n_layer: [1, 2]`, `seed: [0, 1, 2]`).
`cases:` are settings that go together (task MQMTAR at depth 4 with its lengths, sort at depth
2 with its own): trials = cases × kernel variants × grid points. A case may also set
`resources.workers`, its trials' number of data-parallel workers.
`scheduler:` stops weak trials early (ASHA); `search:` replaces the grid's seeds by an Optuna
search over distributions of dotted keys, each suggestion trained with `seeds` seeds.
Everything is checked before anything starts; errors are one line naming the key and what is allowed.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mosaic_core.config import MAX_SEED, TrialConfig, describe_validation_error, flatten
from mosaic_core.kernel_specs import KERNEL_DEFAULTS, KERNEL_NAMES, kernel_label, resolve_kernel
from search_spaces.schema import (
    DISTRIBUTIONS,
    Scheduler,
    Search,
    Sweep,
    SweepFile,
    Trial,
    describe_varying,
    kernel_variant,
    show,
)
from search_spaces.yaml_io import SweepError, read_sweep_file

# set by `kernels:`, never by `grid:`, `cases:` or `base:`
KERNEL_KEYS = ("model.kernel", "model.kernel_params")
# the one resource a case may set: a trial's result does not depend on it
WORKERS_KEY = "resources.workers"
MAX_TRIALS = 10_000  # trials per sweep: a larger grid is a typo (the paper's largest sweep has 90)


def load_sweep(path: str | Path) -> Sweep:
    """Read, validate and expand a sweep file; any problem raises SweepError with one line."""
    path = Path(path)
    return validate_sweep(read_sweep_file(path), path.name)


def validate_sweep(raw: dict[str, Any], source: str) -> Sweep:
    """A sweep file's mapping (`read_sweep_file`), validated and expanded."""
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as error:
        raise SweepError(describe_validation_error(error, SweepFile, source)) from None
    return expand(spec, source)


def expand(spec: SweepFile, source: str) -> Sweep:
    """Every (case × kernel variant × grid point) as a validated trial."""
    _check_kernel_keys(spec.base, f"{source}: base")
    try:
        base = TrialConfig.model_validate(spec.base)
    except ValidationError as error:
        raise SweepError(
            describe_validation_error(error, TrialConfig, source, prefix="base.")
        ) from None
    entries = [
        _kernel_choices(entry, f"{source}: kernels[{i}]") for i, entry in enumerate(spec.kernels)
    ]
    _check_grid(spec.grid, base, source)
    cases = [flatten(case) for case in spec.cases]
    for i, case in enumerate(cases):
        _check_kernel_keys(case, f"{source}: cases[{i}]")
        _check_case_workers(case, source)
    _check_count(spec, [math.prod(map(len, choices.values())) for _, choices in entries], source)
    kernels = _kernel_variants(entries, source)
    grid_points = [
        dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())
    ]
    trials = [
        _trial(spec.base, case, kernel, point, source)
        for case, kernel, point in itertools.product(cases, kernels, grid_points)
    ]
    names = collections.Counter(trial.describe() for trial in trials)
    twice = next((name for name, count in names.items() if count > 1), None)
    if twice is not None:
        raise SweepError(
            f"{source}: two grid points make the same trial '{twice}'; list each value once"
        )
    labels = list(dict.fromkeys(trial.kernel_label for trial in trials))
    seeds = spec.search.seeds if spec.search else len(spec.grid.get("seed", [None]))
    if spec.search:
        _check_search(spec.search, spec.grid, trials, source)
    if spec.scheduler:
        _check_scheduler(spec.scheduler, spec.search, trials, source)
    return Sweep(
        spec.name,
        spec.description,
        spec.resources,
        trials,
        labels,
        seeds,
        spec.max_failures,
        spec.scheduler,
        spec.search,
    )


def _check_case_workers(case: dict[str, Any], source: str) -> None:
    """A case may give its trials their own worker count; every other resource is the sweep's."""
    others = [key for key in case if key.startswith("resources.") and key != WORKERS_KEY]
    if others:
        raise SweepError(
            f"{source}: cases can set {WORKERS_KEY} only; {', '.join(others)} is per worker, "
            "for the whole sweep, in 'resources:'"
        )
    workers = case.get(WORKERS_KEY, 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SweepError(
            f"{source}: case {WORKERS_KEY} must be a whole number ≥ 1; got {workers!r}"
        )


def _trial(
    base: dict[str, Any],
    full_case: dict[str, Any],
    kernel: tuple[str, dict[str, float]],
    point: dict[str, Any],
    source: str,
) -> Trial:
    """One grid point: the case merged into the base key by key, then the kernel variant and the grid values."""
    name, params = kernel
    case = {key: value for key, value in full_case.items() if key != WORKERS_KEY}
    tree = with_overrides(
        base, {**case, "model.kernel": name, "model.kernel_params": params, **point}
    )
    shown_kernel = kernel_variant(name, params)
    shown_case = {key: value for key, value in case.items() if not isinstance(value, (list, dict))}
    varying = {**shown_case, "kernel": shown_kernel, **point}
    try:
        config = TrialConfig.model_validate(tree)
        label = kernel_label(config.model.kernel, **config.model.kernel_params)
        return Trial(config, varying, label, full_case.get(WORKERS_KEY))
    except ValidationError as error:
        raise SweepError(
            describe_validation_error(
                error, TrialConfig, f"{source}: trial '{describe_varying(varying)}'"
            )
        ) from None


def _check_kernel_keys(section: dict[str, Any], where: str) -> None:
    """Kernel variants come from `kernels:` alone: a kernel set elsewhere would be overridden silently."""
    for key in flatten(section):
        if key in KERNEL_KEYS or key.startswith("model.kernel_params."):
            raise SweepError(
                f"{where}: cannot set '{key}'; list kernel variants in 'kernels:' "
                f"(kernels: {', '.join(KERNEL_DEFAULTS)})"
            )


def _check_count(spec: SweepFile, variants: list[int], source: str) -> None:
    """Refuse, before expanding it, a sweep too large to be meant."""
    counts = {
        "cases": len(spec.cases),
        "kernel variants": sum(variants),
        "grid points": math.prod(len(values) for values in spec.grid.values()),
    }
    total = math.prod(counts.values())
    if total > MAX_TRIALS:
        shown = " × ".join(f"{n} {what}" for what, n in counts.items())
        raise SweepError(
            f"{source}: the sweep expands to {total} trials ({shown}); at most {MAX_TRIALS} per sweep"
        )


def _kernel_choices(entry: str | dict[str, Any], where: str) -> tuple[str, dict[str, list[float]]]:
    """`entmax` or {name: entmax, alpha: [1.5, 1.33]} -> (name, {parameter: values}), the values checked to be numbers."""
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = dict(entry)
    name = entry.pop("name", None)
    if not isinstance(name, str):
        raise SweepError(
            f"{where}: a kernel entry needs a 'name'; allowed: {', '.join(KERNEL_NAMES)}"
        )
    choices = {
        param: value if isinstance(value, list) else [value] for param, value in entry.items()
    }
    for param, values in choices.items():
        if not values:
            raise SweepError(
                f"{where}.{param}: empty list of values; give a number or a list of numbers"
            )
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise SweepError(f"{where}.{param}: a number or a list of numbers; got {bad[0]!r}")
    return name, choices


def _kernel_variants(
    entries: list[tuple[str, dict[str, list[float]]]], source: str
) -> list[tuple[str, dict[str, float]]]:
    """[(canonical name, full params), …] in the order written; a variant written twice is refused like a
    repeated grid value ('biweight' and {name: entmax, alpha: 1.5} are one variant)."""
    variants: dict[tuple[str, tuple[tuple[str, float], ...]], int] = {}
    for i, (name, choices) in enumerate(entries):
        for values in itertools.product(*choices.values()):
            try:
                kernel, params = resolve_kernel(name, **dict(zip(choices, values)))
            except ValueError as error:
                raise SweepError(f"{source}: kernels[{i}]: {error}") from None
            key = (kernel, tuple(sorted(params.items())))
            if key in variants:
                shown = ", ".join(show(p, v) for p, v in params.items())
                raise SweepError(
                    f"{source}: kernels[{i}] repeats kernels[{variants[key]}]: both are {kernel}"
                    f"{f'({shown})' if shown else ''}; list each variant once"
                )
            variants[key] = i
    return [(kernel, dict(params)) for kernel, params in variants]


def _check_grid(grid: dict[str, list[Any]], base: TrialConfig, source: str) -> None:
    # keys of the base's task
    allowed = [key for key in flatten(base.model_dump()) if key not in KERNEL_KEYS]
    for key, values in grid.items():
        if key in KERNEL_KEYS:
            raise SweepError(
                f"{source}: grid key '{key}' is set by 'kernels:'; list kernel variants there "
                f"(kernels: {', '.join(KERNEL_DEFAULTS)})"
            )
        if key not in allowed:
            raise SweepError(f"{source}: unknown grid key '{key}'; allowed: {', '.join(allowed)}")
        if not values:
            raise SweepError(f"{source}: grid key '{key}' has an empty list of values")
        if len({yaml.safe_dump(v) for v in values}) < len(values):
            raise SweepError(f"{source}: grid key '{key}' repeats a value: {values}")


def _check_metric(metric: str, trials: list[Trial], where: str) -> None:
    reported = set.intersection(*(set(trial.config.metric_names()) for trial in trials))
    if metric not in reported:
        raise SweepError(
            f"{where}: metric '{metric}' is not reported by every trial; choose from {', '.join(sorted(reported))}"
        )


def _check_scheduler(
    scheduler: Scheduler, search: Search | None, trials: list[Trial], source: str
) -> None:
    if search is None and (scheduler.metric is None or scheduler.mode is None):
        raise SweepError(
            f"{source}: scheduler needs 'metric' and 'mode' (min or max) when there is no 'search:'"
        )
    if search is not None:
        for key in ("metric", "mode"):
            if getattr(scheduler, key) not in (None, getattr(search, key)):
                raise SweepError(
                    f"{source}: scheduler.{key} '{getattr(scheduler, key)}' differs from search.{key} "
                    f"'{getattr(search, key)}'; leave it out to use the search's"
                )
        if "train.max_steps" in search.space:
            raise SweepError(
                f"{source}: scheduler: ASHA needs one train.max_steps for all trials (its max_t); "
                "do not search train.max_steps with a scheduler"
            )
    if scheduler.metric is not None:
        _check_metric(scheduler.metric, trials, f"{source}: scheduler")
    shortest = min(trial.config.train.max_steps for trial in trials)
    if scheduler.grace_period >= shortest:
        raise SweepError(
            f"{source}: scheduler.grace_period ({scheduler.grace_period}) must be below "
            f"train.max_steps ({shortest}), or no trial is ever stopped early"
        )


def _check_search(
    search: Search, grid: dict[str, list[Any]], trials: list[Trial], source: str
) -> None:
    """Seeds come from `search.seeds`; every distribution is well formed, and every config it can
    produce at the ends of its ranges is valid for every variant."""
    where = f"{source}: search"
    if "seed" in grid:
        raise SweepError(
            f"{where}: seeds come from search.seeds in a search sweep; remove 'seed' from grid:"
        )
    if search.n_trials * search.seeds > MAX_TRIALS:
        raise SweepError(
            f"{where}: n_trials × seeds is {search.n_trials * search.seeds} trials; at most {MAX_TRIALS} per sweep"
        )
    last_seed = max(trial.config.seed for trial in trials) + search.seeds - 1
    if last_seed > MAX_SEED:
        raise SweepError(
            f"{where}.seeds: the last seed would be {last_seed}; seeds go up to {MAX_SEED}"
        )
    _check_metric(search.metric, trials, where)
    if search.storage is not None:
        _check_database_url(search.storage, f"{where}.storage")
    for key, distribution in search.space.items():
        at = f"{where}.space.{key}"
        if key in grid:
            raise SweepError(f"{at}: also in grid:; a key is either searched or gridded")
        if key in KERNEL_KEYS or key == "seed":
            raise SweepError(
                f"{at}: cannot be searched; list kernel variants in 'kernels:' and use search.seeds"
            )
        _check_corners(key, _corners(distribution, at), trials, where)


def _check_database_url(url: str, where: str) -> None:
    try:
        make_url(url)
    except ArgumentError:
        raise SweepError(
            f"{where}: '{url}' is not a database URL "
            "(sqlite:///path/optuna.db, postgresql://user@host/db, …)"
        ) from None


def _corners(distribution: dict[str, list[Any]], at: str) -> list[Any]:
    """The values a well-formed distribution can take at its ends (all of a choice's)."""
    if len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        raise SweepError(
            f"{at}: write one of {', '.join(f'{{{d}: [...]}}' for d in DISTRIBUTIONS)}"
        )
    ((kind, values),) = distribution.items()
    if kind == "choice":
        if not values:
            raise SweepError(f"{at}: choice needs at least one value")
        return values
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise SweepError(f"{at}: {kind} takes [low, high] numbers; got {values}")
    low, high = values
    if kind in ("int", "logint") and not all(float(v).is_integer() for v in values):
        raise SweepError(f"{at}: {kind} takes integer bounds; got {values}")
    if not low < high:
        raise SweepError(f"{at}: empty range [{low}, {high}]; low must be below high")
    if kind.startswith("log") and low <= 0:
        raise SweepError(f"{at}: {kind} needs a positive low bound; got {low}")
    return [low, high]


def _check_corners(key: str, corners: list[Any], trials: list[Trial], where: str) -> None:
    """Every variant takes the searched key, and stays valid at each end of its range."""
    at = f"{where}.space.{key}"
    for trial in trials:
        keys = flatten(trial.config.model_dump())
        if key not in keys:
            allowed = [k for k in keys if k not in KERNEL_KEYS and k != "seed"]
            raise SweepError(
                f"{where}.space: unknown key '{key}' for trial '{trial.describe()}'; "
                f"allowed: {', '.join(allowed)}"
            )
        for value in corners:
            try:
                TrialConfig.model_validate(with_overrides(trial.config.model_dump(), {key: value}))
            except ValidationError as error:
                raise SweepError(
                    describe_validation_error(error, TrialConfig, f"{at} = {value}")
                ) from None


def with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with dotted-path overrides applied."""
    tree = copy.deepcopy(base)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree

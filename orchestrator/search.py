"""What Ray Tune explores: the grid, or an Optuna search; the ASHA scheduler; and how a Tune
trial's config maps back to the full trial config.

A Tune trial's config is small and readable in Tune's tables: `variant` (an expanded grid point,
whose full config is in the sweep folder's trials.json), the searched dotted keys, and for searches
the seed index Ray's Repeater sets. `trial_config` rebuilds the full config from it, the same way
in the trainable and in the driver's callbacks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Repeater, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from analysis.configurations import key_value
from mosaic_core.config import TrialConfig, describe_validation_error
from search_spaces.schema import Search, Sweep, with_overrides

VARIANT = "variant"
_DOMAINS = {
    "uniform": lambda low, high: tune.uniform(low, high),
    "loguniform": lambda low, high: tune.loguniform(low, high),
    "int": lambda low, high: tune.randint(
        int(low), int(high) + 1
    ),  # Tune's upper bound is exclusive
    "logint": lambda low, high: tune.lograndint(int(low), int(high) + 1),
}


def param_space(sweep: Sweep, variants: list[str]) -> dict[str, Any]:
    """Tune's param_space: a grid over the variants, or the search's distributions."""
    if sweep.search is None:
        return {VARIANT: tune.grid_search(variants)}
    space: dict[str, Any] = {VARIANT: tune.choice(variants) if len(variants) > 1 else variants[0]}
    for key, distribution in sweep.search.space.items():
        ((kind, values),) = distribution.items()
        space[key] = tune.choice(values) if kind == "choice" else _DOMAINS[kind](*values)
    return space


def searched_values(tune_config: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys a search suggested for this trial ({} in a grid sweep)."""
    return {key: value for key, value in tune_config.items() if key not in (VARIANT, TRIAL_INDEX)}


def trial_config(tune_config: dict[str, Any], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The full trial config: the variant's, with the suggested values and the seed index applied."""
    config = with_overrides(configs[tune_config[VARIANT]], searched_values(tune_config))
    config["seed"] += tune_config.get(TRIAL_INDEX, 0)
    return config


def validated_trial_config(
    tune_config: dict[str, Any], configs: dict[str, dict[str, Any]]
) -> TrialConfig:
    """`trial_config`, validated: a search can suggest an invalid config inside its ranges (n_embd
    not divisible by n_head), which fails its trial alone with a one-line ValueError."""
    try:
        return TrialConfig.model_validate(trial_config(tune_config, configs))
    except ValidationError as error:
        raise ValueError(
            describe_validation_error(error, TrialConfig, "the suggested config")
        ) from None


def trial_name(tune_config: dict[str, Any]) -> str:
    """`entmax(α=1.5) seed=0` in a grid; `entmax(α=1.5) train.lr=0.0021 seed+1` in a search."""
    parts = [tune_config[VARIANT]]
    for key, value in searched_values(tune_config).items():
        parts.append(key_value(key, value))
    if TRIAL_INDEX in tune_config:
        parts.append(f"seed+{tune_config[TRIAL_INDEX]}")
    return " ".join(parts)


def scheduler(sweep: Sweep) -> TrialScheduler:
    """ASHA over training steps when the sweep file asks for it; otherwise every trial runs to the end."""
    if sweep.scheduler is None:
        return FIFOScheduler()
    metric, mode = sweep.metric
    return ASHAScheduler(
        time_attr="step",
        metric=metric,
        mode=mode,
        max_t=max(trial.config.train.max_steps for trial in sweep.trials),
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def optuna_storage_url(search: Search, sweep_dir: Path) -> str:
    """The study lives beside the results, so `--resume` continues it (or in the database the file names)."""
    return search.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"


def search_algorithm(sweep: Sweep, sweep_dir: Path) -> Searcher | None:
    """OptunaSearch with a persistent study (named after the sweep), each suggestion repeated per
    seed; the study sees the mean over the seeds of each suggestion's last value."""
    if sweep.search is None:
        return None
    import optuna

    optuna.logging.set_verbosity(logging.getLogger().getEffectiveLevel())  # quiet unless -v
    search = sweep.search
    sampler = (
        optuna.samplers.TPESampler(seed=search.sampler_seed)
        if search.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=search.sampler_seed)
    )
    storage = optuna.storages.RDBStorage(optuna_storage_url(search, sweep_dir))
    optuna_search = OptunaSearch(
        metric=search.metric,
        mode=search.mode,
        sampler=sampler,
        storage=storage,
        study_name=sweep.name,
    )
    return Repeater(
        optuna_search, repeat=search.seeds
    )  # Tune's searcher checkpoint keeps its seed groups

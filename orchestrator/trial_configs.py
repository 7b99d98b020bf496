"""How a Tune trial's config maps to a full trial config, and the names trials go by; no Ray here.

A Tune trial's config is small and readable in Tune's tables: `variant` (an expanded grid point,
whose full config is in the sweep folder's trials.json), the searched dotted keys, and for searches
the seed index Ray's Repeater sets. `trial_config` rebuilds the full config from it, the same way
in the trainable and in the driver's callbacks.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mosaic_core.config import TrialConfig, describe_validation_error
from mosaic_core.kernel_specs import kernel_label
from search_spaces.expand import with_overrides
from search_spaces.schema import readable_variant

VARIANT = "variant"
TRIAL_INDEX = "__trial_index__"  # ray.tune.search.repeater.TRIAL_INDEX: a search's seed index


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


def trial_name(tune_config: dict[str, Any], configs: dict[str, dict[str, Any]]) -> str:
    """The name a person reads, the kernel as the paper labels it: `Biweight seed=0` in a grid;
    `1.25-entmax lr=2.1e-3 seed=1` in a search (its suggested values short, then its seed)."""
    config = trial_config(tune_config, configs)
    kernel, params = config["model"]["kernel"], config["model"]["kernel_params"]
    parts = [readable_variant(tune_config[VARIANT], kernel, params, kernel_label(kernel, **params))]
    for key, value in searched_values(tune_config).items():
        parts.append(f"{key.rsplit('.', 1)[-1]}={_short(value)}")
    if TRIAL_INDEX in tune_config:
        parts.append(f"seed={config['seed']}")
    return " ".join(parts)


def _short(value: Any) -> str:
    """A suggested value in a name, to three significant digits: `5.19e-3`, `0.25`, `64`."""
    if not isinstance(value, float) or value.is_integer():
        return str(value)
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"

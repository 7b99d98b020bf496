"""Sweep-file keys changed on the command line, as Hydra users type them: `train.lr=1e-3`,
`grid.seed=[0,1,2]`, `kernels=[softmax,sparsemax]`. The changed mapping is then validated exactly
as the file is; only the KEY=VALUE form and where a key lands are checked here."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import yaml

from search_spaces.schema import SweepFile
from search_spaces.yaml_io import SweepError, check_finite

EXAMPLES = "train.lr=1e-3, grid.seed=[0,1,2], kernels=[softmax,sparsemax]"
# YAML 1.1 (PyYAML) reads 1e-3 as text; a user means the number
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The sweep file's mapping with each KEY=VALUE set, in order; SweepError (one line) for one
    that is not KEY=VALUE or whose KEY runs through a value that is not a mapping."""
    changed = copy.deepcopy(raw)
    for override in overrides:
        path, value = _parsed(override)
        _set(changed, _where(changed, path), value, override)
    return changed


def _parsed(override: str) -> tuple[list[str], Any]:
    """(dotted key's parts, value read as YAML) of one KEY=VALUE."""
    key, equals, text = override.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(part.strip() for part in parts):
        raise SweepError(f"{override}: an override is KEY=VALUE with a dotted key ({EXAMPLES})")
    try:
        value = _numbers(yaml.safe_load(text)) if text.strip() else ""
    except yaml.YAMLError as error:
        raise SweepError(
            f"{override}: the value is not YAML ({' '.join(str(error).split())[:120]})"
        ) from None
    parts = [part.strip() for part in parts]
    check_finite(value, "override", ".".join(parts))
    return parts, value


def _numbers(value: Any) -> Any:
    """`1e-3` as the number it means, also inside lists and mappings."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value):
        return float(value)
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    if isinstance(value, dict):
        return {name: _numbers(item) for name, item in value.items()}
    return value


def _where(raw: dict[str, Any], parts: list[str]) -> list[str]:
    """Where a key lands: a sweep-file key (`grid.model.n_layer` is grid's key `model.n_layer`);
    else a trial key, in the grid when the grid varies it, else under `base`."""
    if parts[0] == "grid" and len(parts) > 1:
        return ["grid", ".".join(parts[1:])]
    if parts[0] in SweepFile.model_fields:
        return parts
    grid = raw.get("grid")
    if isinstance(grid, dict) and ".".join(parts) in grid:
        return ["grid", ".".join(parts)]
    return ["base", *parts]


def _set(raw: dict[str, Any], path: list[str], value: Any, override: str) -> None:
    """Set `path` to `value`, making the mappings on the way; a grid key gets a list."""
    if path[0] == "grid" and len(path) == 2 and not isinstance(value, list):
        value = [value]
    node = raw
    for depth, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(path[: depth + 1])
            raise SweepError(f"{override}: {where} is not a mapping in the sweep file")
    node[path[-1]] = value

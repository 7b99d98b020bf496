"""The hardened YAML reader of sweep files and trial configs: UTF-8 only, a key written twice is an
error, aliases cannot expand without bound, and no number is infinite or NaN."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from search_spaces.schema import SweepFile

# values a YAML file may hold once its aliases are followed (an alias bomb stops here)
MAX_YAML_VALUES = 100_000


class SweepError(ValueError):
    """A sweep file that cannot run; the message is one line meant for the user."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML's own check names it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


# `1e-3` is a number in YAML 1.2 (and to a reader); YAML 1.1, PyYAML's, reads it as a string
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: Path) -> Any:
    """A YAML file's data; SweepError (one line) for text that is not UTF-8, not YAML, has a key twice,
    expands (its aliases followed) to more than MAX_YAML_VALUES values, or holds a non-finite number."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SweepError(
            f"{path.name}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None
    loader = _UniqueKeyLoader(text)
    loader.name = path.name  # what its errors say instead of "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise SweepError(
                f"{path.name}: holds more than {MAX_YAML_VALUES} values once its aliases are followed"
            )
        data = None if node is None else loader.construct_document(node)
        check_finite(data, path.name)
    except yaml.YAMLError as error:
        raise SweepError(
            f"{path.name}: not valid YAML: {' '.join(str(error).split())[:200]}"
        ) from None
    except RecursionError:
        raise SweepError(f"{path.name}: nested too deeply to be a sweep or trial config") from None
    finally:
        loader.dispose()
    return data


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for with every alias followed (a recursive alias counts as too many)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_YAML_VALUES + 1  # until known: a node that contains itself is refused
    children = (
        [n for pair in node.value for n in pair]
        if isinstance(node, yaml.MappingNode)
        else node.value
        if isinstance(node, yaml.SequenceNode)
        else []
    )
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def check_finite(data: Any, source: str, key: str = "") -> None:
    """No .inf or .nan anywhere: every number of a sweep is a setting, and none of them means infinity."""
    if isinstance(data, float) and not math.isfinite(data):
        raise SweepError(f"{source}: {key or '(top level)'}: {data} is not a finite number")
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list)
        else []
    )
    for name, value in items:
        check_finite(
            value,
            source,
            f"{key}[{name}]" if isinstance(data, list) else f"{key}.{name}".lstrip("."),
        )


def read_sweep_file(path: Path) -> dict[str, Any]:
    """A sweep file's mapping as `read_yaml` reads it, not yet validated; SweepError (one line)
    when the file is missing or holds no mapping."""
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SweepError(
            f"{path.name}: a sweep file is a mapping with keys {', '.join(SweepFile.model_fields)}"
        )
    return raw

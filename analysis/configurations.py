"""What tells trials' configurations apart, so that a table cell or a plotted point never averages two.

A trial's configuration is every key its sweep varies but the seed: the typed config columns
(`analysis.schema.TYPED_CONFIG`) and the keys of the `config` JSON column (in stores written
before it existed, of `searched`). A cell aggregates over seeds only. `row_keys` names the keys
that must split a table's rows for that to hold, given its columns, and `labelled` names each row
after them: `Gaussian · lr 1e-4`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.schema import RESULT_COLUMNS, SEED_KEY, TYPED_CONFIG
from mosaic_core.kernel_specs import KERNEL_ALIASES, kernel_label

KERNEL = "kernel"
KERNEL_LABEL = "kernel_label"
LENGTH = "length_factor"  # not a config key, but rows of one trial differ by it: it must never pool either
ROW = "row"  # the column holding a row's label
SEPARATOR = " · "
_VARIANT = (
    "variant"  # in `searched`: which kernel variant a search chose; the config keys say the same
)


def _hashable(value: Any) -> Any:
    """Lists (`task.eval_factors`) as tuples and mappings as JSON, so they can be grouped on."""
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _varied_values(config: str, searched: str) -> dict[str, Any]:
    values = {
        key: value
        for key, value in (json.loads(searched) if searched else {}).items()
        if key != _VARIANT
    }
    values.update(json.loads(config) if config else {})
    return {key: _hashable(value) for key, value in values.items() if key != SEED_KEY}


def config_frame(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The results with a column for each varied dotted key that has no typed column, and the
    keys that identify a configuration within a trial's rows: the typed ones, those, and the
    evaluation length."""
    results = results.assign(**{column: None for column in RESULT_COLUMNS if column not in results})
    texts = (
        results["config"].fillna("").astype(str) + "\0" + results["searched"].fillna("").astype(str)
    )
    codes, uniques = pd.factorize(texts)
    records = [_varied_values(*text.split("\0")) for text in uniques]
    extra = pd.DataFrame(records, columns=sorted({key for record in records for key in record}))
    extra = extra.iloc[codes].set_index(results.index)
    for (
        column,
        key,
    ) in TYPED_CONFIG.items():  # a typed column another writer left empty: the JSON's value
        if key in extra:
            results = results.assign(
                **{
                    column: results[column]
                    .astype(object)
                    .where(results[column].notna(), extra.pop(key))
                }
            )
    return pd.concat([results, extra], axis=1), [*TYPED_CONFIG, *extra.columns, LENGTH]


def row_keys(frame: pd.DataFrame, keys: Sequence[str], columns: Sequence[str]) -> list[str]:
    """The keys that take more than one value among rows sharing a kernel label and a column:
    each must name its own row, or a cell would average two configurations."""
    candidates = [key for key in keys if key not in columns]
    if frame.empty or not candidates:
        return []
    spread = frame.groupby([KERNEL_LABEL, *columns], dropna=False)[candidates].nunique(dropna=False)
    return [key for key in candidates if (spread[key] > 1).any()]


def display_names(keys: Iterable[str]) -> dict[str, str]:
    """`lr` for the typed columns, `dropout` for `model.dropout`; the whole dotted key where the
    last part alone would be ambiguous."""
    keys = list(keys)
    short = {key: key.rsplit(".", 1)[-1] for key in keys}
    return {
        key: name if list(short.values()).count(name) == 1 else key for key, name in short.items()
    }


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def key_value(key: str, value: Any) -> str:
    """`train.lr=0.0021`: a searched or varied value in a trial's name (floats to 4 significant digits)."""
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def show(value: Any) -> str:
    """A value as a label shows it: short (`1e-4`, `0.003`, `64`), and never equal for two values."""
    if isinstance(value, tuple):
        return "[" + ", ".join(map(show, value)) + "]"
    if _is_missing(value):
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value.is_integer() and abs(value) < 1e6:
            return f"{value:g}"
        if 1e-2 <= abs(value) < 1e5:
            text = f"{value:.4g}"
        else:
            mantissa, exponent = f"{value:.3e}".split("e")
            text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return text if float(text) == value else repr(value)
    return str(value)


def labelled(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The frame with a `row` column: the kernel label and, for each of `keys`, its name and value."""
    names = display_names(keys)
    columns = [frame[KERNEL_LABEL], *(frame[key] for key in keys)]
    labels = [
        SEPARATOR.join(
            [str(label), *(f"{names[key]} {show(value)}" for key, value in zip(keys, values))]
        )
        for label, *values in zip(*columns)
    ]
    return frame.assign(**{ROW: labels})


def sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float, np.integer, np.floating)) and not _is_missing(value):
        return (0, float(value), "")
    return (2, 0.0, "") if _is_missing(value) else (1, 0.0, str(value))


def ordered_rows(
    frame: pd.DataFrame, keys: Sequence[str], kernel_order: Sequence[str] | None
) -> pd.DataFrame:
    """One line per row label, in the sweep file's kernel order (the others after, as they
    first appear), then by the row keys' values: the label, the kernel label and those values."""
    rows = frame.drop_duplicates(ROW)[[ROW, KERNEL_LABEL, *keys]]
    seen = list(dict.fromkeys(rows[KERNEL_LABEL].dropna()))
    order = [label for label in kernel_order or [] if label in seen] + [
        label for label in seen if label not in (kernel_order or [])
    ]
    rank = {label: number for number, label in enumerate(order)}
    positions = sorted(
        range(len(rows)),
        key=lambda i: (
            rank.get(rows[KERNEL_LABEL].iloc[i], len(rank)),
            *(sort_key(rows[key].iloc[i]) for key in keys),
        ),
    )
    return rows.iloc[positions].set_index(ROW)


def resolve_key(
    name: str, frame: pd.DataFrame, keys: Sequence[str], what: str = "key", also: Sequence[str] = ()
) -> str:
    """The column a user's key names: itself, the typed column of a dotted key (`train.lr` is
    `lr`), or the one varied key that ends in it (`dropout`); ValueError naming the choices: `also`
    and the keys that vary in `frame`."""
    typed = {dotted: column for column, dotted in TYPED_CONFIG.items()}
    candidates = [*keys, KERNEL_LABEL, SEED_KEY]  # the seed: a per-seed view, or one seed
    if name in candidates:
        return name
    if name in typed:
        return typed[name]
    ending = [key for key in keys if key.rsplit(".", 1)[-1] == name]
    if len(ending) == 1:
        return ending[0]
    varying = [key for key in candidates if key in frame and frame[key].nunique(dropna=False) > 1]
    raise ValueError(
        f"unknown {what} {name!r}; choose from {', '.join([*also, *varying]) or 'none'}"
    )


def _matches(column: pd.Series, text: str) -> pd.Series:
    """Rows whose value is `text`: as a number (`1e-4` is 0.0001), as shown, or as written."""
    same = (column.map(show) == text) | (column.astype(str) == text)
    try:
        number = float(text)
    except ValueError:
        return same
    values = pd.to_numeric(column, errors="coerce").astype(float)
    return same | pd.Series(np.isclose(values, number, rtol=1e-9, atol=0.0), index=column.index)


def _kernel_matches(frame: pd.DataFrame, text: str) -> pd.Series:
    """Rows of the kernel `text` names, in any case: its registry name (`softmax`), an alias
    (`gaussian`, `biweight`: α = 1.5 only) or the paper's label (`Epanechnikov (sparsemax)`)."""
    name = text.lower()
    kernel, fixed = KERNEL_ALIASES.get(name, (name, {}))
    # an alias that fixes parameters (biweight: α = 1.5) is one variant: its label
    names = {name, kernel_label(kernel, **fixed).lower() if fixed else kernel}
    return frame[KERNEL].astype(str).str.lower().isin(names) | frame[KERNEL_LABEL].astype(
        str
    ).str.lower().isin(names)


def where(frame: pd.DataFrame, keys: Sequence[str], conditions: Sequence[str]) -> pd.DataFrame:
    """The rows that satisfy every `KEY=VALUE` condition; ValueError for a malformed one, an
    unknown key, or when no row is left."""
    for condition in conditions:
        name, equals, text = condition.partition("=")
        if not equals or not name.strip():
            raise ValueError(
                f"--where {condition!r}: write KEY=VALUE, e.g. lr=1e-4 or kernel=softmax"
            )
        column = resolve_key(name.strip(), frame, keys, "--where key")
        kept = frame[
            _kernel_matches(frame, text.strip())
            if column in (KERNEL, KERNEL_LABEL)
            else _matches(frame[column], text.strip())
        ]
        if kept.empty:
            raise ValueError(f"no results where {', '.join(conditions)}")
        frame = kept
    return frame


def planned_seed_count(
    frame: pd.DataFrame, keys: Sequence[str], from_sweep: int | None = None
) -> int | None:
    """Seeds each configuration should have: what the sweep planned, else (or where more) the most
    any configuration has in the results, failed trials included."""
    identity = [KERNEL_LABEL, *(key for key in keys if key != LENGTH)]
    in_results = (
        frame.groupby(identity, dropna=False)["seed"].nunique().max() if len(frame) else None
    )
    counts = [int(n) for n in (from_sweep, in_results) if n is not None and not _is_missing(n)]
    return max(counts) if counts else None


def describe_config(row: pd.Series) -> str:
    """A trial's kernel label and the other values its sweep varies (`Gaussian · lr 1e-4`), to
    name a single trial (the best so far) in a line."""
    values = json.loads(row["config"]) if isinstance(row.get("config"), str) else {}
    shown = {
        key: value
        for key, value in values.items()
        if not key.startswith("model.kernel") and key != "task.name"
    }
    names = display_names(shown)
    return SEPARATOR.join(
        [
            str(row[KERNEL_LABEL]),
            *(f"{names[key]} {show(_hashable(value))}" for key, value in shown.items()),
        ]
    )

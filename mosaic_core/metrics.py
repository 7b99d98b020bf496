"""Evaluation metrics and the naming that carries an evaluation length inside a flat metric name.

Ray Tune and MLflow take flat {name: value} metrics; `exact_match_2x` is exact match at twice the
training length. `parse_metric_name` is the inverse the results store uses.
"""

from __future__ import annotations

import re

from torch import Tensor

IGNORE_INDEX = (
    -100
)  # labels that carry no loss (source tokens, padding): torch's cross-entropy default
SELECTED_PREFIX = (
    "best_"  # `best_accuracy`: the value at the evaluation model selection picked so far
)

_LENGTH_METRIC = re.compile(r"^(?P<metric>.+)_(?P<factor>\d+(?:\.\d+)?)x$")


def length_metric_name(metric: str, factor: float) -> str:
    """`exact_match`, 1.5 -> `exact_match_1.5x`."""
    return f"{metric}_{factor:g}x"


def parse_metric_name(name: str) -> tuple[str, float | None]:
    """`exact_match_1.5x` -> ("exact_match", 1.5); `train_loss` -> ("train_loss", None)."""
    match = _LENGTH_METRIC.match(name)
    if match is None:
        return name, None
    return match["metric"], float(match["factor"])


def exact_match(logits: Tensor, labels: Tensor, scored: Tensor | None = None) -> Tensor:
    """Per example: True when the argmax is right at every `scored` position (default: every
    labelled one), under teacher forcing."""
    scored = labels != IGNORE_INDEX if scored is None else scored
    correct = (logits.argmax(-1) == labels) | ~scored
    return correct.all(-1)

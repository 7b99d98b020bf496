"""Every metric a trial reports, by name, with the direction in which it improves and each task
family's model selection; and the naming that carries an evaluation length inside a flat name.

Ray Tune and MLflow take flat {name: value} metrics; `exact_match_2x` is exact match at twice the
training length. `parse_metric_name` is the inverse the results store uses. The module imports no
torch (its tensors are only annotations), so tables, plots and the command line read it cheaply.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor

# labels that carry no loss (source tokens, padding): torch's cross-entropy default
IGNORE_INDEX = -100
# `best_accuracy`: the value at the evaluation model selection picked so far
SELECTED_PREFIX = "best_"

# what every trial reports as it trains
STEP = "step"
LR = "lr"
TRAIN_LOSS = "train_loss"
ELAPSED_S = "elapsed_s"
TOKENS_PER_S = "tokens_per_s"
SUPPORT_SIZE = "support_size"  # mean keys with non-zero weight, per evaluation length
# what a trial reports between evaluations, which come with a checkpoint: these do not
BETWEEN_EVALUATIONS = (STEP, LR, TRAIN_LOSS, ELAPSED_S, TOKENS_PER_S)
# what the tasks' evaluations report (length generalisation: per length, `exact_match_2x`)
EXACT_MATCH = "exact_match"
EXACT_MATCH_WITH_EOS = "exact_match_with_eos"
QUERY_ACCURACY = "query_accuracy"
ACCURACY = "accuracy"
TVD = "tvd"
VAL_ACCURACY = "val_accuracy"
VAL_TVD = "val_tvd"
VAL_LOSS = "val_loss"
OOD_LOSS = "ood_loss"
OOD_LOSS_EMA = "ood_loss_ema"  # smoothed; both also per position: `ood_loss_ema/pos64`

Mode = Literal["min", "max"]
MODES: dict[str, Mode] = {
    TRAIN_LOSS: "min",
    SUPPORT_SIZE: "max",
    EXACT_MATCH: "max",
    EXACT_MATCH_WITH_EOS: "max",
    QUERY_ACCURACY: "max",
    ACCURACY: "max",
    TVD: "min",
    VAL_ACCURACY: "max",
    VAL_TVD: "min",
    VAL_LOSS: "min",
    OOD_LOSS: "min",
    OOD_LOSS_EMA: "min",
}
"""The direction in which each evaluation metric improves: losses and total variation distances
downwards; accuracies and support sizes are reported as they are (the best is the largest)."""

MODEL_SELECTION: dict[str, str] = {"regbench": VAL_LOSS}
"""Task family -> the metric whose best evaluation is reported (RegBench: Table 5's caption, the
lowest val_loss); the other families report the trained model, their last evaluation."""

_LENGTH_METRIC = re.compile(r"^(?P<metric>.+)_(?P<factor>\d+(?:\.\d+)?)x$")
_HEAD_METRIC = re.compile(r"^(?P<metric>[^/]+)/l(?P<layer>\d+)h(?P<head>\d+)$")


def length_metric_name(metric: str, factor: float) -> str:
    """`exact_match`, 1.5 -> `exact_match_1.5x`."""
    return f"{metric}_{factor:g}x"


def parse_metric_name(name: str) -> tuple[str, float | None]:
    """`exact_match_1.5x` -> ("exact_match", 1.5); `train_loss` -> ("train_loss", None)."""
    match = _LENGTH_METRIC.match(name)
    if match is None:
        return name, None
    return match["metric"], float(match["factor"])


def head_metric_name(metric: str, layer: int, head: int) -> str:
    """`support_size`, 0, 3 -> `support_size/l0h3`: a diagnostic of one attention head."""
    return f"{metric}/l{layer}h{head}"


def parse_head_metric(name: str) -> tuple[str, int, int] | None:
    """`support_size/l0h3` -> ("support_size", 0, 3); None for a metric not of one head."""
    match = _HEAD_METRIC.match(name)
    if match is None:
        return None
    return match["metric"], int(match["layer"]), int(match["head"])


def exact_match(logits: Tensor, labels: Tensor, scored: Tensor | None = None) -> Tensor:
    """Per example: True when the argmax is right at every `scored` position (default: every
    labelled one), under teacher forcing."""
    scored = labels != IGNORE_INDEX if scored is None else scored
    correct = (logits.argmax(-1) == labels) | ~scored
    return correct.all(-1)


def mode(metric: str) -> Mode:
    """How `metric` improves, by its kind: `best_val_loss`, `ood_loss/pos64` and `exact_match_2x`
    as val_loss, ood_loss and exact_match do; a metric of no known kind (lr) counts upwards."""
    kind = parse_metric_name(metric.removeprefix(SELECTED_PREFIX).split("/")[0])[0]
    return MODES.get(kind, "max")


def lower_is_better(metric: str) -> bool:
    return mode(metric) == "min"

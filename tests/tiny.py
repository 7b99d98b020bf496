"""The smallest trial the end-to-end tests train: sort over 4 symbols, one 16-wide layer.

One definition, so a change of the task or model schema is made once for every such test.
"""

from __future__ import annotations

from typing import Any


def tiny_trial(*, eval_examples: int = 20, **train: Any) -> dict[str, Any]:
    """Lengths 2–4, evaluated at ×1 and ×2 of 4; `train` adds to or overrides a batch of 8 and the
    3e-3 → 3e-4 schedule with 5 warm-up steps."""
    return {
        "task": {
            "name": "sort",
            "num_symbols": 4,
            "train_min_length": 2,
            "train_max_length": 4,
            "eval_length": 4,
            "eval_factors": [1, 2],
            "eval_examples": eval_examples,
        },
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "train": {"batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, **train},
    }

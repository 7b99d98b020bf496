"""What the tests share: the bundled smoke sweep, the smallest trial they train, and the
`mosaic-sweep` command run in this process or as a user runs it, in a clean environment.

One definition each, so a change of the task or model schema, or of how the command is started,
is made once for every test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from orchestrator.cli import app

SMOKE_YAML = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def tiny_trial(*, eval_examples: int = 20, **train: Any) -> dict[str, Any]:
    """Sort over 4 symbols, one 16-wide layer: lengths 2–4, evaluated at ×1 and ×2 of 4; `train`
    adds to or overrides a batch of 8 and the 3e-3 → 3e-4 schedule with 5 warm-up steps."""
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


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without the user's MLflow store or Ray cluster (the command's
    defaults apply), a local Ray without a token, and `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "RAY_AUTH_MODE": "disabled", **extra}


def mosaic_sweep_command(*args: object) -> list[str]:
    """`mosaic-sweep ARGS` as a user runs it (this interpreter, this checkout)."""
    return [sys.executable, "-m", "orchestrator.cli", *map(str, args)]


def mosaic_sweep(
    *args: object, cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """`mosaic-sweep ARGS` in its own process, in `cwd`, in a clean environment with `env`."""
    return subprocess.run(
        mosaic_sweep_command(*args),
        cwd=cwd,
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke(*args: object) -> Result:
    """`mosaic-sweep ARGS` in this process (stdout and stderr apart)."""
    return CliRunner().invoke(app, [str(arg) for arg in args])

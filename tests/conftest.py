"""Shared set-up: Triton's interpreter on CPU-only machines, and sweep files written from dicts."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers import SMOKE_YAML

if not torch.cuda.is_available():
    # must precede the first import of triton (torch.compile's machinery imports it too): kernels,
    # and triton.language's own jitted helpers, are then interpreted on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def smoke_spec() -> dict[str, Any]:
    """The bundled smoke sweep as a fresh dict, to be edited into a (bad or tiny) variant."""
    return copy.deepcopy(yaml.safe_load(SMOKE_YAML.read_text()))


@pytest.fixture
def write_sweep(tmp_path: Path) -> Callable[..., Path]:
    """write_sweep(spec, name="sweep") -> path of `tmp_path/specs/<name>.yaml` holding `spec`.

    Files go to a subfolder so tests can check that nothing else appears in tmp_path.
    A str `spec` is written verbatim (for invalid YAML).
    """

    def write(spec: dict[str, Any] | str, name: str = "sweep") -> Path:
        folder = tmp_path / "specs"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.yaml"
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
        return path

    return write

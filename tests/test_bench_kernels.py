"""bench/kernels.py's CPU modes as a user runs them: `--support-tiles` (what block skipping could
skip) against a closed form, and its refusals: lengths its tiles do not divide, and --launch
configurations that are not the JSON objects the fused kernels' override takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import clean_environment

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_support_tiles_of_top_k_match_the_closed_form():
    """Strictly causal top-32 over N = 128 keeps min(i, 32) keys in row i: a mean of
    (Σ_{i≤32} i + 95·32) / 128 = 27.875, and every one of the three visible 64 × 64 tiles holds one."""
    done = bench(
        "--support-tiles", "--lengths", "128", "--batch", "1", "--heads", "1",
        "--kernels", "top-32 softmax",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["support"] == 27.875
    assert row["tiles_held"] == 1.0


def test_support_tiles_refuses_lengths_its_tiles_do_not_divide():
    done = bench("--support-tiles", "--lengths", "100")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("--support-tiles needs lengths that are multiples of its 64-key tiles")
    )
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("launch", "names"),
    [("{block: 64}", "Expecting property name"), ('{"warps": 8}', "got warps=8")],
)
def test_launch_configurations_outside_the_override_are_refused_before_any_work(launch, names):
    done = bench("--launch", "{}", launch, "--lengths", "64")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kernels.py: error: --launch ") and names in last
    assert done.stdout == ""

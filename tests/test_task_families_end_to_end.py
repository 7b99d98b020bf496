"""The RegBench and language-model families through the real commands: prepare, train, run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import mosaic_sweep

ROOT = Path(__file__).resolve().parents[1]
STORIES = [ROOT / "tests" / "data" / "stories.jsonl", ROOT / "tests" / "data" / "stories.txt"]


@pytest.mark.slow
def test_prepare_then_language_model_sweep_gives_loss_tables(tmp_path):
    prepared = mosaic_sweep(
        "prepare", *STORIES, "--out", "data/tiny_stories", "--val-fraction", "0.3", cwd=tmp_path
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "train 7 documents" in prepared.stdout
    again = mosaic_sweep("prepare", *STORIES, "--out", "data/tiny_stories", cwd=tmp_path)
    assert (
        again.returncode == 2 and again.stderr.startswith("error: ") and "overwrite" in again.stderr
    )

    spec = yaml.safe_load((ROOT / "search_spaces" / "babistories_smoke.yaml").read_text())
    spec["kernels"] = ["gaussian", "relumax"]
    spec["base"]["train"].update(max_steps=6, eval_interval=3)
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(spec))
    done = mosaic_sweep("run", "lm.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "val_loss ↓ n_layer=1" in done.stdout and "ood_loss ↓ n_layer=2" in done.stdout
    results = pd.read_parquet(tmp_path / "sweeps" / "babistories_smoke" / "results.parquet")
    assert results["trial_id"].nunique() == 4
    val = results[results["metric"] == "val_loss"]
    assert sorted(val["step"].unique()) == [3, 6] and val["value"].between(5, 12).all()
    assert {"ood_loss/pos1", "ood_loss_ema/pos16"} <= set(results["metric"])


def test_regbench_trial_through_the_train_command(tmp_path):
    config = {
        "seed": 0,
        "task": {
            "name": "regbench",
            "num_examples": 30,
            "num_val": 3,
            "num_test": 3,
            "eval_batch_size": 3,
        },
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "kernel": "sparsemax"},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 1,
            "eval_interval": 2,
        },
    }
    (tmp_path / "regbench.yaml").write_text(yaml.safe_dump(config))
    done = mosaic_sweep("train", "regbench.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = [
        json.loads(line)
        for line in (tmp_path / "runs" / "regbench" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [2, 4]
    for m in metrics:
        # tvd: Σ|p − q|, in %
        assert 0 <= m["accuracy"] <= 100 and 0 <= m["tvd"] <= 200 and m["val_loss"] > 0
        assert m["best_val_loss"] == min(e["val_loss"] for e in metrics if e["step"] <= m["step"])
        assert "support_size/l0h1" in m


def test_prepare_val_writes_the_given_file_as_the_validation_split(tmp_path):
    from mosaic_core.tasks.language_modeling import prepare_corpus

    jsonl, txt = STORIES
    done = mosaic_sweep("prepare", str(jsonl), "--val", str(txt), "--out", "data/x", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the oracle: the text file alone, all of it held out
    alone = prepare_corpus([txt], tmp_path / "alone", val_fraction=1.0)
    written = tmp_path / "data" / "x"
    assert (written / "val.bin").read_bytes() == (tmp_path / "alone" / "val.bin").read_bytes()
    meta = json.loads((written / "meta.json").read_text())
    assert meta["documents"]["val"] == alone["documents"]["val"] and meta["val_fraction"] is None
    assert f"val {alone['documents']['val']} documents" in done.stdout

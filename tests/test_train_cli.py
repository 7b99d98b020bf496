"""`mosaic-sweep train`: one trial without Ray, its run folder, resume, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from helpers import mosaic_sweep

CONFIG = {
    "seed": 3,
    "task": {
        "name": "reverse",
        "num_symbols": 4,
        "train_min_length": 2,
        "train_max_length": 3,
        "eval_length": 3,
        "eval_factors": [1, 2],
        "eval_examples": 20,
    },
    "model": {
        "n_layer": 1,
        "n_embd": 16,
        "n_head": 2,
        "kernel": "relumax",
        "kernel_params": {"b": 0.5},
    },
    "train": {
        "max_steps": 40,
        "batch_size": 8,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_interval": 10,
    },
}


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def lr_logged(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["lr"] for line in lines}


def test_train_writes_a_run_folder_and_resumes_it(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    done = mosaic_sweep("train", config, "--steps", "20", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "tiny"
    assert steps_logged(run) == [10, 20]
    assert "step 20: train_loss=" in done.stdout
    assert torch.load(run / "checkpoint" / "checkpoint.pt", weights_only=True)["step"] == 20
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 20

    again = mosaic_sweep("train", config, cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        "error: runs/tiny already holds a run; pass --resume to continue it, --overwrite to start again "
        "(the old folder is kept as a backup), or --out another folder"
    ]

    resumed = mosaic_sweep("train", config, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert steps_logged(run) == [10, 20, 30, 40]
    # planned for 20 steps, extended to 40: the run's own schedule, min_lr after its end
    assert (
        "the lr keeps the run's schedule: min_lr from step 20 on, to step 40 (--replan plans it anew)"
        in resumed.stdout
    )
    assert lr_logged(run)[30] == lr_logged(run)[40] == 3e-4


def test_train_replan_plans_the_lr_anew_and_says_so(tmp_path):
    from mosaic_core.config import TrainConfig
    from mosaic_core.train import learning_rate

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    alone = mosaic_sweep("train", config, "--replan", cwd=tmp_path)
    assert alone.returncode == 2 and alone.stderr.strip() == (
        "error: --replan plans a resumed run's lr schedule anew: it goes with --resume"
    )
    assert mosaic_sweep("train", config, "--steps", "20", cwd=tmp_path).returncode == 0
    replanned = mosaic_sweep("train", config, "--resume", "--replan", cwd=tmp_path)
    assert replanned.returncode == 0, replanned.stderr
    assert (
        "--replan: from step 20 the lr follows the schedule of a 40-step run, not the run's own "
        "(which reached min_lr at step 20)"
    ) in replanned.stdout
    schedule = TrainConfig.model_validate(CONFIG["train"])
    lr = lr_logged(tmp_path / "runs" / "tiny")
    assert lr[30] == learning_rate(29, schedule) > 3e-4


def test_train_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CONFIG, "model": {**CONFIG["model"], "n_heads": 2}}))
    done = mosaic_sweep("train", bad, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: bad.yaml: unknown key 'model.n_heads'; allowed: n_layer, n_embd, n_head, "
        "pmem_size, dropout, attn_dropout, contextual_attn_dropout, normrelu_bandwidth, "
        "attention_backend, reference_code, embd_dropout, prenorm, tie_weights, vocab_size, kernel, "
        "kernel_params"
    )
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(CONFIG))
    fresh = mosaic_sweep("train", good, "--resume", cwd=tmp_path)
    assert fresh.returncode == 2
    assert (
        "has no checkpoint to resume from" in fresh.stderr
        and len(fresh.stderr.strip().splitlines()) == 1
    )
    missing = mosaic_sweep("train", tmp_path / "nope.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "no such config file" in missing.stderr
    assert not (tmp_path / "runs").exists()

"""Data parallelism inside one trial, without Ray: the rows each worker takes, and two gloo
processes (wrapped in DDP as Ray Train's `prepare_model` would) following the one-process loss curve."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mosaic_core.config import TrialConfig
from mosaic_core.metrics import IGNORE_INDEX
from mosaic_core.sharding import Shard
from mosaic_core.tasks import build_task
from mosaic_core.train import TIMING_METRICS, train_trial

# reverse: examples of 2..5 symbols, so the shards of a batch score different numbers of tokens;
# normrelu leaves kernel_beta without a gradient, which DDP must be told to expect (top-k kernels are
# left out: a float-level difference in the weights can flip which keys are the top k)
CONFIG = {
    "seed": 5,
    "task": {
        "name": "reverse",
        "num_symbols": 4,
        "train_min_length": 2,
        "train_max_length": 5,
        "eval_length": 3,
        "eval_factors": [1],
        "eval_examples": 10,
    },
    "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "kernel": "normrelu"},
    "train": {
        "max_steps": 8,
        "batch_size": 5,
        "grad_accum_steps": 2,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_interval": 4,
        "device": "cpu",
    },
}


def test_workers_take_contiguous_blocks_and_a_worker_without_rows_weighs_nothing():
    inputs = torch.arange(10).view(5, 2)
    labels = inputs + 100
    blocks = [Shard(rank, 2).rows(inputs, labels) for rank in range(2)]
    assert [b[0][:, 0].tolist() for b in blocks] == [[0, 2, 4], [6, 8]]
    assert torch.equal(torch.cat([b[1] for b in blocks]), labels)
    assert Shard().rows(inputs, labels)[0] is inputs

    # a remainder batch of 2 rows, 4 workers
    lone = Shard(rank=3, world_size=4).rows(inputs[:2], labels[:2])
    assert lone[0].tolist() == [[0, 1]] and (lone[1] == IGNORE_INDEX).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    losses: list[float] = []
    reports: list[tuple[dict, bool]] = []

    def wrap(model):
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    train_trial(
        CONFIG,
        lambda metrics, directory: reports.append((metrics, directory is not None)),
        on_step=lambda step, loss: losses.append(loss),
        prepare_model=wrap,
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps({"losses": losses, "reports": reports}))
    # rank 1 ends first (rank 0 still evaluates); tearing gloo down alone aborted it now and then
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_follow_the_one_process_loss_curve(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    plain_losses, plain_reports = [], []
    train_trial(
        CONFIG,
        lambda metrics, directory: plain_reports.append(metrics),
        on_step=lambda step, loss: plain_losses.append(loss),
    )

    for rank in ranks:  # every worker sees the whole trial's loss, not its shard's
        assert rank["losses"] == pytest.approx(plain_losses, rel=1e-3)
    # evaluation and checkpoints once, on rank 0; rank 1 reaches each report with nothing to say
    assert [done for _, done in ranks[0]["reports"]] == [True, True]
    assert ranks[1]["reports"] == [[{}, False], [{}, False]]
    for (metrics, _), plain in zip(ranks[0]["reports"], plain_reports):
        assert metrics.keys() == plain.keys()
        assert {k: v for k, v in metrics.items() if k not in TIMING_METRICS} == pytest.approx(
            {k: v for k, v in plain.items() if k not in TIMING_METRICS}, rel=1e-3
        )


def test_the_first_batch_is_one_that_averaging_the_workers_means_would_get_wrong():
    """The oracle above can fail: on the trial's first micro-batch, the mean of the two shards'
    token means differs from the token mean over the whole batch by far more than 1e-3."""
    config = TrialConfig.model_validate(CONFIG)
    _, labels = build_task(config.task, config.seed).train_batch(0, config.train.batch_size)
    logits = torch.randn(*labels.shape, 36, generator=torch.Generator().manual_seed(0))

    def mean(rows: slice) -> torch.Tensor:
        return F.cross_entropy(
            logits[rows].flatten(0, 1), labels[rows].flatten(), ignore_index=IGNORE_INDEX
        )

    scored = [(labels[rows] != IGNORE_INDEX).sum().item() for rows in (slice(0, 3), slice(3, 5))]
    assert scored[0] / 3 != scored[1] / 2  # the shards score different numbers of tokens per row
    assert abs((mean(slice(0, 3)) + mean(slice(3, 5))) / 2 - mean(slice(0, 5))) > 1e-3

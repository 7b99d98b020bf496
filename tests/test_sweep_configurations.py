"""A real CPU sweep over two learning rates ends with a table whose rows are per learning rate."""

from __future__ import annotations

import json

import pytest

from helpers import mosaic_sweep


@pytest.mark.slow
def test_a_learning_rate_grid_gives_a_row_per_learning_rate(tmp_path, write_sweep, smoke_spec):
    from analysis.results_store import read_results

    spec = dict(
        smoke_spec,
        name="two_lrs",
        kernels=["softmax"],
        grid={"seed": [0], "train.lr": [1.0e-3, 1.0e-2]},
    )
    spec["base"]["task"]["eval_examples"] = 20
    spec["base"]["model"].update(n_layer=1, n_embd=16, n_head=2)
    spec["base"]["train"].update(max_steps=20, eval_interval=10, warmup_steps=5, batch_size=8)
    done = mosaic_sweep("run", write_sweep(spec, "two_lrs"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]

    sweep_dir = tmp_path / "sweeps" / "two_lrs"
    results = read_results(sweep_dir)
    assert set(results["lr"]) == {1e-3, 1e-2}
    assert {json.loads(text)["train.lr"] for text in results["config"]} == {1e-3, 1e-2}
    last = results[(results["metric"] == "exact_match") & (results["step"] == 20)]
    expected = {
        lr: [f"{v:.2f}" for v in rows.sort_values("length_factor")["value"]]
        for lr, rows in last.groupby("lr")
    }

    table = (sweep_dir / "table.md").read_text().splitlines()
    assert (
        table[0]
        == "**two_lrs: exact match at each trial's last evaluation, mean^(max) over seeds**"
    )
    rows = {
        line.split(" | ")[0].removeprefix("| "): line
        for line in table
        if line.startswith("| Gaussian")
    }
    assert list(rows) == ["Gaussian · lr 1e-3", "Gaussian · lr 0.01"]
    for label, lr in (("Gaussian · lr 1e-3", 1e-3), ("Gaussian · lr 0.01", 1e-2)):
        cells = [
            cell.replace("*", "").replace("<u>", "").replace("</u>", "")
            for cell in rows[label].strip("| ").split(" | ")[1:]
        ]
        # one seed: mean = max = its value
        assert [cell.split("^")[0] for cell in cells] == expected[lr]

    only = mosaic_sweep("table", sweep_dir, "--where", "lr=0.01", cwd=tmp_path, timeout=60)
    assert only.returncode == 0 and only.stdout.splitlines()[2].startswith("| Gaussian | ")

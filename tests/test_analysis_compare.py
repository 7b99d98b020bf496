"""`compare` says when it is not comparing like with like: the setup check against the paper's
hyperparameters, rows only for common cells, no ranking verdict from one kernel, and differences
judged against the seed noise of both sides (hand-made results, hand-computed intervals)."""

from __future__ import annotations

import json
import math

import pandas as pd

from analysis.comparison import (
    compare,
    comparison_table,
    reference_code_lines,
    report,
    setup_lines,
    summary,
)
from analysis.results_store import write_trial_rows

from helpers import invoke, tiny_trial

T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, 2) in closed form: 4.3027


def sort_results(seeds_by_cell: dict[tuple[str, float], list[float]]) -> pd.DataFrame:
    """Exact match of sort at the last step, one trial per (kernel label, length factor, seed)."""
    return pd.DataFrame(
        [
            {
                "trial_id": f"{label}|{factor}|{seed}",
                "task": "sort",
                "kernel_label": label,
                "seed": seed,
                "metric": "exact_match",
                "length_factor": factor,
                "step": 100,
                "value": value,
                "status": "TERMINATED",
            }
            for (label, factor), values in seeds_by_cell.items()
            for seed, value in enumerate(values)
        ]
    )


# Paper (Table 2, sort): 1× both 1.00^(1.00); 2× Gaussian 0.06^(0.17), Triweight 0.98^(0.99);
# 4× Gaussian 0.00^(0.00), Triweight 0.07^(0.11).
NOISY = {
    ("Gaussian", 1.0): [0.97, 1.00, 1.00],  # 0.99 ± 0.043: the paper's 1.00 is inside
    ("Triweight", 1.0): [1.00, 1.00, 1.00],
    ("Gaussian", 2.0): [0.50, 0.52, 0.54],  # 0.52 ± 0.050, far from 0.06 ± 0.11
    ("Triweight", 2.0): [0.10, 0.12, 0.14],  # 0.12 ± 0.050: below Gaussian, a real swap
    ("Gaussian", 4.0): [0.00, 0.06, 0.12],  # 0.06 ± 0.149: the paper's 0.00 is inside
    ("Triweight", 4.0): [0.02, 0.03, 0.04],  # 0.03, within the paper's 0.07 ± 0.04; swapped
}


def test_differences_and_swaps_count_only_beyond_both_sides_seed_noise():
    cells = compare(sort_results(NOISY), "table2", planned_seeds=3)
    shown = comparison_table(cells).reset_index()
    flags = {(k, c): f for k, c, f in zip(shown["Kernel"], shown["Column"], shown["Flag"])}
    assert flags == {
        ("Gaussian", "sort 1×"): "within seed noise, rank within seed noise",  # 2nd, tied 1st
        ("Triweight", "sort 1×"): "",
        ("Gaussian", "sort 2×"): "differs, rank differs",
        ("Triweight", "sort 2×"): "differs, rank differs",
        ("Gaussian", "sort 4×"): "within seed noise, rank within seed noise",
        ("Triweight", "sort 4×"): "within seed noise, rank within seed noise",
    }
    gaussian = cells.set_index(["kernel_label", "key"]).loc[("Gaussian", "sort_2x")]
    half = T2 * 0.02 / math.sqrt(3)
    assert math.isclose(gaussian["ci_low"], 0.52 - half) and math.isclose(
        gaussian["ci_high"], 0.52 + half
    )
    assert summary(cells)[:3] == [
        "2 of 6 common cells differ from the paper's beyond seed noise (outside both the paper's "
        "max–mean spread and our interval), at the paper's 2 decimals; 3 more within seed noise; 90 of the paper's 96 cells have no result here",
        "ranking of kernels differs from the paper's beyond seed noise in: sort 2×",
        "ranking differs only within seed noise in: sort 1×, sort 4×",
    ]


def test_one_kernel_gets_no_ranking_verdict_and_no_padding_rows():
    one = {cell: values for cell, values in NOISY.items() if cell[0] == "Gaussian"}
    cells = compare(sort_results(one), "table2")
    assert len(cells) == 3 and cells["rank_ours"].isna().all()
    assert (comparison_table(cells)["Rank ours/paper"] == "").all()
    assert summary(cells)[1] == (
        "ranking of kernels: not compared (no column has two kernels in common with the paper)"
    )
    assert "as the paper's" not in "\n".join(summary(cells))


def cpu_config(seed: int) -> dict:
    """A tiny CPU trial: sort over 4 symbols, width 16, 2 heads, one layer, 100 steps of 8."""
    config = tiny_trial(max_steps=100)
    return {**config, "seed": seed, "model": {**config["model"], "kernel": "gaussian"}}


def test_compare_on_a_cpu_sweep_names_every_setting_that_is_not_the_papers_first():
    results = sort_results({("Gaussian", 1.0): [1.0, 0.9]})
    cells = compare(results, "table2", configs=[cpu_config(0), cpu_config(1)], planned_seeds=2)
    assert cells.attrs["setup"] == [
        "Not the paper's setup (ours vs the paper's):",
        "- sort · n_layer: 1 vs 2 (Table 6)",
        "- n_embd: 16 vs 512 (Table 6)",
        "- n_head: 2 vs 8 (Table 6)",
        "- lr: 3e-3 vs 0.001 (Table 6)",
        "- batch_size: 8 vs 256 (Table 6)",
        "- sort · training sequences (steps × batch): 800 vs 40000000 "
        "(Table 6, one epoch of 40×10^6 examples)",
        "- sort · num_symbols: 4 vs 32 (Table 6, vocabulary 36; B.3)",
        "- train_max_length: 4 vs 64 (Table 6, training sequence length up to 64)",
        "- eval_length: 4 vs 64 (Table 2, in-distribution n = 64)",
        "- seeds per configuration: 2 vs 3 (Tables 2 and 7, three seeds)",
    ]
    text = report(cells, "title")
    assert text.startswith("Not the paper's setup (ours vs the paper's):\n- sort · n_layer: 1 vs 2")
    assert text.count("| Gaussian |") == 1  # one common cell, no rows for the 95 others
    assert "1 of the paper's 96 cells" not in text and "95 of the paper's 96 cells" in text


def test_the_setup_check_without_trial_configs_reads_the_results_columns():
    results = sort_results({("Gaussian", 1.0): [1.0]}).assign(n_layer=2, n_embd=32, n_head=8)
    assert setup_lines("table2", results, None, 3) == [
        "Not the paper's setup (ours vs the paper's) (without the sweep's trial configs: batch, "
        "lengths and training steps not checked):",
        "- n_embd: 32 vs 512 (Table 6)",
    ]
    regbench = results.assign(task="regbench", n_layer=4, n_embd=128, n_head=8, lr=5e-4)
    assert setup_lines("table1", regbench, None, 1) == [
        "Setup: as the paper's in every setting checked (without the sweep's trial configs: batch, "
        "lengths and training steps not checked)."
    ]


def test_the_compare_command_on_a_cpu_sweep_folder_says_first_what_is_not_the_papers(tmp_path):
    """Through the command line, with the sweep folder's trial configs: the setup lines open the
    output, the table has the one common cell, and no column gets a ranking verdict."""
    for seed, value in enumerate([1.0, 0.9]):
        rows = sort_results({("Gaussian", 1.0): [value]}).assign(seed=seed)
        write_trial_rows(tmp_path, f"t{seed}", rows.drop(columns="trial_id").to_dict("records"))
    configs = {f"t{seed}": cpu_config(seed) for seed in (0, 1)}
    (tmp_path / "trials.json").write_text(json.dumps(configs))
    done = invoke("compare", tmp_path)
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        "Not the paper's setup (ours vs the paper's):",
        "- sort · n_layer: 1 vs 2 (Table 6)",
        "- n_embd: 16 vs 512 (Table 6)",
    ]
    assert [line for line in lines if line.startswith("| Gaussian")] == [
        "| Gaussian | sort 1× | 0.95^(1.00) | [0.31, 1.59] | 1.00^(1.00) | -0.05 | +0.00 |  |"
        " within seed noise |"
    ]
    assert (
        "ranking of kernels: not compared (no column has two kernels in common with the paper)"
        in lines
    )


def test_compare_says_which_rows_reference_code_would_change_when_it_is_off():
    results = sort_results({("Gaussian", 1.0): [1.0], ("Epanechnikov (ReLUmax)", 1.0): [1.0]})
    results["kernel"] = results["kernel_label"].map(
        {"Gaussian": "softmax", "Epanechnikov (ReLUmax)": "relumax"}
    )
    (line,) = reference_code_lines("table2", results, None)
    assert "would change the rows Epanechnikov (ReLUmax);" in line and "keys ≤ t−2" in line
    assert reference_code_lines("table2", results.assign(reference_code="lm_length"), None) == []
    on = [{"model": {"reference_code": "lm_length"}}]
    assert reference_code_lines("table2", results, on) == []
    gaussian_only = results[results["kernel"] == "softmax"]
    assert reference_code_lines("table2", gaussian_only, None) == []  # no row it would change
    (regbench,) = reference_code_lines("table1", results.assign(task="regbench"), None)
    assert "β⁴·cos" in regbench

"""Sweep files: validation (one-line errors naming the key and what is allowed) and expansion."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from mosaic_core.config import TrialConfig
from mosaic_core.kernel_specs import KERNEL_DEFAULTS, KERNEL_NAMES
from search_spaces import bundled_sweeps
from search_spaces.expand import load_sweep
from search_spaces.yaml_io import SweepError, read_yaml

from helpers import SMOKE_YAML


def sweep_error(path: Path) -> str:
    """The SweepError message for `path`, checked to be a single line."""
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.strip() == message and message
    return message


# ---------------------------------------------------------------------------------------------
# the smoke sweep


def test_smoke_is_bundled():
    assert bundled_sweeps()["smoke"] == SMOKE_YAML


def test_smoke_expands_to_three_kernels_times_two_seeds():
    sweep = load_sweep(SMOKE_YAML)
    assert sweep.name == "smoke"
    assert sweep.planned_seeds == 2
    assert (sweep.resources.cpu, sweep.resources.gpu) == (1.0, 0.0)
    got = [
        (t.config.model.kernel, dict(t.config.model.kernel_params), t.config.seed)
        for t in sweep.trials
    ]
    assert got == [
        ("softmax", {}, 0),
        ("softmax", {}, 1),
        ("sparsemax", {}, 0),
        ("sparsemax", {}, 1),
        ("entmax", {"alpha": 1.5}, 0),
        ("entmax", {"alpha": 1.5}, 1),
    ]
    assert sweep.kernel_labels == ["Gaussian", "Epanechnikov (sparsemax)", "Biweight"]
    assert [t.kernel_label for t in sweep.trials] == [
        label for label in sweep.kernel_labels for _ in range(2)
    ]
    assert [t.describe() for t in sweep.trials] == [
        "softmax seed=0",
        "softmax seed=1",
        "sparsemax seed=0",
        "sparsemax seed=1",
        "entmax(α=1.5) seed=0",
        "entmax(α=1.5) seed=1",
    ]


def test_smoke_trials_carry_the_base_config():
    for trial in load_sweep(SMOKE_YAML).trials:
        config = trial.config
        assert isinstance(config, TrialConfig)
        assert config.task.name == "sort"
        assert config.task.eval_factors == [1.0, 2.0]
        assert (
            config.task.num_symbols,
            config.task.train_min_length,
            config.task.train_max_length,
        ) == (8, 4, 8)
        assert (config.model.n_layer, config.model.n_embd, config.model.n_head) == (2, 64, 4)
        assert (config.train.max_steps, config.train.eval_interval, config.train.lr) == (
            1000,
            1000,
            3.0e-3,
        )


# ---------------------------------------------------------------------------------------------
# expansion: kernel parameters are conditional, the grid is a product over everything else


def test_kernel_params_are_conditional(write_sweep, smoke_spec):
    smoke_spec["kernels"] = [
        "softmax",
        {"name": "entmax", "alpha": [1.5, 1.333]},
        {"name": "topk_softmax", "k": [16, 32]},
    ]
    smoke_spec["grid"] = {"seed": [0, 1, 2], "model.n_layer": [1, 2]}
    sweep = load_sweep(write_sweep(smoke_spec))

    assert len(sweep.trials) == (1 + 2 + 2) * 3 * 2 == 30
    variants = [
        ("softmax", ()),
        ("entmax", (("alpha", 1.5),)),
        ("entmax", (("alpha", 1.333),)),
        ("topk_softmax", (("k", 16),)),
        ("topk_softmax", (("k", 32),)),
    ]
    expected = [
        (kernel, params, seed, n_layer)
        for (kernel, params), seed, n_layer in itertools.product(variants, [0, 1, 2], [1, 2])
    ]
    got = [
        (
            t.config.model.kernel,
            tuple(sorted(t.config.model.kernel_params.items())),
            t.config.seed,
            t.config.model.n_layer,
        )
        for t in sweep.trials
    ]
    assert got == expected  # kernel-major, then the grid in the order written

    for trial in sweep.trials:
        params = trial.config.model.kernel_params
        if trial.config.model.kernel == "softmax":
            assert params == {}  # no alpha, no k
        elif trial.config.model.kernel == "entmax":
            assert set(params) == {"alpha"}
        else:
            assert set(params) == {"k"}
        assert trial.config.model.n_embd == 64  # the rest of base is untouched

    assert sweep.kernel_labels == [
        "Gaussian",
        "Biweight",
        "1.333-entmax",
        "Gaussian kNN, k = 16",
        "Gaussian kNN, k = 32",
    ]
    assert sweep.planned_seeds == 3
    names = [t.describe() for t in sweep.trials]
    assert len(set(names)) == 30
    assert names[0] == "softmax seed=0 model.n_layer=1"
    assert names[-1] == "topk_softmax(k=32) seed=2 model.n_layer=2"
    assert sweep.trials[-1].varying == {
        "kernel": "topk_softmax(k=32)",
        "seed": 2,
        "model.n_layer": 2,
    }


def test_grid_overrides_base_and_no_grid_means_one_trial_per_kernel(write_sweep, smoke_spec):
    smoke_spec["grid"] = {"model.n_layer": [1, 3], "task.name": ["reverse"]}
    sweep = load_sweep(write_sweep(smoke_spec))
    assert [(t.config.model.n_layer, t.config.task.name) for t in sweep.trials] == [
        (1, "reverse"),
        (3, "reverse"),
    ] * 3
    assert sweep.planned_seeds == 1

    del smoke_spec["grid"]
    sweep = load_sweep(write_sweep(smoke_spec))
    assert [t.describe() for t in sweep.trials] == ["softmax", "sparsemax", "entmax(α=1.5)"]


@pytest.mark.parametrize(
    ("kernels", "expected"),
    [
        (
            ["biweight", {"name": "entmax", "alpha": 1.5}],
            "kernels[1] repeats kernels[0]: both are entmax(α=1.5)",
        ),
        (["softmax", "sparsemax", "gaussian"], "kernels[2] repeats kernels[0]: both are softmax;"),
        (
            [{"name": "topk_softmax", "k": [16, 16.0]}],
            "kernels[0] repeats kernels[0]: both are topk_softmax(k=16)",
        ),
    ],
)
def test_a_kernel_variant_written_twice_is_refused_like_a_repeated_grid_value(
    write_sweep, smoke_spec, kernels, expected
):
    smoke_spec["kernels"] = kernels
    assert expected in sweep_error(write_sweep(smoke_spec))


def test_kernel_defaults_are_filled_in(write_sweep, smoke_spec):
    smoke_spec["kernels"] = ["relumax", "topk_uniform", "triweight"]
    del smoke_spec["grid"]
    sweep = load_sweep(write_sweep(smoke_spec))
    assert [(t.config.model.kernel, dict(t.config.model.kernel_params)) for t in sweep.trials] == [
        ("relumax", {"b": 1.0}),
        ("topk_uniform", {"k": 32}),
        ("entmax", {"alpha": pytest.approx(4 / 3)}),
    ]
    assert sweep.kernel_labels == ["Epanechnikov (ReLUmax)", "Uniform kNN, k = 32", "Triweight"]


def test_distinct_variants_have_distinct_names(write_sweep, smoke_spec):
    smoke_spec["kernels"] = ["triweight", {"name": "entmax", "alpha": 1.3333334}]
    sweep = load_sweep(write_sweep(smoke_spec))
    assert len(sweep.trials) == 4
    assert len({t.describe() for t in sweep.trials}) == 4


def test_two_grid_values_that_make_the_same_trial_are_refused(write_sweep, smoke_spec):
    smoke_spec["grid"] = {"seed": [1], "train.lr": [1, 1.0]}
    message = sweep_error(write_sweep(smoke_spec, "dup"))
    assert (
        message
        == "dup.yaml: two grid points make the same trial 'softmax seed=1 train.lr=1'; list each "
        "value once"
    )


def test_a_case_gives_its_trials_their_own_worker_count(write_sweep, smoke_spec):
    smoke_spec["resources"] = {"cpu": 2, "gpu": 1, "workers": 2, "placement": "SPREAD"}
    smoke_spec["cases"] = [{"model.n_layer": 1}, {"model.n_layer": 4, "resources.workers": 8}]
    sweep = load_sweep(write_sweep(smoke_spec))
    workers = {
        (t.config.model.n_layer, t.describe()): sweep.trial_resources(t).workers
        for t in sweep.trials
    }
    assert set(workers.values()) == {2, 8} and len(workers) == 12
    assert all(w == (8 if n_layer == 4 else 2) for (n_layer, _), w in workers.items())
    # the worker count does not change the result
    assert not any("workers" in name for _, name in workers)
    deep = next(t for t in sweep.trials if t.workers == 8)
    assert {t.workers for t in sweep.trials} == {None, 8}  # None: the sweep's resources.workers
    assert sweep.trial_resources(deep).model_dump() == {
        "cpu": 2,
        "gpu": 1,
        "workers": 8,
        "placement": "SPREAD",
    }
    assert sweep.widest.workers == 8 and sweep.resources.workers == 2


def test_cases_that_differ_only_in_workers_make_the_same_trial(write_sweep, smoke_spec):
    smoke_spec["cases"] = [{}, {"resources.workers": 2}]
    message = sweep_error(write_sweep(smoke_spec, "dup"))
    assert (
        message
        == "dup.yaml: two grid points make the same trial 'softmax seed=0'; list each value once"
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            {"resources.gpu": 1},
            "cases can set resources.workers only; resources.gpu is per worker, for the whole sweep, in 'resources:'",
        ),
        ({"resources.workers": 0}, "case resources.workers must be a whole number ≥ 1; got 0"),
        ({"resources.workers": 1.5}, "case resources.workers must be a whole number ≥ 1; got 1.5"),
    ],
)
def test_bad_case_resources_are_one_line(write_sweep, smoke_spec, case, expected):
    smoke_spec["cases"] = [case]
    assert sweep_error(write_sweep(smoke_spec)) == f"sweep.yaml: {expected}"


def test_workers_and_placement_in_resources_are_checked(write_sweep, smoke_spec):
    smoke_spec["resources"]["workers"] = 0
    assert "resources.workers" in sweep_error(write_sweep(smoke_spec))
    smoke_spec["resources"].update(workers=2, placement="STRICT_PACK")
    message = sweep_error(write_sweep(smoke_spec))
    assert "resources.placement" in message and "'PACK'" in message and "'SPREAD'" in message


# ---------------------------------------------------------------------------------------------
# errors: SweepError, one line, naming the key and what is allowed


def test_unknown_top_level_key(write_sweep, smoke_spec):
    smoke_spec["seeds"] = [0, 1]
    message = sweep_error(write_sweep(smoke_spec, "typo"))
    assert (
        message
        == "typo.yaml: unknown key 'seeds'; allowed: name, description, base, kernels, cases, grid, resources, max_failures, scheduler, search"
    )


def test_misspelt_required_key_is_named(write_sweep, smoke_spec):
    smoke_spec["kernals"] = smoke_spec.pop("kernels")
    message = sweep_error(write_sweep(smoke_spec, "typo"))
    assert (
        message
        == "typo.yaml: unknown key 'kernals'; allowed: name, description, base, kernels, cases, grid, resources, max_failures, scheduler, search"
    )


def test_unknown_key_inside_base(write_sweep, smoke_spec):
    smoke_spec["base"]["model"]["n_lyer"] = 1
    message = sweep_error(write_sweep(smoke_spec))
    assert message.startswith("sweep.yaml: ")
    assert "unknown key 'base.model.n_lyer'" in message
    assert message.endswith(
        "allowed: n_layer, n_embd, n_head, pmem_size, dropout, attn_dropout, contextual_attn_dropout, "
        "normrelu_bandwidth, attention_backend, reference_code, embd_dropout, prenorm, tie_weights, "
        "vocab_size, kernel, kernel_params"
    )


def test_unknown_section_in_base(write_sweep, smoke_spec):
    smoke_spec["base"]["modle"] = smoke_spec["base"].pop("model")
    message = sweep_error(write_sweep(smoke_spec))
    assert "unknown key 'base.modle'" in message
    assert message.endswith("allowed: seed, task, model, train")


def test_unknown_key_in_resources(write_sweep, smoke_spec):
    smoke_spec["resources"]["gpus"] = 1
    message = sweep_error(write_sweep(smoke_spec))
    assert "unknown key 'resources.gpus'" in message and message.endswith(
        "allowed: cpu, gpu, workers, placement"
    )


def test_bad_value_in_base_names_the_key_and_the_choices(write_sweep, smoke_spec):
    smoke_spec["base"]["task"]["name"] = "sorting"
    message = sweep_error(write_sweep(smoke_spec))
    assert "base.task.name" in message
    assert all(f"'{task}'" in message for task in ("sort", "reverse", "copy"))


def test_unknown_kernel_lists_allowed_names(write_sweep, smoke_spec):
    smoke_spec["kernels"] = ["softmax", "softmaxx"]
    message = sweep_error(write_sweep(smoke_spec))
    assert "kernels[1]" in message and "unknown kernel 'softmaxx'" in message
    assert message.endswith("allowed: " + ", ".join(KERNEL_NAMES))
    for name in ("softmax", "sparsemax", "entmax", "relumax", "topk_softmax", "biweight"):
        assert name in message


def test_kernel_entry_without_name(write_sweep, smoke_spec):
    smoke_spec["kernels"] = [{"alpha": 1.5}]
    message = sweep_error(write_sweep(smoke_spec))
    assert (
        "kernels[0]" in message
        and "'name'" in message
        and "allowed: softmax, sparsemax, entmax" in message
    )


def test_kernel_parameter_of_another_kernel(write_sweep, smoke_spec):
    smoke_spec["kernels"] = [{"name": "entmax", "k": 8}]
    message = sweep_error(write_sweep(smoke_spec))
    assert (
        "kernels[0]" in message
        and "'entmax' has no parameter 'k'" in message
        and message.endswith("allowed: alpha")
    )


def test_empty_kernel_list(write_sweep, smoke_spec):
    smoke_spec["kernels"] = []
    message = sweep_error(write_sweep(smoke_spec))
    assert message.startswith("sweep.yaml: kernels: ")


@pytest.mark.parametrize("alpha", [1.0, 0.5, [1.5, 1]])
def test_entmax_alpha_must_exceed_one(write_sweep, smoke_spec, alpha):
    smoke_spec["kernels"] = ["softmax", {"name": "entmax", "alpha": alpha}]
    message = sweep_error(write_sweep(smoke_spec))
    assert "kernels[1]" in message and "alpha must be > 1" in message
    bad = alpha[-1] if isinstance(alpha, list) else alpha
    assert message.endswith(f"got {bad!r}")


@pytest.mark.parametrize("k", [0, -3, 2.5])
def test_topk_k_must_be_a_positive_integer(write_sweep, smoke_spec, k):
    smoke_spec["kernels"] = [{"name": "topk_softmax", "k": [16, k]}]
    message = sweep_error(write_sweep(smoke_spec))
    assert "kernels[0]" in message and "topk_softmax k must be an integer >= 1" in message
    assert message.endswith(f"got {k!r}")


@pytest.mark.parametrize("b", [0, -1.0])
def test_relumax_b_must_be_positive(write_sweep, smoke_spec, b):
    smoke_spec["kernels"] = [{"name": "relumax", "b": b}]
    message = sweep_error(write_sweep(smoke_spec))
    assert "kernels[0]" in message and "relumax b must be > 0" in message


def test_unknown_grid_key_lists_allowed_keys(write_sweep, smoke_spec):
    smoke_spec["grid"]["model.n_lyer"] = [1, 2]
    message = sweep_error(write_sweep(smoke_spec))
    assert "unknown grid key 'model.n_lyer'" in message
    allowed = message.split("allowed: ", 1)[1].split(", ")
    assert {
        "seed",
        "model.n_layer",
        "model.n_embd",
        "task.name",
        "train.lr",
        "train.max_steps",
    } <= set(allowed)
    assert "model.kernel" not in allowed and "model.kernel_params" not in allowed


@pytest.mark.parametrize("key", ["model.kernel", "model.kernel_params"])
def test_grid_cannot_set_the_kernel(write_sweep, smoke_spec, key):
    smoke_spec["grid"][key] = ["softmax"] if key == "model.kernel" else [{"alpha": 1.5}]
    message = sweep_error(write_sweep(smoke_spec))
    assert f"grid key '{key}' is set by 'kernels:'" in message
    assert message.endswith("(kernels: " + ", ".join(KERNEL_DEFAULTS) + ")")


def test_empty_grid_list(write_sweep, smoke_spec):
    smoke_spec["grid"]["model.n_layer"] = []
    message = sweep_error(write_sweep(smoke_spec))
    assert message == "sweep.yaml: grid key 'model.n_layer' has an empty list of values"


def test_repeated_grid_value(write_sweep, smoke_spec):
    smoke_spec["grid"]["seed"] = [0, 1, 0]
    message = sweep_error(write_sweep(smoke_spec))
    assert "grid key 'seed' repeats a value" in message


def test_n_embd_not_divisible_by_n_head_in_base(write_sweep, smoke_spec):
    smoke_spec["base"]["model"]["n_embd"] = 30
    message = sweep_error(write_sweep(smoke_spec))
    assert message == "sweep.yaml: base.model: n_embd (30) must be divisible by n_head (4)"


def test_n_embd_not_divisible_by_n_head_from_grid(write_sweep, smoke_spec):
    smoke_spec["grid"]["model.n_head"] = [4, 7]
    message = sweep_error(write_sweep(smoke_spec))
    assert "model" in message and "n_embd (64) must be divisible by n_head (7)" in message


def test_bad_sweep_name(write_sweep, smoke_spec):
    smoke_spec["name"] = "my sweep"
    message = sweep_error(write_sweep(smoke_spec))
    assert message.startswith("sweep.yaml: name: ")


def test_missing_name(write_sweep, smoke_spec):
    del smoke_spec["name"]
    message = sweep_error(write_sweep(smoke_spec))
    assert message.startswith("sweep.yaml: name: ") and "required" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert sweep_error(path) == f"{path}: no such sweep file"
    # a folder is not a sweep file
    assert sweep_error(tmp_path) == f"{tmp_path}: no such sweep file"


def test_invalid_yaml(write_sweep):
    message = sweep_error(write_sweep("name: x\nkernels: [softmax\ngrid: {seed: [0]}\n", "broken"))
    assert message.startswith("broken.yaml: not valid YAML: ")


@pytest.mark.parametrize("text", ["", "- softmax\n- sparsemax\n", "just a string\n"])
def test_not_a_mapping(write_sweep, text):
    message = sweep_error(write_sweep(text, "odd"))
    assert (
        message
        == "odd.yaml: a sweep file is a mapping with keys name, description, base, kernels, cases, grid, resources, max_failures, scheduler, search"
    )


# ---------------------------------------------------------------------------------------------
# search: and scheduler: blocks


def search_spec(smoke_spec: dict, **search) -> dict:
    spec = {**smoke_spec, "kernels": [{"name": "entmax", "alpha": 1.5}], "grid": {}}
    spec["search"] = {
        "metric": "exact_match_2x",
        "mode": "max",
        "n_trials": 4,
        "seeds": 2,
        "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}, "model.n_layer": {"int": [1, 3]}},
        **search,
    }
    return spec


def test_search_sweep_counts_suggestions_times_seeds(write_sweep, smoke_spec):
    sweep = load_sweep(write_sweep(search_spec(smoke_spec)))
    assert sweep.num_trials == 8 and sweep.planned_seeds == 2 and len(sweep.trials) == 1
    assert sweep.metric == ("exact_match_2x", "max")


def test_search_may_tune_a_kernel_parameter_it_has(write_sweep, smoke_spec):
    spec = search_spec(smoke_spec, space={"model.kernel_params.alpha": {"uniform": [1.1, 2.0]}})
    assert load_sweep(write_sweep(spec)).search.space == {
        "model.kernel_params.alpha": {"uniform": [1.1, 2.0]}
    }
    spec["kernels"] = ["softmax"]  # no alpha to tune
    assert "unknown key 'model.kernel_params.alpha' for trial 'softmax'" in sweep_error(
        write_sweep(spec)
    )


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        (
            {"train.lr": {"loguniform": [1e-2, 1e-2]}},
            "search.space.train.lr: empty range [0.01, 0.01]; low must be below high",
        ),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "search.space.train.lr: empty range [0.1, 0.01]"),
        ({"model.n_layer": {"int": [2, 1]}}, "search.space.model.n_layer: empty range [2, 1]"),
        ({"train.lr": {"loguniform": [0, 1e-2]}}, "loguniform needs a positive low bound; got 0"),
        (
            {"model.n_embd": {"choice": []}},
            "search.space.model.n_embd: choice needs at least one value",
        ),
        ({"train.lr": {"normal": [0, 1]}}, "search.space.train.lr: write one of {uniform: [...]}"),
        ({"train.lr": {"uniform": [0.1]}}, "uniform takes [low, high] numbers; got [0.1]"),
        ({"model.n_layer": {"int": [1, 2.5]}}, "int takes integer bounds; got [1, 2.5]"),
        (
            {"train.lrr": {"uniform": [0.1, 0.2]}},
            "search.space: unknown key 'train.lrr' for trial 'entmax(α=1.5)'; allowed: ",
        ),
        (
            {"model.kernel": {"choice": ["softmax"]}},
            "search.space.model.kernel: cannot be searched",
        ),
        ({"seed": {"int": [0, 9]}}, "search.space.seed: cannot be searched"),
        (
            {"model.dropout": {"uniform": [0.0, 1.0]}},
            "search.space.model.dropout = 1.0: model.dropout: Input should be less than 1",
        ),
        (
            {"model.n_head": {"choice": [4, 3]}},
            "search.space.model.n_head = 3: model: n_embd (64) must be divisible by n_head (3)",
        ),
    ],
)
def test_bad_search_space_is_one_line(write_sweep, smoke_spec, space, expected):
    assert expected in sweep_error(write_sweep(search_spec(smoke_spec, space=space), "s"))


def test_search_metric_must_be_reported(write_sweep, smoke_spec):
    message = sweep_error(write_sweep(search_spec(smoke_spec, metric="exact_match_3x")))
    assert (
        "search: metric 'exact_match_3x' is not reported by every trial; choose from exact_match_1x, exact_match_2x,"
        in message
    )


def test_search_takes_seeds_from_search_seeds(write_sweep, smoke_spec):
    spec = search_spec(smoke_spec)
    spec["grid"] = {"seed": [0, 1]}
    assert "seeds come from search.seeds" in sweep_error(write_sweep(spec))


def test_search_needs_positive_trials_and_seeds(write_sweep, smoke_spec):
    assert "search.n_trials: Input should be greater than or equal to 1" in sweep_error(
        write_sweep(search_spec(smoke_spec, n_trials=0))
    )
    assert "search.seeds: Input should be greater than or equal to 1" in sweep_error(
        write_sweep(search_spec(smoke_spec, seeds=0))
    )


def test_asha_scheduler_by_name_or_mapping(write_sweep, smoke_spec):
    spec = search_spec(smoke_spec)
    spec["scheduler"] = "asha"
    sweep = load_sweep(write_sweep(spec))
    assert sweep.scheduler.name == "asha" and sweep.metric == ("exact_match_2x", "max")
    grid = {
        **smoke_spec,
        "scheduler": {
            "name": "asha",
            "metric": "train_loss",
            "mode": "min",
            "grace_period": 100,
            "reduction_factor": 2,
        },
    }
    assert load_sweep(write_sweep(grid, "grid")).metric == ("train_loss", "min")


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("asha", "scheduler needs 'metric' and 'mode' (min or max) when there is no 'search:'"),
        (
            {"name": "hyperband", "metric": "train_loss", "mode": "min"},
            "scheduler.name: Input should be 'asha'",
        ),
        (
            {"name": "asha", "metric": "accuracy", "mode": "max"},
            "scheduler: metric 'accuracy' is not reported by every trial",
        ),
        (
            {"name": "asha", "metric": "train_loss", "mode": "min", "grace_period": 1000},
            "grace_period (1000) must be below train.max_steps (1000)",
        ),
        (
            {"name": "asha", "metric": "train_loss", "mode": "min", "reduction_factor": 1},
            "scheduler.reduction_factor: Input should be greater than 1",
        ),
    ],
)
def test_bad_scheduler_is_one_line(write_sweep, smoke_spec, scheduler, expected):
    assert expected in sweep_error(write_sweep({**smoke_spec, "scheduler": scheduler}, "sched"))


def test_metric_names_are_what_trials_report():
    """The names the schema accepts are the ones train_trial reports (checked on a 2-step trial)."""
    from mosaic_core.config import TrialConfig
    from mosaic_core.train import train_trial

    config = TrialConfig.model_validate(
        {
            "task": {
                "name": "mqmtar",
                "num_symbols": 8,
                "train_min_length": 16,
                "train_max_length": 16,
                "eval_length": 16,
                "eval_factors": [1, 1.5],
                "eval_examples": 4,
            },
            "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
            "train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0},
        }
    )
    reported = train_trial(config)
    assert set(config.metric_names()) <= set(reported)
    assert {name for name in reported if "/" not in name} - set(config.metric_names()) == {
        "step",
        "lr",
        "elapsed_s",
        "tokens_per_s",
    }


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: s["search"].update(storage="not a url"),
            "search.storage: 'not a url' is not a database URL",
        ),
        (
            lambda s: s.update(grid={"model.n_layer": [1, 2]}),
            "search.space.model.n_layer: also in grid:; a key is either searched or gridded",
        ),
        (
            lambda s: s.update(scheduler={"name": "asha", "mode": "min"}),
            "scheduler.mode 'min' differs from search.mode 'max'",
        ),
        (
            lambda s: (
                s.update(scheduler="asha"),
                s["search"]["space"].update({"train.max_steps": {"int": [500, 2000]}}),
            ),
            "scheduler: ASHA needs one train.max_steps for all trials (its max_t)",
        ),
        (
            lambda s: s.update(resources={"cpu": 1, "gpu": 1.5}),
            "resources.gpu: gpu 1.5: a fraction of one GPU (≤ 1) or whole GPUs",
        ),
    ],
)
def test_search_and_resource_combinations_that_cannot_run(write_sweep, smoke_spec, edit, expected):
    spec = search_spec(smoke_spec)
    edit(spec)
    assert expected in sweep_error(write_sweep(spec, "combo"))


def test_whole_gpus_and_fractions_are_fine(write_sweep, smoke_spec):
    for gpu in (0.25, 1, 2):
        smoke_spec["resources"] = {"cpu": 1, "gpu": gpu}
        assert load_sweep(write_sweep(smoke_spec)).resources.gpu == gpu


def test_a_case_merges_into_base_key_by_key(write_sweep, smoke_spec):
    smoke_spec["cases"] = [{"model": {"n_layer": 3}}, {"model.n_layer": 1, "train": {"lr": 1e-3}}]
    sweep = load_sweep(write_sweep(smoke_spec))
    got = {
        (
            t.config.model.n_layer,
            t.config.model.n_embd,
            t.config.model.n_head,
            t.config.train.lr,
            t.config.train.max_steps,
        )
        for t in sweep.trials
    }
    # n_embd, n_head and max_steps stay the base's
    assert got == {
        (3, 64, 4, 3e-3, 1000),
        (1, 64, 4, 1e-3, 1000),
    }
    assert sweep.trials[0].describe() == "model.n_layer=3 softmax seed=0"


def test_the_largest_sweep_allowed_expands_in_seconds(write_sweep, smoke_spec):
    import time

    smoke_spec["grid"] = {"seed": list(range(100)), "train.max_steps": list(range(1000, 1033))}
    started = time.perf_counter()
    sweep = load_sweep(write_sweep(smoke_spec))
    assert len(sweep.trials) == 3 * 100 * 33 == 9900 and time.perf_counter() - started < 20


def test_numbers_stay_strict_but_an_integer_is_a_float_and_1e_minus_3_a_number(tmp_path):
    """Strict types refuse `"64"` for a number (test_bad_input), yet `lr: 1` is the float 1.0 and
    `1e-3` (a string to YAML 1.1) is the number it reads as."""
    path = tmp_path / "trial.yaml"
    path.write_text("train: {lr: 1, min_lr: 1e-3, adam_betas: [0.9, 0.99]}\nmodel: {dropout: 0}\n")
    config = TrialConfig.model_validate(read_yaml(path))
    assert (config.train.lr, config.train.min_lr) == (1.0, 0.001)
    assert isinstance(config.train.lr, float) and config.train.adam_betas == (0.9, 0.99)
    assert config.model.dropout == 0.0

"""How a Tune trial's config maps to a full trial config, the Tune/Optuna search space, the
persistent study, the seed groups across a resume, and ASHA's wiring."""

from __future__ import annotations

import math

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from orchestrator.trial_configs import trial_config, trial_name
from orchestrator.tuner import param_space, search_algorithm
from search_spaces.expand import load_sweep


@pytest.fixture
def search_sweep(write_sweep, smoke_spec):
    smoke_spec.update(kernels=["softmax", {"name": "entmax", "alpha": 1.5}], grid={})
    smoke_spec["search"] = {
        "metric": "exact_match_1x",
        "mode": "max",
        "n_trials": 3,
        "seeds": 2,
        "space": {
            "train.lr": {"loguniform": [1e-3, 1e-2]},
            "model.n_layer": {"int": [1, 3]},
            "model.n_embd": {"choice": [32, 64]},
        },
    }
    return load_sweep(write_sweep(smoke_spec))


def test_trial_config_applies_the_suggestion_and_the_seed_index(search_sweep):
    configs = {trial.describe(): trial.config.model_dump() for trial in search_sweep.trials}
    tune_config = {
        "variant": "entmax(α=1.5)",
        "train.lr": 0.004,
        "model.n_layer": 3,
        "__trial_index__": 1,
    }
    config = trial_config(tune_config, configs)
    assert config["train"]["lr"] == 0.004 and config["model"]["n_layer"] == 3
    assert config["seed"] == configs["entmax(α=1.5)"]["seed"] + 1
    assert config["model"]["kernel_params"] == {"alpha": 1.5}
    assert configs["entmax(α=1.5)"]["train"]["lr"] == 3e-3  # the variant's own config is untouched
    assert trial_name(tune_config) == "entmax(α=1.5) train.lr=0.004 model.n_layer=3 seed+1"
    # a grid trial: as expanded
    assert trial_config({"variant": "softmax"}, configs) == configs["softmax"]


def test_search_space_reaches_optuna_with_inclusive_integer_bounds(search_sweep):
    space = OptunaSearch.convert_search_space(
        param_space(search_sweep, ["softmax", "entmax(α=1.5)"])
    )
    assert space["train.lr"] == optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)
    # both ends can be suggested
    assert space["model.n_layer"] == optuna.distributions.IntDistribution(1, 3)
    assert space["model.n_embd"] == optuna.distributions.CategoricalDistribution([32, 64])
    assert space["variant"] == optuna.distributions.CategoricalDistribution(
        ["softmax", "entmax(α=1.5)"]
    )


def test_study_persists_in_the_sweep_folder_under_the_sweep_name(search_sweep, tmp_path):
    searcher = search_algorithm(search_sweep, tmp_path)
    searcher.set_search_properties(
        None, None, param_space(search_sweep, ["softmax", "entmax(α=1.5)"])
    )
    searcher.suggest("t1")
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and len(study.trials) == 1


def test_seed_groups_survive_tunes_searcher_checkpoint(search_sweep, tmp_path):
    """Suggest two suggestions × 2 seeds, checkpoint through Tune's SearchGenerator, restore into a
    fresh one (as Tuner.restore does), finish the trials: Optuna gets each suggestion once, with
    the mean over its seeds."""
    from ray.tune.search import SearchGenerator

    space = param_space(search_sweep, ["softmax"])
    first = SearchGenerator(search_algorithm(search_sweep, tmp_path))
    first.set_search_properties(None, None, space)
    configs = {trial_id: first.searcher.suggest(trial_id) for trial_id in ("a", "b", "c", "d")}
    assert [configs[t]["__trial_index__"] for t in "abcd"] == [0, 1, 0, 1]
    assert configs["a"]["train.lr"] == configs["b"]["train.lr"] != configs["c"]["train.lr"]
    (tmp_path / "state").mkdir()
    first.save_to_dir(str(tmp_path / "state"), session_str="s")

    restored = SearchGenerator(search_algorithm(search_sweep, tmp_path))
    restored.restore_from_dir(str(tmp_path / "state"))
    for trial_id, score in zip("abcd", (0.2, 0.4, 0.6, 1.0)):
        restored.searcher.on_trial_complete(trial_id, {"exact_match_1x": score})
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    values = [trial.value for trial in study.trials]
    assert len(values) == 2 and math.isclose(values[0], 0.3) and math.isclose(values[1], 0.8)


def test_asha_runs_on_training_steps_up_to_the_longest_trial(write_sweep, smoke_spec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator.tuner import scheduler

    assert isinstance(scheduler(load_sweep(write_sweep(smoke_spec, "plain"))), FIFOScheduler)
    smoke_spec["scheduler"] = {
        "name": "asha",
        "metric": "exact_match_2x",
        "mode": "max",
        "grace_period": 100,
        "reduction_factor": 2,
    }
    asha = scheduler(load_sweep(write_sweep(smoke_spec, "asha")))
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t) == (
        "step",
        "exact_match_2x",
        "max",
        1000,
    )
    # grace × 2^i < max_t
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [
        800,
        400,
        200,
        100,
    ]

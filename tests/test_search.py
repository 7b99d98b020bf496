"""How a Tune trial's config maps to a full trial config, the Tune/Optuna search space, the
persistent study, the seed groups across a resume, and ASHA's wiring."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
import yaml
from ray.tune.search.optuna import OptunaSearch

from orchestrator.trial_configs import trial_config, trial_name
from orchestrator.tuner import param_space, search_algorithm
from search_spaces.expand import load_sweep

from helpers import mosaic_sweep, tiny_trial


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
    # what a person reads: the paper's label, short values, the trial's own seed
    seed = configs["entmax(α=1.5)"]["seed"] + 1
    assert trial_name(tune_config, configs) == f"Biweight lr=4e-3 n_layer=3 seed={seed}"
    long = {**tune_config, "train.lr": 0.0051902630176951636}  # as a sampler suggests it
    assert trial_name(long, configs) == f"Biweight lr=5.19e-3 n_layer=3 seed={seed}"
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


def test_a_suggestion_with_a_seed_stopped_early_is_pruned_in_the_study(search_sweep, tmp_path):
    """The smoke base plans 1000 steps: a and b, the seeds of one suggestion, end at 1000 and at
    250 (ASHA stopped b), so their mean mixes budgets and Optuna gets none (PRUNED), even through
    a searcher checkpoint; c and d both trained every step, and Optuna gets their mean."""
    from ray.tune.search import SearchGenerator

    first = SearchGenerator(search_algorithm(search_sweep, tmp_path))
    first.set_search_properties(None, None, param_space(search_sweep, ["softmax"]))
    for trial_id in "abcd":
        first.searcher.suggest(trial_id)
    first.on_trial_complete("b", {"exact_match_1x": 0.0, "step": 250})
    (tmp_path / "state").mkdir()
    first.save_to_dir(str(tmp_path / "state"), session_str="s")
    restored = SearchGenerator(search_algorithm(search_sweep, tmp_path))
    restored.restore_from_dir(str(tmp_path / "state"))
    for trial_id, score in zip("acd", (0.2, 0.6, 1.0)):
        restored.on_trial_complete(trial_id, {"exact_match_1x": score, "step": 1000})
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [(trial.state.name, trial.value) for trial in study.trials] == [
        ("PRUNED", None),
        ("COMPLETE", pytest.approx(0.8)),
    ]


def test_the_study_names_its_objective_and_gets_the_first_seeds_evaluations(search_sweep, tmp_path):
    """Intermediate values at each evaluation's training step, from the first seed (a) of a
    suggestion only; reports without the metric (train_loss between evaluations) are skipped."""
    from ray.tune.search import SearchGenerator

    generator = SearchGenerator(search_algorithm(search_sweep, tmp_path))
    generator.set_search_properties(None, None, param_space(search_sweep, ["softmax"]))
    for trial_id in "ab":
        generator.searcher.suggest(trial_id)
    generator.on_trial_result("a", {"train_loss": 1.0, "step": 100})
    generator.on_trial_result("a", {"exact_match_1x": 0.25, "step": 500})
    generator.on_trial_result("b", {"exact_match_1x": 0.75, "step": 500})
    generator.on_trial_result("a", {"exact_match_1x": 0.5, "step": 1000})
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == ["exact_match_1x"]
    (trial,) = study.trials
    assert trial.intermediate_values == {500: 0.25, 1000: 0.5}


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


ASHA_SEARCH = {
    "name": "asha",
    "base": tiny_trial(max_steps=40, eval_interval=10, log_interval=0),
    "kernels": [{"name": "entmax", "alpha": 1.5}],
    "search": {
        "metric": "train_loss",
        "mode": "min",
        "n_trials": 3,
        "seeds": 2,
        "sampler_seed": 7,
        "space": {"train.lr": {"loguniform": [1e-3, 3e-2]}},
    },
    "scheduler": {"name": "asha", "grace_period": 10, "reduction_factor": 2},
    "resources": {"cpu": 1},
}


@pytest.mark.slow
def test_a_search_with_asha_marks_its_stopped_seeds_everywhere(tmp_path):
    """A real search (CPU, one trial at a time, so ASHA decides the same way each run): every
    trial that ended before its 40 steps is STOPPED in the results store and tagged in MLflow with
    its step, its suggestion is PRUNED in the Optuna study, and the ranking compares every
    suggestion at the step all seeds reached."""
    from mlflow import MlflowClient

    from analysis.results_store import read_results

    (tmp_path / "asha.yaml").write_text(yaml.safe_dump(ASHA_SEARCH))
    done = mosaic_sweep(
        "run", "asha.yaml", "--out", "sweeps/asha", "--max-concurrent", "1", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "asha"
    results = read_results(sweep_dir)
    trials = results.groupby("trial_id").agg(
        status=("status", "last"), reached=("step", "max"), searched=("searched", "first")
    )
    assert (results["planned_steps"] == 40).all()
    assert ((trials["status"] == "STOPPED") == (trials["reached"] < 40)).all()
    assert set(trials["status"]) == {"TERMINATED", "STOPPED"}

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    children = {r.data.tags["ray.trial_id"]: r for r in runs if "ray.trial_id" in r.data.tags}
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    for trial_id, trial in trials.iterrows():
        stopped = trial["status"] == "STOPPED"
        tag = children[trial_id].data.tags.get("stopped_early")
        assert tag == (str(int(trial["reached"])) if stopped else None)

    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    pruned = trials.groupby("searched")["status"].apply(lambda s: (s == "STOPPED").any())
    states = sorted(trial.state.name for trial in study.trials)
    assert states == sorted("PRUNED" if p else "COMPLETE" for p in pruned)

    common = int(trials["reached"].min())
    table = (sweep_dir / "table.md").read_text()
    assert f"train_loss mean at step {common}" in table
    assert f"compared at step {common}: the highest step every seed" in table


def test_a_suggestion_whose_seeds_all_failed_fails_in_the_study_without_warnings(
    search_sweep, tmp_path
):
    """Both seeds failed (no value): the study records FAIL, and neither numpy's "Mean of empty
    slice" nor Optuna's "The value nan is not acceptable" reaches the console."""
    from ray.tune.search import SearchGenerator

    generator = SearchGenerator(search_algorithm(search_sweep, tmp_path))
    generator.set_search_properties(None, None, param_space(search_sweep, ["softmax"]))
    for trial_id in "ab":
        generator.searcher.suggest(trial_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator.on_trial_complete("a", None, error=True)
        generator.on_trial_complete("b", None, error=True)
    assert [str(warning.message) for warning in caught] == []
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [trial.state.name for trial in study.trials] == ["FAIL"]

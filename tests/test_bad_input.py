"""Bad input, tried as a careless user (and an attacker) would: every case is one line on stderr
naming the key and what is allowed, exit 2, and nothing started: no Ray, no sweep folder, no MLflow
store. The CLI runs in this process (validation needs no Ray), with Ray's start-up replaced by a trap."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from analysis.results_store import write_trial_rows
from orchestrator import cli
from search_spaces.expand import MAX_TRIALS

from helpers import SMOKE_YAML

SMOKE = yaml.safe_load(SMOKE_YAML.read_text())
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


def edited(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    spec = copy.deepcopy(SMOKE)
    edit(spec)
    return spec


def kernel(**entry: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda spec: spec.update(kernels=[entry])


def search(**fields: Any) -> Callable[[dict[str, Any]], Any]:
    base = {
        "metric": "train_loss",
        "mode": "min",
        "n_trials": 2,
        "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    return lambda spec: (spec.pop("grid"), spec.update(search={**base, **fields}))


def text(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(spec, sort_keys=False)


# name -> (sweep file: YAML text or bytes, extra command-line arguments, what the error line must contain)
SWEEP_FILES: dict[str, tuple[str | bytes, list[str], str]] = {
    "alpha-string": (
        text(edited(kernel(name="entmax", alpha="1.5"))),
        [],
        "kernels[0].alpha: a number or a list of numbers; got '1.5'",
    ),
    "alpha-null": (
        text(edited(kernel(name="entmax", alpha=None))),
        [],
        "kernels[0].alpha: a number or a list of numbers; got None",
    ),
    "alpha-nested": (
        text(edited(kernel(name="entmax", alpha=[[1.5]]))),
        [],
        "kernels[0].alpha: a number or a list of numbers; got [1.5]",
    ),
    "alpha-bool": (
        text(edited(kernel(name="entmax", alpha=True))),
        [],
        "kernels[0].alpha: a number or a list of numbers; got True",
    ),
    "alpha-empty": (
        text(edited(kernel(name="entmax", alpha=[]))),
        [],
        "kernels[0].alpha: empty list of values",
    ),
    "alpha-inf": (
        text(edited(kernel(name="entmax", alpha=float("inf")))),
        [],
        "kernels[0].alpha: inf is not a finite number",
    ),
    "alpha-huge": (
        text(edited(kernel(name="entmax", alpha=1e6))),
        [],
        "kernels[0]: entmax alpha must be > 1 and ≤ 4 (α → 1 is softmax; above it training in float32",
    ),
    "k-inf": (
        text(edited(kernel(name="topk_softmax", k=float("inf")))),
        [],
        "kernels[0].k: inf is not a finite number",
    ),
    "k-fraction": (
        text(edited(kernel(name="topk_softmax", k=2.5))),
        [],
        "kernels[0]: topk_softmax k must be an integer >= 1",
    ),
    "kernel-name-number": (
        text(edited(kernel(name=5))),
        [],
        "kernels[0]: a kernel entry needs a 'name'; allowed: softmax",
    ),
    "lr-inf": (
        text(edited(lambda s: s["base"]["train"].update(lr=float("inf")))),
        [],
        "base.train.lr: inf is not a finite number",
    ),
    "adam-betas-one": (
        text(edited(lambda s: s["base"]["train"].update(adam_betas=[1.0, 0.9]))),
        [],
        "base.train.adam_betas: adam_betas must be two numbers in [0, 1); got [1.0, 0.9]",
    ),
    "precision-fp16": (
        text(edited(lambda s: s["base"]["train"].update(precision="fp16"))),
        [],
        "base.train.precision: Input should be 'bf16' or 'fp32'",
    ),
    "weight-decay-on-some": (
        text(edited(lambda s: s["base"]["train"].update(weight_decay_on="some"))),
        [],
        "base.train.weight_decay_on: Input should be 'matrices' or 'all'",
    ),
    "reference-code-maybe": (
        text(edited(lambda s: s["base"]["model"].update(reference_code="maybe"))),
        [],
        "base.model.reference_code: reference_code: true, false, lm_length or regbench; got 'maybe'",
    ),
    "compile-number": (
        text(edited(lambda s: s["base"]["train"].update(compile=1))),
        [],
        "base.train.compile: compile: true, false or auto; got 1",
    ),
    "dfa-filter-loose": (
        text(edited(lambda s: s["base"].update(task={"name": "regbench", "dfa_filter": "loose"}))),
        [],
        "base.task.dfa_filter: Input should be 'seq_icl' or 'strict'",
    ),
    "eval-factor-nan": (
        text(edited(lambda s: s["base"]["task"].update(eval_factors=[1, float("nan")]))),
        [],
        "base.task.eval_factors[1]: nan is not a finite number",
    ),
    "grid-nan": (
        text(edited(lambda s: s["grid"].update({"train.lr": [1e-3, float("nan")]}))),
        [],
        "grid.train.lr[1]: nan is not a finite number",
    ),
    "cpu-inf": (
        text(edited(lambda s: s["resources"].update(cpu=float("inf")))),
        [],
        "resources.cpu: inf is not a finite number",
    ),
    "search-range-inf": (
        text(edited(search(space={"train.lr": {"loguniform": [1e-4, float("inf")]}}))),
        [],
        "search.space.train.lr.loguniform[1]: inf is not a finite number",
    ),
    "seed-negative": (
        text(edited(lambda s: s["grid"].update(seed=[0, -1]))),
        [],
        "seed: Input should be greater than or equal to 0",
    ),
    "seed-too-large": (
        text(edited(lambda s: s["grid"].update(seed=[0, 2**64]))),
        [],
        "seed: Input should be less than or equal to 9223372036854775807",
    ),
    "seed-not-integer": (
        text(edited(lambda s: s["grid"].update(seed=[0, 1.5]))),
        [],
        "seed: Input should be a valid integer",
    ),
    "search-seeds-overflow": (
        text(edited(lambda s: (search(seeds=3)(s), s["base"].update(seed=2**63 - 2)))),
        [],
        "search.seeds: the last seed would be 9223372036854775808; seeds go up to",
    ),
    "sampler-seed": (
        text(edited(search(sampler_seed=-1))),
        [],
        "search.sampler_seed: Input should be greater than or equal to 0",
    ),
    "data-seed": (
        text(edited(lambda s: s["base"].update(task={"name": "regbench", "data_seed": -3}))),
        [],
        "base.task.data_seed: Input should be greater than or equal to 0",
    ),
    "not-utf8": (
        text(SMOKE).replace("Sort with", "Sort \xe9").encode("latin-1"),
        [],
        "not UTF-8 text (byte 0xe9 at offset",
    ),
    "duplicate-key": (
        text(SMOKE).replace("- softmax\n", "- {name: entmax, alpha: 1.5, alpha: 1.1}\n"),
        [],
        "not valid YAML: duplicate key 'alpha'",
    ),
    "duplicate-top-key": (text(SMOKE) + "name: other\n", [], "duplicate key 'name'"),
    "alias-bomb": (ALIAS_BOMB, [], "holds more than 100000 values once its aliases are followed"),
    "recursive-alias": (
        "name: x\nkernels: &k [softmax, *k]\n",
        [],
        "holds more than 100000 values",
    ),
    "not-yaml": ("name: [unclosed\n", [], "not valid YAML"),
    "not-a-mapping": (
        "- softmax\n",
        [],
        "a sweep file is a mapping with keys name, description, base, kernels",
    ),
    "empty-file": ("", [], "a sweep file is a mapping with keys name"),
    "huge-grid": (
        text(
            edited(
                lambda s: s["grid"].update(
                    {
                        "seed": list(range(216)),
                        "train.max_steps": list(range(1, 217)),
                        "train.batch_size": list(range(1, 217)),
                    }
                )
            )
        ),
        [],
        f"the sweep expands to 30233088 trials (1 cases × 3 kernel variants × 10077696 grid points); at most {MAX_TRIALS}",
    ),
    "huge-search": (
        text(edited(search(n_trials=5000, seeds=3))),
        [],
        f"search: n_trials × seeds is 15000 trials; at most {MAX_TRIALS}",
    ),
    "repeated-variant": (
        text(edited(lambda s: s["kernels"].append("biweight"))),
        [],
        "kernels[3] repeats kernels[2]: both are entmax(α=1.5)",
    ),
    "case-kernel-param": (
        text(edited(lambda s: s.update(cases=[{"model": {"kernel_params": {"alpha": 1.1}}}]))),
        [],
        "cases[0]: cannot set 'model.kernel_params.alpha'; list kernel variants in 'kernels:'",
    ),
    "case-kernel": (
        text(edited(lambda s: s.update(cases=[{"model.kernel": "entmax"}]))),
        [],
        "cases[0]: cannot set 'model.kernel'",
    ),
    "base-kernel": (
        text(edited(lambda s: s["base"]["model"].update(kernel="entmax"))),
        [],
        "base: cannot set 'model.kernel'",
    ),
    "unknown-top-key": (
        text(edited(lambda s: s.update(seeds=[0]))),
        [],
        "unknown key 'seeds'; allowed: name, description",
    ),
    "grid-repeat": (
        text(edited(lambda s: s["grid"].update(seed=[0, 0]))),
        [],
        "grid key 'seed' repeats a value",
    ),
    "n-embd-string": (
        text(edited(lambda s: s["base"]["model"].update(n_embd="64"))),
        [],
        "bad.yaml: base.model.n_embd: Input should be a valid integer",
    ),
    "lr-string": (
        text(edited(lambda s: s["base"]["train"].update(lr="0.001"))),
        [],
        "base.train.lr: Input should be a valid number",
    ),
    "grid-string": (
        text(edited(lambda s: s["grid"].update({"train.batch_size": ["8", "16"]}))),
        [],
        "train.batch_size: Input should be a valid integer",
    ),
    "cpu-string": (
        text(edited(lambda s: s["resources"].update(cpu="2"))),
        [],
        "resources.cpu: Input should be a valid number",
    ),
    "bool-number": (
        text(edited(lambda s: s["base"]["model"].update(tie_weights=1))),
        [],
        "base.model.tie_weights: Input should be a valid boolean",
    ),
    "name-too-long": (
        text(edited(lambda s: s.update(name="x" * 300))),
        [],
        "name: 'xxxxxxxxxx",
    ),
    "cuda-without-gpu": (
        text(edited(lambda s: s["base"]["train"].update(device="cuda"))),
        [],
        "has train.device cuda but resources.gpu 0, so Ray gives it no GPU",
    ),
    "test-set-beyond-memory": (
        text(edited(lambda s: s["base"]["task"].update(eval_examples=10**9))),
        [],
        "task.eval_examples × its longest evaluation length needs at least",
    ),
    "eval-examples-float": (
        text(edited(lambda s: s["base"]["task"].update(eval_examples=1e9))),
        [],
        "base.task.eval_examples: Input should be a valid integer",
    ),
    "gpus-per-trial": (
        text(SMOKE),
        ["--gpus-per-trial", "1.5"],
        "--gpus-per-trial/--cpus-per-trial: gpu: gpu 1.5: a fraction of one GPU (≤ 1) or whole GPUs",
    ),
}


# name -> (arguments after `run smoke.yaml`, what the error line must contain; {tmp} is the test's folder)
FLAGS: dict[str, tuple[list[str], str]] = {
    "out-is-a-file": (["--out", "a-file"], "--out: {tmp}/a-file is a file; give a folder"),
    "out-under-a-file": (
        ["--out", "a-file/sweep"],
        "--out: {tmp}/a-file/sweep is under the file {tmp}/a-file",
    ),
    "out-name-too-long": (["--out", "x" * 300], "--out: the name 'xxxxxxxxxx"),
    "out-dot-overwrite": (
        ["--out", ".", "--overwrite"],
        "would move aside the folder you are working in",
    ),
    "out-parent-overwrite": (
        ["--out", "..", "--overwrite"],
        "would move aside the folder you are working in",
    ),
    "out-not-a-sweep": (
        ["--out", "mine"],
        "mine is not empty and has no launch.json, so it is not the folder of a sweep",
    ),
    "overwrite-not-a-sweep": (
        ["--out", "mine", "--overwrite"],
        "is not the folder of a sweep and is left alone",
    ),
    "resume-and-overwrite": (
        ["--resume", "--overwrite"],
        "--resume continues the sweep in the folder, --overwrite starts it again",
    ),
    "resume-nothing": (
        ["--out", "nothing", "--resume"],
        "nothing holds no sweep to resume (no launch.json); run it without --resume first",
    ),
    "resume-corrupt-launch": (
        ["--out", "corrupt", "--resume"],
        "launch.json is corrupt (Expecting property name",
    ),
    "resume-mistyped-launch": (
        ["--out", "mistyped", "--resume"],
        "launch.json is corrupt (trials: Input should be a valid integer",
    ),
    "storage-bogus": (
        ["--storage", "bogus://x"],
        "--storage bogus://x: Unrecognized filesystem type in URI",
    ),
    "storage-under-a-file": (
        ["--storage", "a-file/store"],
        "--storage: {tmp}/a-file/store is under the file",
    ),
    "mlflow-bogus": (
        ["--mlflow-uri", "bogus://x"],
        "--mlflow-uri bogus://x: unknown scheme 'bogus'; allowed: sqlite:, postgresql:",
    ),
    "mlflow-sqlite-under-a-file": (
        ["--mlflow-uri", "sqlite:///a-file/mlflow.db"],
        "--mlflow-uri: {tmp}/a-file is a file",
    ),
    "mlflow-sqlite-two-slashes": (
        ["--mlflow-uri", "sqlite://x.db"],
        "write a SQLite store as sqlite:///relative.db",
    ),
    "mlflow-file-store": (
        ["--mlflow-uri", "mlruns"],
        "--mlflow-uri mlruns: MLflow 3 refuses file stores; give a database such as sqlite:///",
    ),
    "mlflow-file-scheme": (["--mlflow-uri", "file:./mlruns"], "MLflow 3 refuses file stores"),
    "mlflow-not-a-database": (
        ["--mlflow-uri", "sqlite:///a-file"],
        "--mlflow-uri sqlite:///a-file: a-file is not a SQLite database",
    ),
    "mlflow-database-is-a-folder": (
        ["--mlflow-uri", "sqlite:///mine"],
        "--mlflow-uri sqlite:///mine: mine is a directory",
    ),
    "mlflow-nothing-listens": (
        ["--mlflow-uri", "http://127.0.0.1:9"],
        "--mlflow-uri http://127.0.0.1:9: nothing answers at 127.0.0.1:9 within 3 s",
    ),
    "mlflow-bad-port": (["--mlflow-uri", "http://host:port"], "the port is not a number"),
    "mlflow-under-proc": (
        ["--mlflow-uri", "sqlite:////proc/mlflow.db"],
        "--mlflow-uri: cannot write in /proc",
    ),
    "out-under-proc": (["--out", "/proc/sweep"], "--out: cannot write in /proc"),
    "storage-under-proc": (["--storage", "/proc/store"], "--storage: cannot write in /proc"),
    "address-nothing-listens": (
        ["--address", "127.0.0.1:9"],
        "--address 127.0.0.1:9: nothing answers at 127.0.0.1:9 within 3 s",
    ),
    "resume-recorded-file-store": (
        ["--out", "filestore", "--resume"],
        "filestore/launch.json: tracking_uri mlruns: MLflow 3 refuses file stores",
    ),
    "resume-recorded-storage-in-proc": (
        ["--out", "procstore", "--resume"],
        "procstore/launch.json: storage_path: cannot write in /proc",
    ),
}


def make_obstacles(tmp: Path) -> None:
    """A file where a folder is expected, a folder of someone else's, and sweep folders with a broken launch record."""
    (tmp / "a-file").write_text("not a folder")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("precious")
    for name, launch in (
        ("corrupt", "{not json"),
        ("mistyped", '{"tracking_uri": "x", "storage_path": "y", "trials": "many"}'),
        ("filestore", '{"tracking_uri": "mlruns", "storage_path": "store", "trials": 1}'),
        ("procstore", '{"tracking_uri": "sqlite:///m.db", "storage_path": "/proc/s", "trials": 1}'),
    ):
        (tmp / name).mkdir()
        (tmp / name / "launch.json").write_text(launch)
        (tmp / name / "trials.json").write_text('{"softmax seed=0": {}}')


@pytest.fixture
def no_start(monkeypatch, tmp_path):
    """The CLI in tmp_path, unable to start Ray or a sweep without the test noticing."""
    import ray

    import orchestrator.launch
    import orchestrator.resources
    import orchestrator.sweep

    def trap(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation let this input through to Ray")

    monkeypatch.setattr(orchestrator.resources, "connect", trap)
    monkeypatch.setattr(orchestrator.launch, "connect", trap)
    monkeypatch.setattr(orchestrator.sweep, "run_sweep", trap)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    assert not ray.is_initialized()


def run_cli(args: list[str], tmp_path: Path) -> str:
    """The one error line of `mosaic-sweep <args>`, checked to be the whole output, with exit 2 and nothing created."""
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 300, (
        result.stderr[:1000]
    )
    assert sorted(tmp_path.rglob("*")) == before  # no sweeps/, no mlflow.db, nothing moved
    return lines[0]


@pytest.mark.parametrize("case", list(SWEEP_FILES))
def test_a_bad_sweep_file_is_one_line_exit_2_and_starts_nothing(tmp_path, no_start, case):
    contents, args, expected = SWEEP_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    assert expected in run_cli(["run", "bad.yaml", *args], tmp_path)


@pytest.mark.parametrize("case", list(FLAGS))
def test_bad_flags_are_one_line_exit_2_and_start_nothing(tmp_path, no_start, case):
    (tmp_path / "smoke.yaml").write_text(text(SMOKE))
    make_obstacles(tmp_path)
    args, expected = FLAGS[case]
    assert expected.format(tmp=tmp_path) in run_cli(["run", "smoke.yaml", *args], tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_out_folder_is_refused(tmp_path, no_start):
    (tmp_path / "smoke.yaml").write_text(text(SMOKE))
    (tmp_path / "locked").mkdir(mode=0o555)
    assert "--out: cannot write in" in run_cli(
        ["run", "smoke.yaml", "--out", "locked/sweep"], tmp_path
    )


def test_at_least_forty_bad_inputs_are_covered():
    assert len(SWEEP_FILES) + len(FLAGS) + len(TRAIN) >= 40


TRIAL = {
    "task": {
        "name": "sort",
        "num_symbols": 4,
        "train_min_length": 2,
        "train_max_length": 3,
        "eval_length": 3,
    },
    "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
    "train": {"max_steps": 4, "batch_size": 2},
}

# name -> (trial config text, arguments after `train trial.yaml`, what the error line must contain)
TRAIN: dict[str, tuple[str, list[str], str]] = {
    "lr-inf": (
        text({**TRIAL, "train": {"lr": float("inf")}}),
        [],
        "trial.yaml: train.lr: inf is not a finite number",
    ),
    "seed-negative": (
        text({**TRIAL, "seed": -1}),
        [],
        "trial.yaml: seed: Input should be greater than or equal to 0",
    ),
    "duplicate-key": (
        text(TRIAL) + "seed: 1\nseed: 2\n",
        [],
        "trial.yaml: not valid YAML: duplicate key 'seed'",
    ),
    "k-inf": (
        text({**TRIAL, "model": {"kernel": "topk_softmax", "kernel_params": {"k": float("inf")}}}),
        [],
        "trial.yaml: model.kernel_params.k: inf is not a finite number",
    ),
    "n-embd-string": (
        text({**TRIAL, "model": {"n_embd": "64"}}),
        [],
        "trial.yaml: model.n_embd: Input should be a valid integer",
    ),
    "resume-and-overwrite": (
        text(TRIAL),
        ["--resume", "--overwrite"],
        "--resume continues the run in the folder, --overwrite",
    ),
    "empty-checkpoint": (
        text(TRIAL),
        ["--out", "run", "--resume"],
        "checkpoint run/checkpoint/checkpoint.pt is unreadable",
    ),
    "garbage-checkpoint": (
        text(TRIAL),
        ["--out", "garbage", "--resume"],
        "checkpoint garbage/checkpoint/checkpoint.pt is unreadable",
    ),
    "out-is-a-file": (
        text(TRIAL),
        ["--out", "trial.yaml"],
        "--out: {tmp}/trial.yaml is a file; give a folder",
    ),
}


@pytest.mark.parametrize("case", list(TRAIN))
def test_bad_train_input_is_one_line_exit_2(tmp_path, monkeypatch, case):
    """`mosaic-sweep train`: the same rules; a checkpoint that cannot be resumed is one of them."""
    monkeypatch.chdir(tmp_path)
    contents, args, expected = TRAIN[case]
    (tmp_path / "trial.yaml").write_text(contents)
    for name, data in (("run", b""), ("garbage", b"PK\x03\x04 not a checkpoint")):
        (tmp_path / name / "checkpoint").mkdir(parents=True)
        (tmp_path / name / "checkpoint" / "checkpoint.pt").write_bytes(data)
    assert expected.format(tmp=tmp_path) in run_cli(["train", "trial.yaml", *args], tmp_path)


# name -> (a command line, what the error line must contain): where the other commands read and write
COMMANDS: dict[str, tuple[list[str], str]] = {
    "run-spec-is-a-folder": (["run", "mine"], "mine is a directory; give a sweep file"),
    "table-out-missing-folder": (
        ["table", "sweep", "--out", "nothing/t.md"],
        "--out: the folder nothing does not exist",
    ),
    "table-out-onto-a-folder": (["table", "sweep", "--out", "mine"], "--out: mine is a directory"),
    "table-out-under-a-file": (
        ["table", "sweep", "--out", "a-file/t.md"],
        "--out: a-file/t.md is under the file a-file",
    ),
    "table-out-in-proc": (
        ["table", "sweep", "--out", "/proc/t.md"],
        "--out: cannot write in /proc",
    ),
    "table-from-missing-database": (
        ["table", "--from-mlflow", "sqlite:///nothing.db", "--experiment", "x"],
        "--from-mlflow sqlite:///nothing.db: no such database nothing.db",
    ),
    "table-from-file-store": (
        ["table", "--from-mlflow", "mlruns", "--experiment", "x"],
        "--from-mlflow mlruns: MLflow 3 refuses file stores",
    ),
    "compare-out-a-file": (
        ["compare", "sweep", "--out", "a-file"],
        "--out: {tmp}/a-file is a file",
    ),
    "compare-out-under-a-file": (
        ["compare", "sweep", "--out", "a-file/c"],
        "--out: {tmp}/a-file/c is under the file",
    ),
    "compare-dir-a-file": (["compare", "a-file"], "DIR: {tmp}/a-file is a file"),
    "table-dir-a-file": (["table", "a-file"], "DIR: a-file is a file; give a sweep folder"),
    "plot-out-a-file": (["plot", "sweep", "--out", "a-file"], "--out: {tmp}/a-file is a file"),
    "plot-out-in-proc": (["plot", "sweep", "--out", "/proc/plots"], "--out: cannot write in /proc"),
    "prepare-out-a-file": (
        ["prepare", "stories.txt", "--out", "a-file"],
        "--out: {tmp}/a-file is a file",
    ),
    "prepare-a-folder": (["prepare", "mine", "--out", "data"], "corpus file mine is a directory"),
    "prepare-binary-text": (
        ["prepare", "binary.txt", "--out", "data"],
        "binary.txt: not UTF-8 text (byte 0xff at offset 0)",
    ),
    "prepare-binary-parquet": (
        ["prepare", "binary.parquet", "--out", "data"],
        "binary.parquet: not a Parquet file",
    ),
    "prepare-empty-corpus": (
        ["prepare", "empty.txt", "--out", "data"],
        "empty.txt: no documents (an empty corpus); nothing written",
    ),
    "train-config-is-a-folder": (["train", "mine"], "mine is a directory; give a trial's config"),
}


def make_inputs(tmp: Path) -> None:
    """A sweep folder with results, corpus files good, binary and empty, beside the obstacles."""
    make_obstacles(tmp)
    rows = [dict(task="sort", kernel_label="Gaussian", seed=0, metric="exact_match",
                 length_factor=1.0, step=1, value=1.0, status="TERMINATED")]  # fmt: skip
    write_trial_rows(tmp / "sweep", "t0", rows)
    (tmp / "stories.txt").write_text("Once upon a time.\n")
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp / "binary.parquet").write_bytes(b"\x00not parquet at all")
    (tmp / "empty.txt").write_text("")


@pytest.mark.parametrize("case", list(COMMANDS))
def test_where_the_commands_read_and_write_is_checked_first(tmp_path, no_start, case):
    """One line, exit 2, nothing written: no folder made, no file, no MLflow database."""
    make_inputs(tmp_path)
    args, expected = COMMANDS[case]
    assert expected.format(tmp=tmp_path) in run_cli(args, tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_train_on_cuda_without_cuda_is_refused_before_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trial.yaml").write_text(text(TRIAL))
    line = run_cli(["train", "trial.yaml", "--device", "cuda"], tmp_path)
    assert "--device cuda: this machine has no CUDA GPU; use cpu or auto" in line
    assert not (tmp_path / "runs").exists()


def test_no_refusal_leaves_a_folder_a_database_or_a_lock(tmp_path, no_start):
    """Every refusal above, one after another in one folder: it holds what it held before."""
    (tmp_path / "smoke.yaml").write_text(text(SMOKE))
    make_inputs(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for args, _ in [
        *((["run", "smoke.yaml", *a], e) for a, e in FLAGS.values()),
        *COMMANDS.values(),
    ]:
        CliRunner().invoke(cli.app, args)
    assert sorted(tmp_path.rglob("*")) == before
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("driver.lock"))

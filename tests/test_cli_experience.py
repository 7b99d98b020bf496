"""What a Ray Tune / MLflow user expects of the command line: fast help, plans anywhere, progress."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import COMMANDS, app
from orchestrator.cli.ui import answers
from search_spaces import bundled_sweeps
from search_spaces.expand import load_sweep

from helpers import clean_environment


@pytest.mark.parametrize("command", [[], ["run"], ["table"], ["train"], ["run", "smok"]])
def test_help_and_early_errors_import_neither_torch_nor_ray(command):
    probe = (
        "import sys\nsys.argv = ['mosaic-sweep', *sys.argv[1:]]\nfrom orchestrator.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    args = command + ([] if command[-1:] == ["smok"] else ["--help"])
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


REFUSALS = {
    "resume-and-overwrite": ["smoke", "--resume", "--overwrite"],
    "estimate-without-dry-run": ["smoke", "--estimate"],
    "out-not-a-sweep": ["smoke", "--out", "mine"],
    "resume-nothing": ["smoke", "--out", "nothing", "--resume"],
    "out-is-a-file": ["smoke", "--out", "a-file"],
    "bogus-tracking-uri": ["smoke", "--mlflow-uri", "bogus://x"],
    "bogus-storage": ["smoke", "--storage", "bogus://x"],
    "not-yaml": ["broken.yaml"],
    "not-a-mapping": ["list.yaml"],
    "unknown-sweep": ["smok"],
    "bad-key": ["bad-key.yaml"],
    "bad-kernel": ["bad-kernel.yaml"],
    "bad-value": ["bad-value.yaml"],
    "bad-override": ["smoke", "train.lr=-1"],
    "file-store": ["smoke", "--mlflow-uri", "mlruns"],
    "not-a-database": ["smoke", "--mlflow-uri", "sqlite:///list.yaml"],
    "tracking-server-silent": ["smoke", "--mlflow-uri", "http://127.0.0.1:9"],
    "address-silent": ["smoke", "--address", "127.0.0.1:9"],
    "out-in-proc": ["smoke", "--out", "/proc/sweep"],
    "spec-is-a-folder": ["mine"],
}


@pytest.mark.parametrize("args", REFUSALS.values(), ids=REFUSALS)
def test_refusals_before_any_work_import_neither_torch_ray_nor_mlflow(args, tmp_path):
    """Bad flags, folder conflicts, a bad tracking URI or a bad sweep file (its YAML, a key, a
    kernel, a value, an override): refused (one line, exit 2) with none of the heavy modules
    loaded."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- softmax\n")
    smoke = yaml.safe_load(bundled_sweeps()["smoke"].read_text())
    for name, change in [
        ("bad-key", {"bogus": 1}),
        ("bad-kernel", {"kernels": [{"name": "entmax", "alpha": 0.5}]}),
        ("bad-value", {"base": {**smoke["base"], "train": {"lr": "fast"}}}),
    ]:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**smoke, **change}))
    probe = (
        "import sys\nfrom typer.testing import CliRunner\nfrom orchestrator.cli import app\n"
        "done = CliRunner().invoke(app, ['run', *sys.argv[1:]])\n"
        "print(done.exit_code, done.stderr.count('\\n'))\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_environment(),
    )
    refused, loaded = done.stdout.strip().splitlines()[-2:]
    assert refused == "2 1", done.stdout + done.stderr
    assert loaded == "[]"


def test_an_unknown_sweep_name_lists_the_bundled_ones():
    done = CliRunner().invoke(app, ["run", "smok"])
    assert done.exit_code == 2
    assert (
        "smok: no such sweep file, nor a bundled sweep; bundled: " in done.stderr
        and "smoke" in done.stderr
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["table", "--bogus"], "No such option: --bogus"),
        (["run"], "Missing argument 'SPEC'"),
        (["ui", "--port", "x"], "Invalid value for '--port'"),
        (["table", "--format", "html"], "'html' is not one of 'md', 'latex', 'csv'"),
        (
            ["compare", "DIR", "--paper", "table3"],
            "'table3' is not one of 'table1', 'table2', 'table7'",
        ),
        (["bogus"], "No such command 'bogus'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, named):
    """click's four-line usage errors (usage, hint, blank, message) answer as one line here."""
    done = CliRunner().invoke(app, args, prog_name="mosaic-sweep")
    assert done.exit_code == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("error: ") and named in done.stderr
    assert f"see 'mosaic-sweep {args[0]} --help'" in done.stderr or args == ["bogus"]


def test_help_shows_choices_and_plain_argument_names():
    usage = CliRunner().invoke(app, ["compare", "--help"], prog_name="mosaic-sweep").stdout
    assert usage.splitlines()[0] == "Usage: mosaic-sweep compare [OPTIONS] DIR"
    assert "--paper table1|table2|table7" in usage and "{" not in usage
    assert "--format md|latex|csv" in CliRunner().invoke(app, ["table", "--help"]).stdout


@pytest.mark.parametrize("command", [c.__name__ for c in COMMANDS])
def test_each_command_help_has_plain_metavars_and_an_example(command):
    usage = CliRunner().invoke(app, [command, "--help"], prog_name="mosaic-sweep").stdout
    # typer's own: `--out <path>`, `DIR <path>`, `--by <list[str]>`
    assert re.search(r"(--[\w-]+|^\s+[A-Z]+) <", usage, re.MULTILINE) is None, usage
    examples = usage.split("Examples:\n")[1].splitlines()
    assert examples and all(line.strip().startswith(f"mosaic-sweep {command}") for line in examples)


def test_run_help_lists_the_gpu_types_and_the_overrides():
    usage = CliRunner().invoke(app, ["run", "--help"], prog_name="mosaic-sweep").stdout
    assert "--gpu-type h100|h200" in usage and "[KEY=VALUE]..." in usage
    assert "--max-concurrent N" in usage and "--gpus-per-trial F" in usage


def test_the_command_list_does_not_cut_summaries():
    listing = CliRunner().invoke(app, ["--help"]).stdout
    assert "..." not in listing.split("Commands:")[1]
    assert "on 127.0.0.1 only" in " ".join(listing.split())


def test_version_prints_the_package_version():
    done = CliRunner().invoke(app, ["--version"])
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert done.exit_code == 0
    assert done.stdout == f"mosaic-sweep {pyproject['project']['version']}\n"


def test_ui_refuses_a_busy_port_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = CliRunner().invoke(app, ["ui", str(tmp_path), "--port", str(port)])
    assert done.exit_code == 2 and done.stderr.count("\n") == 1
    assert f"--port {port}: 127.0.0.1:{port} is in use" in done.stderr


def test_ui_waits_for_the_server_to_answer(tmp_path):
    """The link is printed once the server answers, and not for a server that exits first."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    assert not answers(dead, f"http://127.0.0.1:{port}/")
    serving = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(serving, cwd=tmp_path, stderr=subprocess.DEVNULL)
    try:
        assert answers(server, f"http://127.0.0.1:{port}/") and server.poll() is None
    finally:
        server.terminate()
        server.wait()


def test_the_bare_command_shows_its_commands():
    done = CliRunner().invoke(app, [])
    assert done.exit_code == 0
    assert "Commands:" in done.stdout and all(
        name in done.stdout for name in ("run", "table", "train")
    )


@pytest.mark.parametrize("name", sorted(bundled_sweeps()))
def test_dry_run_of_every_bundled_sweep_lists_its_trials_on_this_machine(name):
    """A GPU sweep is planned on a CPU machine too: the trials, the plan, and why it cannot run here."""
    done = CliRunner().invoke(app, ["run", name, "--dry-run"])
    assert done.exit_code == 0, done.output
    trials = load_sweep(bundled_sweeps()[name]).trials
    listed = [
        line
        for line in done.stdout.splitlines()
        if line.strip()[:1].isdigit() and "  " in line.strip()
    ]
    assert len(listed) >= len(trials) and trials[-1].title() in done.stdout  # the paper's label
    assert "can run this sweep" in done.stdout or "cannot run this sweep" in done.stdout


def test_dry_run_names_missing_data_and_a_real_run_refuses_it(write_sweep, smoke_spec, tmp_path):
    spec = {
        **smoke_spec,
        "base": {
            **smoke_spec["base"],
            "task": {"name": "lm", "data_dir": str(tmp_path / "nowhere")},
        },
    }
    path = write_sweep(spec, "lm_missing")
    planned = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert (
        planned.exit_code == 0
        and f"missing data: {tmp_path / 'nowhere' / 'train.bin'}" in planned.stdout
    )
    refused = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "s")])
    assert refused.exit_code == 2 and "data file(s) a trial reads are missing" in refused.stderr
    assert not (tmp_path / "s").exists()


def test_a_trial_reports_progress_every_log_interval_steps():
    from mosaic_core.train import train_trial

    config = {
        "task": {
            "name": "sort",
            "num_symbols": 4,
            "train_min_length": 2,
            "train_max_length": 3,
            "eval_length": 3,
            "eval_examples": 8,
        },
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "train": {
            "max_steps": 20,
            "batch_size": 4,
            "warmup_steps": 0,
            "eval_interval": 10,
            "log_interval": 3,
        },
    }
    reports = []
    train_trial(
        config,
        lambda metrics, checkpoint: reports.append((metrics["step"], checkpoint is None, metrics)),
    )
    assert [(step, interim) for step, interim, _ in reports] == [
        (3, True),
        (6, True),
        (9, True),
        (10, False),
        (12, True),
        (15, True),
        (18, True),
        (20, False),
    ]
    assert all(m["tokens_per_s"] > 0 and {"train_loss", "lr"} <= set(m) for _, _, m in reports)
    assert all("exact_match_1x" not in m for _, interim, m in reports if interim)


def test_a_table_on_a_terminal_is_rendered_and_in_a_pipe_as_written(capsys, monkeypatch):
    from orchestrator.cli.common import echo_markdown

    table = "| Kernel | sort 1× |\n|---|---|\n| Gaussian | **0.99**^(<u>1.00</u>) |\n"
    echo_markdown(table)
    assert capsys.readouterr().out == table  # a pipe or a file: the Markdown the files hold
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    echo_markdown(table)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # rich's colours off
    assert "Gaussian" in shown and "0.99 (1.00)" in shown
    assert not any(markup in shown for markup in ("|---|", "<u>", "^(", "**"))

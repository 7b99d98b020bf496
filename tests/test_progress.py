"""The quiet progress lines: [ended/planned] stays right when a resume retries trials that errored."""

from __future__ import annotations

from types import SimpleNamespace

from analysis.results_store import write_trial_rows
from analysis.schema import TrialStatus
from orchestrator.progress import TrialProgress

CONFIGS = {
    "softmax seed=0": {
        "seed": 0,
        "model": {"kernel": "softmax", "kernel_params": {}},
        "train": {"max_steps": 10},
    }
}


def trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(
        trial_id=trial_id,
        config={"variant": "softmax seed=0"},
        error_file=None,
        last_result={"step": 10, "train_loss": 0.5, "time_total_s": 1.0},
    )


def test_a_retried_errored_trial_is_counted_once(tmp_path, capsys):
    row = {"task": "sort", "kernel": "softmax", "metric": "train_loss", "step": 5, "value": 1.0}
    write_trial_rows(tmp_path, "done", [{**row, "status": TrialStatus.TERMINATED}])
    write_trial_rows(tmp_path, "failed", [{**row, "status": TrialStatus.ERROR}])
    write_trial_rows(tmp_path, "cut", [{**row, "status": TrialStatus.RUNNING}])
    progress = TrialProgress(4, CONFIGS, tmp_path)
    progress.setup()  # resumed: two of four trials ended before
    # Tune retries the errored trial and continues the interrupted one
    for trial_id in ("failed", "cut"):
        progress.on_trial_start(0, [], trial(trial_id))
    progress.on_trial_complete(0, [], trial("failed"))
    progress.on_trial_error(0, [], trial("cut"))
    progress.on_trial_start(0, [], trial("new"))
    progress.on_trial_complete(0, [], trial("new"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[1/4] started  Gaussian seed=0"  # the kernel as the paper labels it
    counts = [line.split("]")[0] + "]" for line in lines]
    assert counts == ["[1/4]", "[1/4]", "[2/4]", "[3/4]", "[3/4]", "[4/4]"]  # was [5/4] at the end


def test_a_failed_trial_shows_the_last_line_of_its_error(tmp_path, capsys):
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "Failure # 1\nTraceback (most recent call last):\n  File ...\n"
        "ValueError: [model] n_embd (17) must be divisible by n_head (2)\n\n"
    )
    progress = TrialProgress(1, CONFIGS, tmp_path)
    failed = trial("t1")
    failed.error_file = str(error_file)
    progress.on_trial_error(0, [], failed)
    assert capsys.readouterr().err.strip() == (
        "[1/1] failed   Gaussian seed=0  ValueError: [model] n_embd (17) must be divisible by "
        "n_head (2)"
    )


def test_the_sweep_eta_follows_the_share_of_steps_done(tmp_path, capsys, monkeypatch):
    """4 trials of 10 steps; 60 s after the start, one trial has ended and another is at step 5:
    1.5 of 4 trials' steps in 60 s, so the other 2.5 take 100 s (a clock of our own: no waiting)."""
    import orchestrator.progress

    clock = iter([0.0, 60.0])
    monkeypatch.setattr(orchestrator.progress.time, "monotonic", lambda: next(clock))
    progress = TrialProgress(4, CONFIGS, tmp_path)
    progress.finished = {"done"}
    running = trial("t1")
    progress.on_trial_result(
        0, [], running, {"step": 5, "tokens_per_s": 1000.0, "time_total_s": 30.0}
    )
    line = capsys.readouterr().err.strip()
    assert line.endswith("ETA 30 s, sweep 100 s"), line


def test_a_progress_callback_pickled_by_an_earlier_version_resumes(tmp_path, capsys):
    """Tune keeps its callbacks pickled in the sweep folder: one without the ETA's counters."""
    import pickle

    old = TrialProgress(1, CONFIGS, tmp_path)
    del old.done, old.started
    restored = pickle.loads(pickle.dumps(old))
    restored.on_trial_result(
        0, [], trial("t1"), {"step": 5, "tokens_per_s": 1000.0, "time_total_s": 30.0}
    )
    assert "step 5/10  Gaussian seed=0" in capsys.readouterr().err

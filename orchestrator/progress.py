"""A quiet progress display for sweeps: one line when a trial starts, ends or fails.

Ray Tune's own reporter prints a table every few seconds; it is kept for `--verbose`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import rich.markup
from ray.tune import Callback
from ray.tune.experiment import Trial
from rich.console import Console

from analysis.results_store import read_results
from analysis.schema import TrialStatus
from mosaic_core.metrics import ELAPSED_S, LR, STEP, TOKENS_PER_S, TRAIN_LOSS
from orchestrator.tracking.callback import reported_metrics, stopped_step
from orchestrator.trial_configs import trial_config, trial_name

# module level: Tune pickles its callbacks; a file or pipe gets whole lines, not lines wrapped at
# 80 columns
_console = Console(stderr=True, highlight=False, soft_wrap=True)


class TrialProgress(Callback):
    def __init__(self, total: int, configs: dict[str, dict[str, Any]], sweep_dir: Path) -> None:
        self.total = total
        self.configs = configs
        self.sweep_dir = sweep_dir
        self.finished: set[str] = set()  # ids of the trials that ended
        self.done: dict[str, float] = {}  # running trial id -> share of its steps done
        self.started = (time.monotonic(), 0.0)  # (when, share of the sweep done then)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """`--resume` unpickles this callback from Tune's state: one saved by an earlier version
        lacks the sweep ETA's counters."""
        self.__dict__.update({"done": {}, "started": (time.monotonic(), 0.0), **state})

    def setup(self, **info: Any) -> None:
        """A resumed sweep counts on from the trials that already ended."""
        results = read_results(self.sweep_dir)
        last = results.groupby("trial_id")["status"].last()
        ended = [TrialStatus.TERMINATED, TrialStatus.STOPPED, TrialStatus.ERROR]
        self.finished = set(last[last.isin(ended)].index)
        self.started = (time.monotonic(), len(self.finished) / self.total)

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self.finished.discard(trial.trial_id)  # an errored trial that a resume retries runs again
        _console.print(f"[dim]{self._count()} started[/]  {trial_name(trial.config, self.configs)}")

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        """A running trial's step, loss, rate and time to go, at each `log_interval` and evaluation."""
        metrics = reported_metrics(result)
        step, rate = metrics.get(STEP), metrics.get(TOKENS_PER_S)
        if step is None or rate is None:
            return
        max_steps = trial_config(trial.config, self.configs)["train"]["max_steps"]
        seconds = result.get("time_total_s", 0.0)
        to_go = seconds / step * (max_steps - step) if step else 0.0
        self.done[trial.trial_id] = min(step / max_steps, 1.0)
        _console.print(
            f"[dim]{self._count()} step {step:.0f}/{max_steps}[/]  {trial_name(trial.config, self.configs)}  "
            f"{TRAIN_LOSS}={metrics.get(TRAIN_LOSS, float('nan')):.3g}  {rate / 1000:.3g}k tokens/s  "
            f"[dim]ETA {_duration(to_go)}{self._sweep_eta()}[/]"
        )

    def _sweep_eta(self) -> str:
        """`, sweep 12 min`: the time the sweep's remaining steps take at the pace of its steps
        so far (trials counted by their share of steps done; those before a resume left out)."""
        share = (len(self.finished) + sum(self.done.values())) / self.total
        since, share_then = self.started
        pace = (share - share_then) / max(time.monotonic() - since, 1e-9)
        return f", sweep {_duration((1 - share) / pace)}" if pace > 0 else ""

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self.finished.add(trial.trial_id)
        self.done.pop(trial.trial_id, None)
        metrics = reported_metrics(trial.last_result)
        # per-head ones ("/" in the name): MLflow
        shown = "  ".join(
            f"{key}={value:.3g}"
            for key, value in metrics.items()
            if key not in (STEP, LR, ELAPSED_S, TOKENS_PER_S) and "/" not in key
        )
        seconds = trial.last_result.get("time_total_s", 0.0)
        step = stopped_step(trial, self.configs)
        ended = (
            "[green]done[/]   "
            if step is None
            else f"[yellow]stopped[/] at step {step} by the scheduler:"
        )
        _console.print(
            f"{self._count()} {ended}  {trial_name(trial.config, self.configs)}  {shown}  [dim]({seconds:.0f} s)[/]"
        )

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self.finished.add(trial.trial_id)
        self.done.pop(trial.trial_id, None)
        _console.print(
            f"{self._count()} [red]failed[/]   {trial_name(trial.config, self.configs)}  "
            f"{failure_reason(trial.error_file)}"
        )

    def _count(self) -> str:
        return f"[{len(self.finished)}/{self.total}]"


def failure_reason(error_file: str | None) -> str:
    """The last line of a failed trial's error, the exception and its message (Ray's file keeps
    the traceback); the file's path where it cannot be read."""
    try:
        lines = Path(error_file or "").read_text().strip().splitlines()
    except OSError:
        return error_file or ""
    return rich.markup.escape(lines[-1]) if lines else error_file or ""


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )

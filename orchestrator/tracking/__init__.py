"""MLflow tracking of a sweep: `names` (every tag and key it writes), `runs` (every call to MLflow's
client), `callback` (Ray Tune's events into runs and results-store rows)."""

from typing import Any


def __getattr__(name: str) -> Any:
    """`orchestrator.tracking.SweepTracker`, where Tune's experiment state of a sweep started
    before the tracking package was split pickled its callback: such a sweep still resumes.
    Resolved lazily, so importing the light `names` module never imports Ray or MLflow."""
    if name == "SweepTracker":
        from orchestrator.tracking.callback import SweepTracker

        return SweepTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

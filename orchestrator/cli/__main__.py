"""`python -m orchestrator.cli`: the `mosaic-sweep` command."""

from orchestrator.cli import app

app()

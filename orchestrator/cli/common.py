"""What every command shares: its errors are one line on stderr, exit 2, before any work."""

from __future__ import annotations

import sys

import typer

USAGE_ERROR = 2
MAX_ERROR_CHARS = 290  # an error quotes what the user wrote: never more than a line of it


def error_line(message: str) -> None:
    """One line on stderr, at most MAX_ERROR_CHARS long."""
    line = " ".join(f"error: {message}".split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 1] + "…"
    typer.secho(line, err=True, fg=typer.colors.RED)


def fail(message: str) -> typer.Exit:
    """One line on stderr, and exit 2."""
    error_line(message)
    return typer.Exit(USAGE_ERROR)


def echo_markdown(markdown: str) -> None:
    """A table as Markdown: rendered by rich on a terminal, as written (what files hold) in a pipe
    or a file."""
    if not sys.stdout.isatty():
        typer.echo(markdown, nl=False)
        return
    # rich, the tables' rendering: only on a terminal
    from rich.console import Console
    from rich.markdown import Markdown

    from analysis.tables import rendered_markdown

    Console().print(Markdown(rendered_markdown(markdown)))

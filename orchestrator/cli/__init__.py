"""The `mosaic-sweep` command line: the app, its one-line errors, and which module holds each
command (`run`; `ui`; `train` and `prepare`; `table`, `compare`, `plot` and `status`).

torch, Ray and MLflow are imported by the commands that use them, never at start-up: `--help` and
the errors found before any work answer at once.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from orchestrator.cli import results, run, train, ui
from orchestrator.cli.common import USAGE_ERROR, error_line

COMMANDS = (
    run.run,
    ui.ui,
    train.train,
    train.prepare,
    results.table,
    results.compare,
    results.plot,
    results.status,
)


class _Command(TyperCommand):
    """typer writes a required argument as {NAME} in the usage line; write it as click and
    argparse do, NAME."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [
            piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)
        ]


class _OneLineErrors(TyperGroup):
    """click answers a usage error (an unknown option, a value not among the choices, a missing
    argument) with the usage and a hint over four lines: here it is one line, like every error the
    commands find, and exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:
            context = getattr(error, "ctx", None)
            hint = f"; see '{context.command_path} --help'" if context is not None else ""
            error_line(f"{error.format_message().rstrip('.')}{hint}")
            sys.exit(USAGE_ERROR if context is not None else error.exit_code)
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        sys.exit(code or 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Run sparse-attention kernel sweeps of Memory Mosaics with Ray Tune and MLflow.",
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode=None,
)
for _function in COMMANDS:
    app.command(cls=_Command)(_function)


@app.callback()
def main(
    context: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray's and the trials' logs.")
    ] = False,
) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if context.invoked_subcommand is None:  # a bare `mosaic-sweep` shows what it can do
        typer.echo(context.get_help())

"""The `mosaic-sweep` command line: the app, its one-line errors, and which module holds each
command (`run`; `ui`; `train` and `prepare`; `table`, `compare`, `plot` and `status`).

torch, Ray and MLflow are imported by the commands that use them, never at start-up: `--help` and
the errors found before any work answer at once.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

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


EXAMPLES = {
    "run": [
        "mosaic-sweep run smoke",
        "mosaic-sweep run smoke train.lr=1e-3 grid.seed=[0,1,2] kernels=[softmax,sparsemax]",
        "mosaic-sweep run length_generalization --dry-run --gpu-type h100",
        "mosaic-sweep run smoke --resume",
    ],
    "ui": ["mosaic-sweep ui", "mosaic-sweep ui sweeps/search --optuna --port 8080"],
    "train": ["mosaic-sweep train trial.yaml --steps 200 --device cpu"],
    "prepare": ["mosaic-sweep prepare corpus/*.txt --out data/stories"],
    "table": [
        "mosaic-sweep table sweeps/smoke --where kernel=gaussian --by seed",
        "mosaic-sweep table sweeps/smoke --format latex --out table.tex",
    ],
    "compare": ["mosaic-sweep compare sweeps/length_generalization --paper table2"],
    "plot": ["mosaic-sweep plot sweeps/smoke --format pdf,png"],
    "status": ["mosaic-sweep status sweeps/smoke"],
}


def _plain_metavar(param: TyperOption) -> str:
    """What an option's value is, as click and argparse users read it: its choices, N, F, PATH, or
    its name (typer would write <str>, <list[str]>, <int range>)."""
    described = param.type_descriptor
    if described.is_choice:
        return "|".join(map(str, described.choices or ()))
    if described.is_path:
        return "PATH"
    plain = {"int": "N", "float": "F"}
    return plain.get(param.bare_type(), (param.name or "value").upper())


class _Command(TyperCommand):
    """typer's help, as click and argparse write it: a required argument as NAME (not {NAME}),
    no <type> after a name, plain metavars, the summary in the command list never cut, and the
    command's examples at the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lines = EXAMPLES.get(self.name or "", [])
        self.epilog = "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
            elif isinstance(param, TyperOption) and not param.is_flag and param.metavar is None:
                param.metavar = _plain_metavar(param)

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [
            piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)
        ]

    def get_short_help_str(self, limit: int = 45) -> str:
        return " ".join((self.help or "").split("\n\n")[0].split())


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


def _version(shown: bool) -> None:
    """`--version`: the installed package's version (or the checkout's, run from source)."""
    if not shown:
        return
    try:
        version = importlib.metadata.version("mosaic-sweep")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        version = next(
            line.split('"')[1]
            for line in pyproject.read_text().splitlines()
            if line.startswith("version")
        )
    typer.echo(f"mosaic-sweep {version}")
    raise typer.Exit()


@app.callback()
def main(
    context: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray's and the trials' logs.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if context.invoked_subcommand is None:  # a bare `mosaic-sweep` shows what it can do
        typer.echo(context.get_help())

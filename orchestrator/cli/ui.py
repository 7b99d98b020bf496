"""`mosaic-sweep ui`: MLflow's UI on the sweeps' store, with a link per sweep to its trials; or
optuna-dashboard on a search's study."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import fail
from orchestrator.sweep_folder import (
    LAUNCH,
    MLFLOW_DB,
    OPTUNA_DB,
    SweepFolder,
    SweepFolderError,
    sqlite_uri,
)


def ui(
    sweeps_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help=f"A sweep folder, or the folder of sweeps holding {MLFLOW_DB}."
        ),
    ] = Path("sweeps"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 5000,
    optuna: Annotated[
        bool,
        typer.Option(
            "--optuna",
            help="Open optuna-dashboard on the Optuna study of the search sweep in DIR instead.",
        ),
    ] = False,
) -> None:
    """Open the MLflow UI for the sweeps' tracking store (or optuna-dashboard for a search's study), on
    127.0.0.1 only (reach it from elsewhere by port-forwarding)."""
    _check_port_free(port)
    argv, served, links = (
        _optuna_dashboard(sweeps_dir, port) if optuna else _mlflow_ui(sweeps_dir, port)
    )
    typer.echo(f"starting {served} on 127.0.0.1:{port}…", err=True)
    server = subprocess.Popen(argv)
    # a kill of this command stops its server too (Ctrl-C reaches both through the terminal)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.terminate())
    try:
        if not answers(server, f"http://127.0.0.1:{port}/"):
            raise fail(f"{served} stopped before it answered (exit code {server.returncode})")
        typer.echo(f"{served} at http://127.0.0.1:{port} (Ctrl-C stops it)")
        for link in links:
            typer.echo(f"  {link}")
        server.wait()
    except KeyboardInterrupt:  # the server got it too: let it finish
        server.wait()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait()


def _check_port_free(port: int) -> None:
    """Refuse a port something already listens on, before starting a server that would fail there."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise fail(
                f"--port {port}: 127.0.0.1:{port} is in use ({error.strerror}); give another --port"
            ) from None


def answers(server: subprocess.Popen, url: str) -> bool:
    """Wait until the server at `url` answers (True), or its process ends first (False)."""
    while server.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return True
        except urllib.error.HTTPError:  # an error page is an answer
            return True
        except OSError:
            time.sleep(0.5)
    return False


def _mlflow_ui(sweeps_dir: Path, port: int) -> tuple[list[str], str, list[str]]:
    """(command, what it serves, links): MLflow's UI on the SQLite store the sweeps in DIR logged
    to, and a link per sweep that opens on its trials."""
    if (sweeps_dir / LAUNCH).is_file():  # a sweep folder: the store it logged to
        try:
            tracking_uri = SweepFolder.open(sweeps_dir).launch.tracking_uri
        except SweepFolderError as error:
            raise fail(str(error)) from None
    elif (sweeps_dir / MLFLOW_DB).is_file():
        tracking_uri = sqlite_uri(sweeps_dir / MLFLOW_DB)
    else:
        raise fail(
            f"{sweeps_dir} holds no {MLFLOW_DB} and is not a sweep folder; give the folder that `mosaic-sweep run` wrote"
        )
    if not tracking_uri.startswith("sqlite:"):
        raise fail(f"{sweeps_dir} logs to the MLflow server {tracking_uri}; open that instead")
    # MLflow and pandas: once the folder is known to hold a store
    from orchestrator.mlflow_ui import sweep_links, ui_command

    links = sweep_links(sweeps_dir, tracking_uri, f"http://127.0.0.1:{port}")
    return (
        ui_command(tracking_uri, port),
        f"MLflow UI for {tracking_uri}",
        [
            line
            for name, link in links.items()
            for line in (f"{name}'s trials: {link.trials}", f"{name}'s charts: {link.charts}")
        ],
    )


def _optuna_dashboard(sweep_dir: Path, port: int) -> tuple[list[str], str, list[str]]:
    """(command, what it serves, no links): optuna-dashboard on the study a search sweep kept in its folder."""
    study = sweep_dir / OPTUNA_DB
    if not study.is_file():
        raise fail(
            f"{sweep_dir} holds no {OPTUNA_DB}: give the folder of a search sweep (one that kept its study "
            "at search.storage: run optuna-dashboard on that URL)"
        )
    dashboard = shutil.which(
        "optuna-dashboard", path=str(Path(sys.executable).parent)
    ) or shutil.which("optuna-dashboard")
    if dashboard is None:
        raise fail("optuna-dashboard is not installed; pip install optuna-dashboard")
    storage = sqlite_uri(study)
    command = [dashboard, storage, "--host", "127.0.0.1", "--port", str(port)]
    return command, f"optuna-dashboard for {storage}", []

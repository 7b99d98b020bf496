"""A local sweep is reachable from this machine alone: every socket its processes listen on is loopback."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time

import psutil
import pytest
import ray  # noqa: F401  (Ray ships psutil among its third-party files)
import yaml

from helpers import mosaic_sweep_command, tiny_trial

SWEEP = {
    "name": "local_only",
    "base": tiny_trial(
        eval_examples=10,
        max_steps=400,
        batch_size=4,
        warmup_steps=2,
        eval_interval=10,
        device="cpu",
    ),
    "kernels": ["softmax"],
}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def listening(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP/UDP socket of `root` and its descendants."""
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except psutil.Error:  # a process that ended meanwhile
            continue
        found += [
            (name, c.laddr.ip, c.laddr.port)
            for c in connections
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)
        ]
    return found


@pytest.mark.slow
def test_a_local_sweep_listens_on_loopback_only(tmp_path):
    (tmp_path / "local_only.yaml").write_text(yaml.safe_dump(SWEEP))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE")
    }
    driver = subprocess.Popen(
        mosaic_sweep_command("run", "local_only.yaml"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = psutil.Process(driver.pid)
    sockets: list[tuple[str, str, int]] = []
    try:
        deadline = time.time() + 180
        while (
            time.time() < deadline and driver.poll() is None
        ):  # until a trial worker runs: every Ray process is up
            sockets = listening(root)
            names = {name for name, _, _ in sockets}
            if (
                "gcs_server" in names
                and "raylet" in names
                and any(n.startswith("ray::") for n in names)
            ):
                time.sleep(2)
                sockets = listening(root)
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
    finally:
        driver.terminate()
        driver.wait(timeout=120)
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}, sockets
    exposed = [socket for socket in sockets if not is_loopback(socket[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"

"""cluster.yaml: valid for Ray's cluster launcher, and the properties it exists for.

Offline and CPU only: Ray's own schema check and default filling (`validate_config`,
`prepare_config`), then what could silently regress: the image's Ray version, autoscaling GPU
workers that fit every bundled sweep, MLflow and the dashboard on loopback only, the project
installed and the shared storage mounted on every node.
"""

from __future__ import annotations

import ast
import copy
import itertools
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from search_spaces.schema import Resources

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _worker_types(config: dict) -> dict[str, dict]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def _tokens_after(command: str, *program: str) -> list[str]:
    """The shell words that follow `program` (e.g. "mlflow", "server") in `command`."""
    words = shlex.split(command)
    for i in range(len(words) - len(program) + 1):
        if tuple(words[i : i + len(program)]) == program:
            return words[i + len(program) :]
    raise AssertionError(f"{' '.join(program)!r} not in {command!r}")


def _option(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _readme_cluster_section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Running on a Ray cluster\n(.*?)^## ", readme, re.S | re.M)
    assert match, "README.md has no '## Running on a Ray cluster' section"
    return match.group(1)


# --- Ray's own validation ---------------------------------------------------------------------


def test_cluster_yaml_passes_rays_schema(config):
    validate_config(copy.deepcopy(config))
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.update(max_worker=8), id="unknown top-level key"),
        pytest.param(lambda c: c.update(max_workers="eight"), id="max_workers not an integer"),
        pytest.param(
            lambda c: c["docker"].update(imagee="rayproject/ray:2.60.0-py311-gpu"),
            id="unknown docker key",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].pop("resources"),
            id="node type without resources",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
            id="fractional node resource",
        ),
        pytest.param(lambda c: c.update(head_node_type="nonexistent"), id="head type not defined"),
    ],
)
def test_validation_rejects_a_broken_config(config, mutate):
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(broken)


def test_commands_are_valid_bash(config):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    for key in COMMAND_KEYS:
        for command in config.get(key, []):
            result = subprocess.run([bash, "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {command!r}: {result.stderr}"


# --- image --------------------------------------------------------------------------------------


def test_image_is_the_ray_release_pinned_in_pyproject(config):
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [
        m.group(1)
        for d in dependencies
        if (m := re.fullmatch(r"ray\[[^\]]*tune[^\]]*\]==(\S+)", d.replace(" ", "")))
    ]
    assert len(pins) == 1, f"no single ray[tune]==X pin in {dependencies}"
    docker = config["docker"]
    images = {
        docker.get(key, docker.get("image")) for key in ("image", "head_image", "worker_image")
    } - {None}
    assert images
    for image in images:
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", image)
        assert match, (
            f"{image}: not a rayproject/ray:<version>-py3XX-<gpu|cuXXX> image (ray-ml is frozen)"
        )
        assert match.group(1) == pins[0], (
            f"{image} runs Ray {match.group(1)}, pyproject pins {pins[0]}"
        )
        assert (int(match.group(2)), int(match.group(3))) >= (3, 11)  # requires-python >= 3.11


# --- nodes --------------------------------------------------------------------------------------


def test_gpu_workers_autoscale(config):
    gpu_types = {
        name: node
        for name, node in _worker_types(config).items()
        if node["resources"].get("GPU", 0) >= 1
    }
    assert gpu_types, "no worker node type declares GPU resources"
    for name, node in gpu_types.items():
        assert node.get("min_workers", 0) < node["max_workers"] <= config["max_workers"], name
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "trials must not be scheduled on the head"


def test_every_bundled_sweep_fits_a_worker(config):
    """A trial whose resources no node type offers waits forever on an autoscaling cluster."""
    workers = [node["resources"] for node in _worker_types(config).values()]
    sweeps = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        wanted = Resources(**(yaml.safe_load(path.read_text()).get("resources") or {}))
        assert any(
            wanted.cpu <= node.get("CPU", 0) and wanted.gpu <= node.get("GPU", 0)
            for node in workers
        ), f"{path.name}: {wanted} fits no worker node type"


# --- nothing public: MLflow, dashboard, security group -----------------------------------------


def test_mlflow_server_on_loopback_with_a_database(config):
    head_commands = config.get("head_setup_commands", []) + config["head_start_ray_commands"]
    commands = [c for c in head_commands if "mlflow server" in c]
    assert len(commands) == 1, "the head must start exactly one MLflow server"
    assert not any(
        "mlflow server" in c
        for key in ("setup_commands", "worker_setup_commands", "worker_start_ray_commands")
        for c in config.get(key, [])
    )
    words = _tokens_after(commands[0], "mlflow", "server")
    assert _option(words, "--host") == "127.0.0.1"
    assert _option(words, "--port") == "5000"
    backend = _option(words, "--backend-store-uri")
    assert backend and backend.startswith(("sqlite:///", "postgresql://", "postgresql+")), backend
    assert "nohup" in commands[0] and re.search(r"&\s*(fi\s*)?$", commands[0]), (
        "the server must run detached"
    )


def test_dashboard_not_bound_to_all_interfaces(config):
    starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1
    host = _option(_tokens_after(starts[0], "ray", "start"), "--dashboard-host")
    assert host in (None, "127.0.0.1", "localhost")
    for key in COMMAND_KEYS:
        assert not any("0.0.0.0" in c for c in config.get(key, [])), key


def _rays_default_inbound_rules(extended_rules: list[dict]) -> list[dict]:
    """Ray's `_create_default_inbound_rules`, read from the installed Ray (which imports boto3 on
    import, absent here), applied to the config's extra rules."""
    path = Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py"
    names = {
        "_create_default_inbound_rules",
        "_create_default_intracluster_inbound_rules",
        "_create_default_ssh_inbound_rules",
    }
    functions = [
        node
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name in names
    ]
    assert {f.name for f in functions} == names, (
        f"Ray's {path} changed: re-check its security group rules"
    )
    namespace = {"itertools": itertools}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["_create_default_inbound_rules"]({"sg-cluster"}, extended_rules)


def test_only_ssh_is_open_from_outside(config):
    for name, node in config["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], (
            f"{name}: own security group, its rules unchecked"
        )
    extra = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in _rays_default_inbound_rules(extra):
        if rule.get("IpRanges") or rule.get("Ipv6Ranges") or rule.get("PrefixListIds"):
            assert (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) == (
                "tcp",
                22,
                22,
            ), rule
        else:
            assert [pair["GroupId"] for pair in rule["UserIdGroupPairs"]] == ["sg-cluster"], rule


# --- project and shared storage on every node --------------------------------------------------


def test_project_installed_on_every_node(config):
    remote = [r for r, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(remote) == 1, "the repository ('.') must be copied to the nodes"
    for name, node in config["available_node_types"].items():
        assert "worker_setup_commands" not in node, f"{name} overrides the common setup commands"
    installs = [c for c in config["setup_commands"] if "pip install" in c and remote[0] in c]
    assert installs, f"setup_commands do not pip install {remote[0]}"
    assert re.search(re.escape(remote[0]) + r"/?\[[^\]]*gpu", installs[0]), "install the gpu extra"


def _sweep_commands() -> dict[str, list[str]]:
    """The `mosaic-sweep run` commands that README's cluster section and cluster.yaml's comments
    show, each as one line: code-block lines joined at `\\`, inline code spans, comment lines."""
    readme = _readme_cluster_section()
    blocks = re.findall(r"^```\w*\n(.*?)^```", readme, re.S | re.M)
    spans = re.findall(
        r"(?<!`)`([^`]+)`(?!`)", re.sub(r"^```.*?^```", "", readme, flags=re.S | re.M)
    )
    comments = "\n".join(
        line.lstrip("# ") for line in CLUSTER_YAML.read_text().splitlines() if line.startswith("#")
    )
    found = {"README.md": [], "cluster.yaml": []}
    for source, text in [*(("README.md", block) for block in blocks), ("cluster.yaml", comments)]:
        found[source] += [
            line for line in text.replace("\\\n", " ").splitlines() if "mosaic-sweep run" in line
        ]
    found["README.md"] += [" ".join(span.split()) for span in spans if "mosaic-sweep run" in span]
    return found


def _on(path: str, mounts: set[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_shared_storage_of_the_submit_commands_is_mounted_on_every_node(config):
    for name, node in config["available_node_types"].items():
        assert "initialization_commands" not in node, (
            f"{name} overrides the common initialization commands"
        )
        assert "docker" not in node, f"{name} overrides the docker settings"
    mounts = {
        words[-1]
        for c in config["initialization_commands"]
        if re.search(r"\bmount\s+-t\b", c)
        for words in [shlex.split(c.split("||")[-1])]
    }
    binds = {o.split()[1] for o in config["docker"].get("run_options", []) if o.startswith("-v ")}
    shared = {m for m in mounts if f"{m}:{m}" in binds}
    assert shared, f"host mounts {mounts} are not bound into the containers ({binds})"

    for source, commands in _sweep_commands().items():
        assert commands, f"{source} shows no `mosaic-sweep run` for the cluster"
        for command in commands:
            words = shlex.split(command[command.index("mosaic-sweep run") :].rstrip("'\"` "))
            assert _option(words, "--address") == "auto", command
            assert _option(words, "--mlflow-uri") == "http://127.0.0.1:5000", command
            storage = _option(words, "--storage")
            assert storage and _on(storage, shared), (
                f"{source}: --storage {storage} is not on a mount of every node"
            )
            # the sweep folder (results, trials.json, the run map) must outlive the job's temporary folder
            out, cd = (
                _option(words, "--out"),
                re.search(r"\bcd\s+(\S+)\s*&&\s*mosaic-sweep run", command),
            )
            assert (out and _on(out, shared)) or (not out and cd and _on(cd.group(1), shared)), (
                f"{source}: the sweep folder of {command!r} is not on shared storage"
            )


def test_readme_section_sits_before_layout():
    headings = re.findall(r"^## .*$", (ROOT / "README.md").read_text(), re.M)
    assert headings.index("## Running on a Ray cluster") + 1 == headings.index("## Layout")
    section = _readme_cluster_section()
    for command in (
        "ray up cluster.yaml",
        "ray dashboard cluster.yaml",
        "ray attach cluster.yaml -p 5000",
        "ray job submit --address http://127.0.0.1:8265",
        "ray down cluster.yaml",
    ):
        assert command in section, command

"""The code's layout, read from its source: no import circle, every import inside a function says
why, and each MLflow tag, sweep-folder file and metric is named in one place."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from analysis.schema import RESULT_COLUMNS, TrialStatus
from mosaic_core import metrics
from mosaic_core.config import TrialConfig
from mosaic_core.tasks import LanguageModelTask, LengthGeneralizationTask, RegBenchTask
from orchestrator import sweep_folder
from orchestrator.tracking import names

from helpers import tiny_trial

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "analysis", "search_spaces", "mosaic_core")


def sources(*packages: str) -> dict[str, ast.Module]:
    """Dotted module name -> its syntax tree, for every module of the packages."""
    trees = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            trees[name] = ast.parse(path.read_text(), str(path))
    return trees


def top_level_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """The project modules a module imports when it is imported (not those under TYPE_CHECKING):
    `from package import module` imports the module, `from module import name` the module."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def test_no_import_circle_among_the_project_modules():
    trees = sources(*PACKAGES)
    graph = {name: top_level_imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module) :])}"
        if module not in done:
            for imported in graph[module]:
                visit(imported, [*path, module])
            done.add(module)

    for module in graph:
        visit(module, [])
    assert not {name for name in graph["orchestrator.resources"] if name.startswith("orchestrator")}


@pytest.mark.parametrize(
    ("module", "without"),
    [
        ("orchestrator.sweep_folder", ("mlflow", "pandas", "torch", "ray")),
        ("orchestrator.trial_configs", ("ray", "mlflow")),
        ("orchestrator.tracking.names", ("mlflow", "pandas", "torch", "ray")),
        ("mosaic_core.metrics", ("torch",)),
        ("search_spaces.schema", ("torch",)),
        ("search_spaces.yaml_io", ("torch",)),
        ("search_spaces.expand", ("torch", "ray", "mlflow")),
        ("mosaic_core.config", ("torch",)),
        ("mosaic_core.kernel_specs", ("torch",)),
    ],
)
def test_light_modules_import_no_heavy_ones(module, without):
    probe = f"import sys, {module}; print(sorted(m for m in {without!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def inner_imports(tree: ast.Module) -> Iterator[ast.stmt]:
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from (n for n in function.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def _import_or_blank(line: str) -> bool:
    return not line.strip() or line.strip().startswith(("import ", "from "))


def test_every_import_inside_a_function_says_why():
    """An import kept out of a module's top (torch, Ray, MLflow or pandas kept out of `--help` and
    the refusals) has a comment above it, or above the imports it is grouped with."""
    unexplained = []
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in inner_imports(ast.parse("\n".join(lines))):
            above = node.lineno - 2
            while above >= 0 and _import_or_blank(lines[above]):
                above -= 1
            if not lines[above].strip().startswith("#"):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unexplained == []


def string_constants(*packages: str) -> list[str]:
    """Every string in the packages' code, docstrings left out (prose may name anything)."""
    found = []
    for tree in sources(*packages).values():
        docstrings = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        }
        found += [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ]
    return found


def public_strings(module: object) -> dict[str, str]:
    return {
        key: value
        for key, value in vars(module).items()
        if key.isupper() and isinstance(value, str) and not key.startswith("_")
    }


# the tag names that are also results-store columns or trial states, which those modules spell
SHARED_WITH_THE_RESULTS = {*RESULT_COLUMNS, *TrialStatus}
MLFLOW_NAMES = {
    key: value
    for key, value in public_strings(names).items()
    # a prefix is part of other names (ray.hostname)
    if value not in SHARED_WITH_THE_RESULTS and not key.endswith("_PREFIX")
}


@pytest.mark.parametrize("value", sorted(MLFLOW_NAMES.values()))
def test_each_mlflow_tag_is_spelled_once_in_the_package(value):
    strings = string_constants(*PACKAGES)
    assert sum(value in text for text in strings) == 1, value


SWEEP_FILES = {
    value
    for key, value in public_strings(sweep_folder).items()
    if "." in value or key in ("PLOTS", "TUNE")
}


def test_the_sweep_folder_names_the_files_it_keeps():
    assert SWEEP_FILES >= {"launch.json", "trials.json", "mlflow_runs.json", "table.md"}
    assert SWEEP_FILES >= {"table-search.csv", "optuna.db", "mlflow.db", "plots", "tune"}


@pytest.mark.parametrize("value", sorted(SWEEP_FILES))
def test_each_sweep_folder_file_is_named_once(value):
    """In the modules that write and read sweep folders (search_spaces' error messages name an
    Optuna database as an example URL)."""
    strings = string_constants("orchestrator", "analysis")
    if "." in value:
        assert sum(value in text for text in strings) == 1, value
    else:  # a plain word (plots, tune) is counted where it is a whole string
        assert strings.count(value) == 1, value


@pytest.mark.parametrize("task", [LengthGeneralizationTask, RegBenchTask, LanguageModelTask])
def test_each_metric_a_task_declares_improves_in_a_known_direction(task):
    assert task.METRICS and set(task.METRICS) <= set(metrics.MODES)


@pytest.mark.parametrize(
    "task",
    [
        {"name": "mqmtar", "eval_factors": [1, 2]},
        {"name": "regbench"},
        {"name": "lm", "data_dir": "x", "ood_data_dir": "y"},
    ],
)
def test_every_metric_a_trial_reports_has_a_direction(task):
    config = TrialConfig.model_validate({**tiny_trial(), "task": task})
    for name in config.metric_names():
        kind = metrics.parse_metric_name(name.removeprefix(metrics.SELECTED_PREFIX))[0]
        assert kind in metrics.MODES, name


def test_directions_by_kind():
    """Losses and TVDs improve downwards, whatever their length, selection or position suffix."""
    assert [
        metrics.lower_is_better(name)
        for name in ("best_val_loss", "ood_loss_ema/pos64", "val_tvd", "exact_match_2x", "lr")
    ] == [True, True, True, False, False]
    assert metrics.MODEL_SELECTION == {"regbench": "val_loss"}
    assert TrialConfig.model_validate(
        {**tiny_trial(), "task": {"name": "regbench"}}
    ).task.selection() == ("val_loss", "min")


def test_a_callback_pickled_before_the_tracking_package_split_still_unpickles():
    """Tune pickles the sweep's callback into the folder: `--resume` of a sweep started before
    `orchestrator.tracking` became a package must still find `SweepTracker` there."""
    import pickle

    from orchestrator.tracking.callback import SweepTracker

    assert pickle.loads(b"corchestrator.tracking\nSweepTracker\n.") is SweepTracker


def test_no_comment_dangles_after_a_lone_closing_bracket():
    """Comments sit on their own line above the code they explain (a formatter's `)  # why` reads
    as if it explained the bracket); `# fmt: skip` markers are the formatter's own."""
    dangling = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in (*PACKAGES, "tests", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*[)\]}]+\s*#", line) and "fmt: skip" not in line
    ]
    assert dangling == []

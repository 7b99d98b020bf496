"""The paper's sweeps as YAML files, and the schema that validates and expands them."""

from pathlib import Path

SWEEPS_DIR = Path(__file__).parent


def bundled_sweeps() -> dict[str, Path]:
    """Sweep name -> file, for the YAML files installed with the package."""
    return {path.stem: path for path in sorted(SWEEPS_DIR.glob("*.yaml"))}

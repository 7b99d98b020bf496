"""The paper's Tables 1, 2 and 7 as data files (transcribed from the paper's text; each file names
its source), what each holds, and the setup of the experiment behind each (`setup.csv`). Light on purpose: the command line offers the names as choices
without importing pandas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAPER_DIR = Path(__file__).parent
SETUP_FILE = "setup.csv"  # the paper's hyperparameters per experiment, for compare's setup check


@dataclass(frozen=True)
class PaperTable:
    """A table of the paper: its data file, our layout it matches, its printed decimals, and the
    experiment of `setup.csv` that produced it."""

    file: str
    by: str
    decimals: int
    what: str
    experiment: str


PAPER_TABLES: dict[str, PaperTable] = {
    "table1": PaperTable(
        "table1.csv", "num_examples", 1, "Table 1 (RegBench: accuracy and TVD)", "table1"
    ),
    "table2": PaperTable(
        "table2.csv", "length_factor", 2, "Table 2 (length generalisation: exact match)", "length"
    ),
    "table7": PaperTable(
        "table7.csv",
        "length_factor",
        2,
        "Table 7 (length generalisation, kNN k = 16 and 32)",
        "length",
    ),
}

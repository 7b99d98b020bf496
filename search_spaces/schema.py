"""The models of a sweep file (`SweepFile`, its `resources:`, `scheduler:` and `search:`) and of a
validated, expanded sweep (`Sweep` of `Trial`s), with the short names trials go by; torch-free, so
the command line can name them before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from mosaic_core.config import TrialConfig

SWEEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a sweep's name: its folder's, its experiment's


class Resources(BaseModel):
    """Logical Ray resources per trial, or per worker of a data-parallel trial: `gpu: 0.25` packs
    four trials on one GPU; `workers: 4` trains each trial on four workers through Ray Train."""

    model_config = ConfigDict(extra="forbid", strict=True)
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    workers: int = Field(
        1, ge=1, description="data-parallel workers per trial; cpu and gpu are per worker"
    )
    placement: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="a trial's workers on as few nodes as possible (PACK) or on as many (SPREAD)",
    )

    @field_validator("gpu")
    @classmethod
    def _shareable(cls, gpu: float) -> float:
        if gpu > 1 and not gpu.is_integer():
            raise ValueError(
                f"gpu {gpu:g}: a fraction of one GPU (≤ 1) or whole GPUs; Ray cannot split several"
            )
        return gpu


class Scheduler(BaseModel):
    """ASHA: at every rung (grace_period × reduction_factor^i steps) only the best 1/reduction_factor go on."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Literal["asha"]
    metric: str | None = Field(None, description="default: the search's metric")
    mode: Literal["min", "max"] | None = None
    grace_period: int = Field(1, ge=1, description="training steps before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1)


# choice: [values…]; the others: [low, high]
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


class Search(BaseModel):
    """An Optuna search: `n_trials` suggestions, each trained once per seed; the mean over seeds is the score."""

    model_config = ConfigDict(extra="forbid", strict=True)
    metric: str
    mode: Literal["min", "max"]
    n_trials: int = Field(ge=1, description="suggestions")
    seeds: int = Field(1, ge=1, description="seeds per suggestion: seed, seed + 1, …")
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_seed: int = Field(
        0, ge=0, lt=2**32, description="Optuna's sampler seed (NumPy's range)"
    )
    storage: str | None = Field(
        None, description="Optuna storage URL; default sqlite in the sweep folder"
    )
    space: dict[str, dict[str, list[Any]]] = Field(min_length=1)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=SWEEP_NAME)
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    kernels: list[str | dict[str, Any]] = Field(min_length=1)
    cases: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(
        1, ge=0, description="retries of a failing trial, each from its last checkpoint"
    )
    scheduler: Scheduler | None = None
    search: Search | None = None

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class Trial:
    """One expanded grid point: its validated config and the keys that tell it from its siblings."""

    config: TrialConfig
    varying: dict[str, Any]
    kernel_label: str  # the paper's row label: `Biweight`
    workers: int | None = None  # its case's resources.workers; None: the sweep's

    def describe(self) -> str:
        """A short unique name, as files key the trial: `entmax(α=4/3) seed=0`."""
        return describe_varying(self.varying)

    def title(self) -> str:
        """The name a person reads, the kernel as the paper labels it: `Triweight seed=0`."""
        model = self.config.model
        return readable_variant(
            self.describe(), model.kernel, model.kernel_params, self.kernel_label
        )


@dataclass(frozen=True)
class Sweep:
    """A validated sweep. With `search`, `trials` are the variants a suggestion starts from (one
    when the file fixes the kernel; several become a categorical choice for the search)."""

    name: str
    description: str
    resources: Resources
    trials: list[Trial]
    kernel_labels: list[str] = field(default_factory=list)  # table rows: as written in the file
    planned_seeds: int = 1
    max_failures: int = 1
    scheduler: Scheduler | None = None
    search: Search | None = None

    def trial_resources(self, trial: Trial) -> Resources:
        """`resources:` with the trial's own worker count (its case's `resources.workers`), if it has one."""
        return (
            self.resources
            if trial.workers is None
            else self.resources.model_copy(update={"workers": trial.workers})
        )

    @property
    def widest(self) -> Resources:
        """The resources of the trial with the most workers: the hardest one to place."""
        return max(
            (self.trial_resources(trial) for trial in self.trials),
            key=lambda resources: resources.workers,
        )

    @property
    def num_trials(self) -> int:
        """Ray Tune trials the sweep runs: grid points, or suggestions × seeds."""
        return self.search.n_trials * self.search.seeds if self.search else len(self.trials)

    @property
    def metric(self) -> tuple[str, str] | None:
        """(metric, mode) that ranks trials, for the scheduler and the search."""
        if self.search:
            return self.search.metric, self.search.mode
        if self.scheduler:
            return self.scheduler.metric, self.scheduler.mode
        return None


def kernel_variant(name: str, params: dict[str, float]) -> str:
    """A kernel variant as a trial's file name has it: `entmax(α=1.5)`, `softmax`."""
    return f"{name}({', '.join(show(p, v) for p, v in params.items())})" if params else name


def readable_variant(variant: str, kernel: str, params: dict[str, float], label: str) -> str:
    """A trial's variant name with the kernel as the paper labels it (`Biweight seed=0`)."""
    return variant.replace(kernel_variant(kernel, params), label, 1)


def describe_varying(varying: dict[str, Any]) -> str:
    """`entmax(α=4/3) seed=0`: a trial's values that tell it from its siblings."""
    return " ".join(show(key, value) for key, value in varying.items())


def show(key: str, value: Any) -> str:
    """`α=1.5`, `seed=0`, or a kernel variant as it is."""
    if key == "kernel":
        return str(value)
    return (
        f"{PARAMETER_SYMBOLS.get(key, key)}={_exact(value) if isinstance(value, float) else value}"
    )


PARAMETER_SYMBOLS = {"alpha": "α", "gamma": "γ"}  # kernel parameters as the paper writes them


def _exact(value: float) -> str:
    """Short and exact, so names stay unique: `1.5`, `4/3` (α of triweight), else the full repr."""
    if float(f"{value:g}") == value:
        return f"{value:g}"
    fraction = Fraction(value).limit_denominator(12)
    return (
        f"{fraction.numerator}/{fraction.denominator}" if float(fraction) == value else repr(value)
    )

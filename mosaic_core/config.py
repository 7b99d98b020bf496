"""The configuration of one trial: validated before any work starts, unknown keys rejected."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mosaic_core.kernels import resolve_kernel


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Strict):
    """A length-generalisation task (SPEC §4): trained on short sequences, evaluated on longer ones."""

    name: Literal["sort", "reverse", "copy"] = "sort"
    num_symbols: int = Field(32, ge=2, description="source symbols 0..num_symbols-1")
    train_min_length: int = Field(32, ge=1)
    train_max_length: int = Field(64, ge=1)
    eval_length: int = Field(64, ge=1, description="the 1× length that eval_factors multiply")
    eval_factors: list[float] = Field(default_factory=lambda: [1.0])
    eval_examples: int = Field(1000, ge=1)
    eval_batch_size: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _lengths(self) -> TaskConfig:
        if self.train_min_length > self.train_max_length:
            raise ValueError(
                f"train_min_length ({self.train_min_length}) exceeds train_max_length ({self.train_max_length})"
            )
        if not self.eval_factors or any(f <= 0 for f in self.eval_factors):
            raise ValueError(f"eval_factors must be a non-empty list of positive numbers; got {self.eval_factors}")
        return self


class ModelConfig(_Strict):
    """Memory Mosaics (SPEC §3). The contextual memory's kernel is any kernel of SPEC §2."""

    n_layer: int = Field(2, ge=1)
    n_embd: int = Field(128, ge=1)
    n_head: int = Field(4, ge=1)
    pmem_size: int | None = Field(None, ge=1, description="persistent memory slots; default 3.5·n_embd")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on each memory's output, before the residual sum")
    embd_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on the token embeddings")
    prenorm: bool = Field(True, description="pre-LN blocks (x + f(ln(x))); False for post-LN (ln(x + f(x)))")
    tie_weights: bool = Field(True, description="the output head is the token embedding")
    vocab_size: int | None = Field(None, ge=1, description="default: the task's; larger pads (e.g. 50304)")
    kernel: str = "softmax"
    kernel_params: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        resolve_kernel(self.kernel, **self.kernel_params)
        return self

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class TrainConfig(_Strict):
    """AdamW with linear warmup and cosine decay (SPEC §5)."""

    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    eval_interval: int = Field(500, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(False, description="torch.compile the model for training")

    @field_validator("min_lr")
    @classmethod
    def _min_lr(cls, v: float, info: Any) -> float:
        lr = info.data.get("lr")
        if lr is not None and v > lr:
            raise ValueError(f"min_lr ({v}) exceeds lr ({lr})")
        return v


class TrialConfig(_Strict):
    """Everything one trial needs: with the same config and seed a trial is reproducible."""

    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}; what MLflow params and dotted sweep keys are made of."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def describe_validation_error(
    error: ValidationError, model: type[BaseModel], source: str, prefix: str = ""
) -> str:
    """The first problem of a pydantic error as one line naming the key and what is allowed."""
    errors = error.errors()
    # a misspelt key shows up twice: as unknown, and as its correct spelling missing; name the typo
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(part) for part in first["loc"]]
    key = prefix + ".".join(loc) if loc else "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(model, loc[:-1]))
        return f"{source}: unknown key '{key}'; allowed: {allowed}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: {key}: {message}"


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)

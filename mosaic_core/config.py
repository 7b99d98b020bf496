"""The configuration of one trial: validated before any work starts, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mosaic_core.kernel_specs import resolve_kernel
from mosaic_core.metrics import (
    ACCURACY,
    EXACT_MATCH,
    EXACT_MATCH_WITH_EOS,
    MODEL_SELECTION,
    OOD_LOSS,
    QUERY_ACCURACY,
    SELECTED_PREFIX,
    SUPPORT_SIZE,
    TRAIN_LOSS,
    TVD,
    VAL_ACCURACY,
    VAL_LOSS,
    VAL_TVD,
    length_metric_name,
    mode,
)
from mosaic_core.reference_code import FAMILIES, family_of_task

MAX_SEED = 2**63 - 1  # seeds are stored as int64 (results schema); NumPy takes none below 0


class _Strict(BaseModel):
    """Unknown keys refused, and no value converted: `n_embd: "64"` is a string, not a number (an
    integer still goes where a float does)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LengthTaskConfig(_Strict):
    """A length-generalisation task (SPEC §4): trained on short sequences, evaluated on longer ones."""

    name: Literal["sort", "reverse", "copy", "mqmtar"] = "sort"
    num_symbols: int = Field(
        32, ge=2, description="symbols (MQMTAR: letters); default 32, and 256 for mqmtar"
    )
    kv_vocab_size: int | None = Field(
        None,
        ge=1,
        description="MQMTAR: key words and value words each split draws "
        "(Vasylenko et al.'s vocab_size); default 10 000, or all words of fewer letters",
    )
    train_min_length: int = Field(32, ge=1)
    train_max_length: int = Field(64, ge=1)
    eval_length: int = Field(64, ge=1, description="the 1× length that eval_factors multiply")
    eval_factors: list[float] = Field(default_factory=lambda: [1.0])
    eval_examples: int = Field(1000, ge=1)
    eval_batch_size: int = Field(100, ge=1)
    eval_max_tokens: int = Field(
        2**16, ge=1, description="tokens per evaluation batch: long lengths go in chunks"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_symbols(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("num_symbols") is None
            and data.get("name") == "mqmtar"
        ):
            return {**data, "num_symbols": 256}
        return data

    @model_validator(mode="after")
    def _lengths(self) -> LengthTaskConfig:
        if self.train_min_length > self.train_max_length:
            raise ValueError(
                f"train_min_length ({self.train_min_length}) exceeds train_max_length ({self.train_max_length})"
            )
        if not self.eval_factors or any(f <= 0 for f in self.eval_factors):
            raise ValueError(
                f"eval_factors must be a non-empty list of positive numbers; got {self.eval_factors}"
            )
        if (
            self.name == "mqmtar"
            and self.kv_vocab_size is not None
            and self.kv_vocab_size > self.num_symbols**2
        ):
            raise ValueError(
                f"kv_vocab_size ({self.kv_vocab_size}) exceeds the {self.num_symbols}² two-letter words"
            )
        return self

    @property
    def key_value_words(self) -> int:
        """The size of each MQMTAR split's key (and value) vocabulary."""
        return self.kv_vocab_size or min(10_000, self.num_symbols**2)

    def metric_names(self) -> list[str]:
        """The scalar metrics every evaluation reports (schedulers and searches pick one)."""
        kinds = [EXACT_MATCH, EXACT_MATCH_WITH_EOS, SUPPORT_SIZE] + (
            [QUERY_ACCURACY] if self.name == "mqmtar" else []
        )
        return [length_metric_name(kind, factor) for kind in kinds for factor in self.eval_factors]

    def selection(self) -> None:
        """No model selection: the paper reports the trained model (the last evaluation)."""
        return None

    def required_files(self) -> list[Path]:
        """Files a trial reads: none, its data is generated."""
        return []


class RegBenchConfig(_Strict):
    """In-context learning of random regular languages (RegBench, Akyürek et al. 2024; SPEC §4)."""

    name: Literal["regbench"]
    num_examples: int = Field(1000, ge=1, description="training DFAs (the paper: 1k … 40k)")
    num_val: int = Field(500, ge=1)
    num_test: int = Field(500, ge=1)
    data_seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="fixes the DFAs of every split, the same for all trial seeds",
    )
    eval_batch_size: int = Field(32, ge=1)
    dfa_filter: Literal["seq_icl", "strict"] = Field(
        "seq_icl",
        description="seq_icl keeps every minimised, trimmed draw as seq_icl does (fewer than 4 "
        "states, self-loops and repeated targets included; duplicates not removed, not even across "
        "splits); strict redraws those and keeps every DFA of every split distinct (SPEC §4)",
    )

    def metric_names(self) -> list[str]:
        evaluated = [ACCURACY, TVD, VAL_ACCURACY, VAL_TVD, VAL_LOSS]
        return [
            *evaluated,
            *(f"{SELECTED_PREFIX}{name}" for name in evaluated),
            length_metric_name(SUPPORT_SIZE, 1),
        ]

    def selection(self) -> tuple[str, str]:
        """Model selection as Table 5's caption: report the evaluation with the lowest val_loss."""
        metric = MODEL_SELECTION[self.name]
        return metric, mode(metric)

    def required_files(self) -> list[Path]:
        """Files a trial reads: none, its languages are generated."""
        return []


class LanguageModelConfig(_Strict):
    """Language modelling on a corpus prepared by `mosaic-sweep prepare` (BabiStories; SPEC §4)."""

    name: Literal["lm"]
    data_dir: str = Field(description="folder with train.bin and val.bin (uint16 GPT-2 tokens)")
    context: int = Field(512, ge=2, description="tokens per training window")
    eval_batches: int = Field(
        20, ge=1, description="validation windows = eval_batches × eval_batch_size"
    )
    eval_batch_size: int = Field(16, ge=1)
    ood_data_dir: str | None = Field(
        None,
        description="another corpus for the per-position OOD loss, "
        "prepared with --val-fraction 1 (its val.bin is read)",
    )

    def metric_names(self) -> list[str]:
        return [
            VAL_LOSS,
            *([OOD_LOSS] if self.ood_data_dir else []),
            length_metric_name(SUPPORT_SIZE, 1),
        ]

    def selection(self) -> None:
        """No model selection: Figure 2 plots the whole validation curve."""
        return None

    def required_files(self) -> list[Path]:
        """The token files `mosaic-sweep prepare` writes, which a trial reads."""
        files = [Path(self.data_dir) / "train.bin", Path(self.data_dir) / "val.bin"]
        return files + ([Path(self.ood_data_dir) / "val.bin"] if self.ood_data_dir else [])


TaskConfig = Annotated[
    LengthTaskConfig | RegBenchConfig | LanguageModelConfig, Field(discriminator="name")
]


class ModelConfig(_Strict):
    """Memory Mosaics (SPEC §3). The contextual memory's kernel is any kernel of SPEC §2."""

    n_layer: int = Field(2, ge=1)
    n_embd: int = Field(128, ge=1)
    n_head: int = Field(4, ge=1)
    pmem_size: int | None = Field(
        None, ge=1, description="persistent memory slots; default 3.5·n_embd"
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="on each memory's output, before the residual sum"
    )
    attn_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="on the attention weights of the persistent "
        "and (see contextual_attn_dropout) the contextual memory; the reference runs: 0.05",
    )
    contextual_attn_dropout: bool = Field(
        True,
        description="attn_dropout also drops the contextual memory's kernel "
        "weights (MemoryMosaics' model, the paper's RegBench code); the paper's "
        "LM and length code (memory_mosaics_eft.py) never applies it: false",
    )
    normrelu_bandwidth: Literal["fixed", "head"] = Field(
        "fixed",
        description="normrelu weights: 'fixed' = [cos/γ + b]_+ with kernel_params γ, b on unit keys (the "
        "paper's code; γ = 1, b = 0); 'head' = eq. (11) of the text, Epanechnikov of each head's h = 1/β",
    )
    attention_backend: Literal["auto", "reference", "fast", "adasplash"] = Field(
        "auto",
        description="the contextual memory's attention: our fused kernels on CUDA (auto, fast), the "
        "dense reference, or AdaSplash's kernels for sparsemax and α-entmax (the paper's; no attention dropout)",
    )
    reference_code: bool | Literal["lm_length", "regbench"] = Field(
        False,
        description="reproduce the paper's code where it departs from its text (README, Fidelity): "
        "lm_length = memory_mosaics_eft.py (keys ≤ t−2 for normrelu, relumax and uniform kNN; "
        "float32 keys and values into the entmax family), regbench = seq_icl's model (ReLUmax "
        "and normReLU on β⁴·cos); true = the one the task's paper experiment ran",
    )
    embd_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on the token embeddings")
    prenorm: bool = Field(
        True, description="pre-LN blocks (x + f(ln(x))); False for post-LN (ln(x + f(x)))"
    )
    tie_weights: bool = Field(True, description="the output head is the token embedding")
    vocab_size: int | None = Field(
        None, ge=1, description="default: the task's; larger pads (e.g. 50304)"
    )
    kernel: str = "softmax"
    kernel_params: dict[str, float] = Field(default_factory=dict)

    @field_validator("reference_code", mode="before")
    @classmethod
    def _reference_code(cls, value: Any) -> Any:
        if not (isinstance(value, bool) or value in FAMILIES):
            raise ValueError(f"reference_code: true, false, lm_length or regbench; got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        kernel, _ = resolve_kernel(self.kernel, **self.kernel_params)
        if (
            self.attention_backend == "adasplash"
            and self.attn_dropout > 0
            and self.contextual_attn_dropout
        ):
            raise ValueError(
                f"attention_backend 'adasplash' cannot drop attention weights (attn_dropout "
                f"{self.attn_dropout:g}); use 'fast' or 'reference', or contextual_attn_dropout: false"
            )
        if self.reference_family == "regbench" and kernel == "normrelu" and self.kernel_params:
            raise ValueError(
                "reference_code regbench sets normrelu's gamma and b from each head's β (as seq_icl's "
                f"model): it takes no kernel_params; got {self.kernel_params}"
            )
        if self.normrelu_bandwidth == "head" and (kernel != "normrelu" or self.kernel_params):
            raise ValueError(
                "normrelu_bandwidth 'head' sets normrelu's gamma and b from each head's β: it needs "
                f"kernel normrelu without kernel_params; got kernel {self.kernel!r} {self.kernel_params}"
            )
        return self

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def reference_family(self) -> str | None:
        """Which paper code `reference_code` reproduces: None (the text), lm_length or regbench.
        A bare `true` is resolved from the task by TrialConfig; a model alone takes lm_length."""
        if self.reference_code is True:
            return "lm_length"
        return self.reference_code or None


class TrainConfig(_Strict):
    """AdamW with linear warmup and cosine decay (SPEC §5)."""

    max_steps: int = Field(1000, ge=1)
    max_epochs: int | None = Field(
        None,
        ge=1,
        description="tasks with a fixed training set (regbench): train "
        "this many epochs over it; sets max_steps",
    )
    batch_size: int = Field(32, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    lr_decay_steps: int | None = Field(
        None,
        ge=1,
        description="step where the cosine reaches min_lr, which then "
        "holds (the reference's lr_decay_iters); default max_steps",
    )
    weight_decay: float = Field(0.1, ge=0)
    weight_decay_on: Literal["matrices", "all"] = Field(
        "matrices",
        description="AdamW decays ≥2-D parameters only (the LM and length code), or every "
        "parameter, β, λ and LayerNorm weights too (seq_icl, RegBench)",
    )
    adam_betas: tuple[float, float] = Field(
        (0.9, 0.95),
        # a list, as YAML and JSON write a pair (its numbers stay strict)
        strict=False,
        description="AdamW's (β1, β2): (0.9, 0.95) in the LM and length code, (0.9, 0.999) in seq_icl",
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="bf16 autocast on CUDA (the LM and length code) or float32 throughout (seq_icl)",
    )
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    eval_interval: int = Field(500, ge=1)
    log_interval: int = Field(
        100,
        ge=0,
        description="report train_loss, lr and tokens/s every this many steps "
        "between evaluations (no checkpoint); 0: only at evaluations",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model for training: true, false, or auto "
        "(compiled on CUDA, where it is measured faster; eager on the CPU)",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode when the model is compiled"
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"compile: true, false or auto; got {value!r}")
        return value

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1); got {list(betas)}")
        return betas

    @field_validator("min_lr")
    @classmethod
    def _min_lr(cls, v: float, info: Any) -> float:
        lr = info.data.get("lr")
        if lr is not None and v > lr:
            raise ValueError(f"min_lr ({v}) exceeds lr ({lr})")
        return v


class TrialConfig(_Strict):
    """Everything one trial needs: with the same config and seed a trial is reproducible."""

    seed: int = Field(0, ge=0, le=MAX_SEED)
    task: TaskConfig = Field(default_factory=LengthTaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _steps_from_epochs(cls, data: Any) -> Any:
        """train.max_epochs over a fixed training set sets train.max_steps (a disagreeing one is an error)."""
        train, task = (
            (data.get("train"), data.get("task")) if isinstance(data, dict) else (None, None)
        )
        if not (
            isinstance(train, dict)
            and train.get("max_epochs")
            and isinstance(task, dict)
            and task.get("name") == "regbench"
        ):
            return data
        # batches per epoch, the last smaller
        batches = -(-task.get("num_examples", 1000) // train.get("batch_size", 32))
        steps = -(-train["max_epochs"] * batches // train.get("grad_accum_steps", 1))
        if train.get("max_steps", steps) != steps:
            raise ValueError(
                f"train.max_steps ({train['max_steps']}) disagrees with train.max_epochs "
                f"({train['max_epochs']} epochs = {steps} steps); set one of them"
            )
        return {**data, "train": {**train, "max_steps": steps}}

    @model_validator(mode="before")
    @classmethod
    def _reference_code_of_the_task(cls, data: Any) -> Any:
        """`model.reference_code: true` means the code that ran this task's paper experiment."""
        model, task = (
            (data.get("model"), data.get("task")) if isinstance(data, dict) else (None, None)
        )
        if not (isinstance(model, dict) and model.get("reference_code") is True):
            return data
        name = task.get("name") if isinstance(task, dict) else getattr(task, "name", None)
        return {**data, "model": {**model, "reference_code": family_of_task(name)}}

    @model_validator(mode="after")
    def _epochs_need_a_fixed_training_set(self) -> TrialConfig:
        if self.train.max_epochs is not None and not isinstance(self.task, RegBenchConfig):
            raise ValueError(
                f"train.max_epochs needs a task with a fixed training set (regbench); "
                f"task {self.task.name!r} generates fresh data: set train.max_steps"
            )
        return self

    def metric_names(self) -> list[str]:
        """What `train_trial` reports at every evaluation, besides per-head diagnostics."""
        return [TRAIN_LOSS, *self.task.metric_names()]


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
    keys, inner = _walk(model, [str(part) for part in first["loc"]])
    if first["type"] in (
        "union_tag_invalid",
        "union_tag_not_found",
    ):  # the key at fault is the tag itself
        keys.append(first["ctx"]["discriminator"].strip("'"))
    key = prefix + ".".join(keys) if keys else "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; allowed: {', '.join(inner.model_fields)}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: {key}: {message}"


def _walk(model: type[BaseModel], loc: list[str]) -> tuple[list[str], type[BaseModel]]:
    """The user's dotted key for an error location, and the model the last key belongs to.

    Pydantic puts a discriminated union's tag into the location (`task.sort.n_symbols`); the
    user wrote `task.n_symbols`, so the tag is skipped and selects the member.
    """
    keys, position, current = [], 0, model
    while position < len(loc):
        name = loc[position]
        keys.append(name)
        position += 1
        field = current.model_fields.get(name) if position < len(loc) else None
        if field is None:
            continue
        members = [
            m
            for m in get_args(field.annotation) or (field.annotation,)
            if isinstance(m, type) and issubclass(m, BaseModel)
        ]
        if len(members) == 1:
            current = members[0]
        elif members:
            tag = loc[position]
            position += 1
            current = next(m for m in members if tag in get_args(m.model_fields["name"].annotation))
    return keys, current

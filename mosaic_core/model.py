"""Memory Mosaics (Zhang et al., 2025): a transformer-like network of associative memories.

The contextual memory *is* a Nadaraya–Watson estimator: the query is the key itself (a leaky
average of past inputs) and the stored values look one step ahead, so attending to keys j ≤ t−1
predicts x_{t+1} from the situations that resembled the present one. The kernel that weighs the
past is the object of study; everything else follows SPEC §3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mosaic_core.attention import MASK_LAGS, attend, causal_mask
from mosaic_core.config import ModelConfig
from mosaic_core.kernel_specs import resolve_kernel
from mosaic_core.kernels import kernel_diagnostics
from mosaic_core.leaky_average import leaky_average
from mosaic_core.reference_code import BETA4_KERNELS, FLOAT32_KERNELS, LAG2_KERNELS

_MAX_LOG_BETA = 5.0  # β = exp(min(10·param, 5)): caps the kernel's sharpness at e^5
# the persistent memory's output gain min(e^{10·v}, 5), as the reference
_MAX_PMEM_GAIN = 5.0


def _sharpness(param: Tensor) -> Tensor:
    return torch.exp(torch.clamp(10 * param, max=_MAX_LOG_BETA))


class LeakyAverageKey(nn.Module):
    """k̃_t = Σ_{j≤t} e^{−λ_h (t−j)} W x_j per head, then L2-normalised (so its scale is irrelevant)."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        # λ_h = 10·|leaky_key_beta_h| spans 0.5 … 5: heads remember from a few steps to one
        self.leaky_key_beta = nn.Parameter(torch.linspace(0.05, 0.5, n_head))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, n_embd = x.shape
        k = self.proj(x).view(batch, length, self.n_head, n_embd // self.n_head).transpose(1, 2)
        # (B, H, T, d), float32: a chunked scan, linear in T (mosaic_core.leaky_average)
        return F.normalize(leaky_average(k, 10 * self.leaky_key_beta.abs()), dim=-1)


class ContextualMemory(nn.Module):
    """Kernel regression over the sequence so far: keys j ≤ t−1 vote with values v_j ≈ x_{j+1}."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.kernel, self.kernel_params = resolve_kernel(config.kernel, **config.kernel_params)
        self.key = LeakyAverageKey(config.n_embd, config.n_head)
        self.value = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kernel_beta = nn.Parameter(torch.full((config.n_head,), 0.1))
        self.value_beta = nn.Parameter(torch.full((config.n_head,), -0.05))
        self.lookahead_mix = nn.Parameter(torch.rand(config.n_head))  # c_h ~ U(0, 1)
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.attn_dropout if config.contextual_attn_dropout else 0.0
        self.head_bandwidth = config.normrelu_bandwidth == "head"
        self.backend = config.attention_backend
        quirks = config.reference_family
        # the paper's LM/length code gives these three kernels keys j ≤ t − 2 (SPEC §3)
        lagged = quirks == "lm_length" and self.kernel in LAG2_KERNELS
        self.mask_mode = "causal_lag2" if lagged else "strict_causal"
        # seq_icl's model scores ReLUmax and normReLU on β-scaled keys, then divides by γ ∝ 1/β²
        self.key_power = 2 if quirks == "regbench" and self.kernel in BETA4_KERNELS else 1
        # its LM/length code feeds the entmax family float32 keys and values
        self.float32_inputs = quirks == "lm_length" and self.kernel in FLOAT32_KERNELS

    def kernel_inputs(self, x: Tensor) -> tuple[Tensor, dict[str, Any], Tensor]:
        """The keys the kernel compares (the query is the key itself), the kernel's parameters, and
        the temperature T of the scores s = k̂_t·k̂_j / T.

        Scores are β² cos(k̃_t, k̃_j) (no 1/√d), except for normrelu in its 'fixed' form, which the
        paper's code computes on the cosines themselves: [cos/γ + b]_+, normalised.
        """
        unit = self.key(x)
        beta = _sharpness(self.kernel_beta)[:, None, None]
        head_bandwidth = self.head_bandwidth or self.key_power == 2
        if self.kernel == "normrelu" and not head_bandwidth:
            return unit, self.kernel_params, torch.ones_like(beta)
        params = self.kernel_params
        if self.kernel == "normrelu":  # eq. (11): Epanechnikov of h = 1/β, weight [1 − 2(β² − s)]_+
            params = {"gamma": 0.5, "b": 1 - 2 * beta**2}
        scale = beta**self.key_power
        return unit * scale, params, 1 / scale**2

    def forward(self, x: Tensor) -> Tensor:
        batch, length, n_embd = x.shape
        k, params, _ = self.kernel_inputs(x)
        v = self.value(x).view(batch, length, self.n_head, -1).transpose(1, 2)
        v_next = F.pad(v[:, :, 1:], (0, 0, 0, 1))  # W_v x_{t+1}; zero past the last position
        c = self.lookahead_mix[:, None, None]
        v = (
            F.normalize((1 - c) * v_next + c * v, dim=-1)
            * _sharpness(self.value_beta)[:, None, None]
        )
        if torch.is_autocast_enabled(x.device.type) and not self.float32_inputs:
            # normalize() left them in float32: the fast kernels must see the autocast dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            k, v = k.to(dtype), v.to(dtype)
        y = attend(
            k,
            k,
            v,
            self.kernel,
            mask_mode=self.mask_mode,
            backend=self.backend,
            dropout_p=self.attn_dropout if self.training else 0.0,
            **params,
        )
        return self.dropout(self.out(y.transpose(1, 2).reshape(batch, length, n_embd)))

    @torch.no_grad()
    def diagnose(self, x: Tensor, chunk: int = 256) -> dict[str, Tensor]:
        """Per head: mean support size, fraction of zero weights among the allowed keys, mean
        kernel bandwidth h (in ‖k̂ − q̂‖ units; NaN where the kernel has none) and β.

        Computed from the reference weights, a block of queries at a time (no N×N tensor).
        """
        length = x.shape[1]
        beta = _sharpness(self.kernel_beta)[:, None, None]
        k, params, temperature = self.kernel_inputs(x)
        support = torch.zeros(self.n_head, device=x.device)
        zeros = torch.zeros(self.n_head, device=x.device)
        width = torch.zeros(self.n_head, device=x.device)
        has_width = torch.zeros(self.n_head, device=x.device)
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            mask = causal_mask(stop - start, stop, self.mask_mode, offset=start, device=x.device)
            scores = k[:, :, start:stop] @ k[:, :, :stop].transpose(-2, -1)
            d = kernel_diagnostics(
                scores.float(), self.kernel, mask=mask, temperature=temperature.float(), **params
            )
            allowed = mask.sum(-1).to(support.dtype)  # keys each query may see
            support += d.support_size.float().sum((0, 2))
            zeros += (allowed - d.support_size.float()).sum((0, 2))
            if d.bandwidth is not None:
                seen = ~d.bandwidth.isnan()
                width += d.bandwidth.nan_to_num().sum((0, 2))
                has_width += seen.float().sum((0, 2))
        seeing = max(length - MASK_LAGS[self.mask_mode], 0)  # the first positions see no key
        queries = x.shape[0] * seeing
        pairs = x.shape[0] * seeing * (seeing + 1) / 2
        return {
            "support_size": support / max(queries, 1),
            "zero_fraction": zeros / max(pairs, 1),
            "bandwidth": width / has_width if has_width.any() else torch.full_like(width, math.nan),
            "beta": beta.flatten().float(),
        }


class PersistentMemory(nn.Module):
    """Softmax attention over learned key/value slots: the network's long-term knowledge."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        d = config.head_size
        slots = config.pmem_size or round(3.5 * config.n_embd)
        self.key = LeakyAverageKey(config.n_embd, config.n_head)
        self.kernel_beta = nn.Parameter(torch.full((config.n_head,), 0.1))
        self.slot_keys = nn.Parameter(torch.randn(config.n_head, slots, d) / math.sqrt(d))
        self.slot_values = nn.Parameter(torch.randn(config.n_head, slots, d) / math.sqrt(d))
        # output gain e^{10·v}: e^−0.5 at init
        self.value_beta = nn.Parameter(torch.full((config.n_head,), -0.05))
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.attn_dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, length, n_embd = x.shape
        q = self.key(x) * _sharpness(self.kernel_beta)[:, None, None] ** 2
        # every (sequence, position) reads the same slots, unmasked: fold the batch into the query
        # axis so SDPA sees one (1, H, B·T, d) × (1, H, slots, d) problem and takes its fused kernels
        q = q.transpose(0, 1).reshape(1, self.n_head, batch * length, -1)
        y = F.scaled_dot_product_attention(
            q,
            self.slot_keys[None],
            self.slot_values[None],
            scale=1.0,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        # (H, B·T, d); the reference caps the gain itself at 5 (not its exponent, as the
        # contextual memory does)
        y = y * torch.exp(10 * self.value_beta).clamp(max=_MAX_PMEM_GAIN)[:, None, None]
        y = y.reshape(self.n_head, batch, length, -1).permute(1, 2, 0, 3)  # (B, T, H, d)
        return self.dropout(self.out(y.reshape(batch, length, n_embd)))


class Block(nn.Module):
    """Pre-LN: x += contextual(ln1(x)); x += persistent(ln2(x)). Post-LN: x = ln(x + memory(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.prenorm = config.prenorm
        self.ln1 = nn.LayerNorm(config.n_embd, bias=False)
        self.contextual = ContextualMemory(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=False)
        self.persistent = PersistentMemory(config)

    def forward(self, x: Tensor) -> Tensor:
        if self.prenorm:
            x = x + self.contextual(self.ln1(x))
            return x + self.persistent(self.ln2(x))
        x = self.ln1(x + self.contextual(x))
        return self.ln2(x + self.persistent(x))

    def contextual_input(self, x: Tensor) -> Tensor:
        """What the contextual memory reads: the normalised stream (pre-LN) or the stream itself."""
        return self.ln1(x) if self.prenorm else x


class MemoryMosaics(nn.Module):
    """Token embedding (no positions), blocks, final LayerNorm, head tied to the embedding."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if config.vocab_size is not None:
            if config.vocab_size < vocab_size:
                raise ValueError(
                    f"model.vocab_size ({config.vocab_size}) is smaller than the task's vocabulary ({vocab_size})"
                )
            vocab_size = config.vocab_size
        self.config = config
        self.embed = nn.Embedding(vocab_size, config.n_embd)
        self.embd_dropout = nn.Dropout(config.embd_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = None if config.tie_weights else nn.Linear(config.n_embd, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                fan_in = module.in_features
                depth = self.config.n_layer if name.endswith(".out") else 1
                nn.init.normal_(module.weight, std=1 / math.sqrt(fan_in * depth))
        # the reference ties the embedding to the head and initialises the head's Linear last, so the
        # shared matrix ends N(0, 1/n_embd); an untied embedding keeps its own N(0, 1)
        std = 1 / math.sqrt(self.config.n_embd) if self.head is None else 1.0
        nn.init.normal_(self.embed.weight, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T)."""
        x = self.embd_dropout(self.embed(idx))
        for block in self.blocks:
            x = block(x)
        head = self.embed.weight if self.head is None else self.head.weight
        return self.ln_f(x) @ head.T / math.sqrt(self.config.n_embd)

    @torch.no_grad()
    def diagnose(self, idx: Tensor) -> list[dict[str, Tensor]]:
        """What every layer's contextual memory does on `idx`: per-head statistics, one dict per layer."""
        x = self.embed(idx)
        stats = []
        for block in self.blocks:
            stats.append(block.contextual.diagnose(block.contextual_input(x)))
            x = block(x)
        return stats

    def optimizer_groups(
        self, weight_decay: float, every_parameter: bool = False
    ) -> list[dict[str, object]]:
        """AdamW groups: decay on ≥2-D parameters (embedding, linears, memory slots) only, or on
        every parameter (seq_icl's RegBench training)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if every_parameter:
            return [{"params": params, "weight_decay": weight_decay}]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

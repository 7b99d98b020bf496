"""The leaky average k̃_t = Σ_{j≤t} e^{−λ(t−j)} k_j of Memory Mosaics' keys, in linear memory.

The recurrence k̃_t = e^{−λ}·k̃_{t−1} + k_t is exact but sequential; the direct form multiplies by a
T × T decay matrix, quadratic in the length. Here the sequence is cut into chunks of C steps, as
linear-attention and state-space kernels do: inside a chunk a C × C decay matrix, across chunks the
chunks' end states carried by an n × n matrix of decays e^{−λ·C·(c − c′ − 1)} (n = T / C). Every
exponent is ≤ 0, so nothing overflows at any λ or T; memory is O(B·H·T·d) plus H·(C² + n²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_MAX_CHUNK = 64  # intra-chunk work is T·C·d: C past 64 costs more than the n × n carry saves


def chunk_size(length: int) -> int:
    """About √T, a power of two in [8, 64]: both decay matrices stay small at every length."""
    size = 8
    while size * size < length and size < _MAX_CHUNK:
        size *= 2
    return size


def decay_matrix(rate: Tensor, size: int, *, stride: int = 1, shift: int = 0) -> Tensor:
    """(H, size, size): e^{−rate·stride·(i − j − shift)} where i − j ≥ shift, else 0."""
    index = torch.arange(size, device=rate.device)
    lag = index[:, None] - index[None, :] - shift
    weights = torch.exp(-rate[:, None, None] * (stride * lag.clamp(min=0)).to(rate.dtype))
    return weights * (lag >= 0).to(rate.dtype)


def leaky_average(k: Tensor, rate: Tensor, chunk: int | None = None) -> Tensor:
    """k̃ for keys `k` (B, H, T, d) and per-head decay rates `rate` (H,) ≥ 0, exactly.

    Computed in at least float32 whatever the autocast: a key rounded to bf16 before the kernel
    compares it moves it across a compact kernel's support boundary."""
    dtype = torch.promote_types(k.dtype, torch.float32)
    with torch.autocast(k.device.type, enabled=False):
        return _chunked_scan(k.to(dtype), rate.to(dtype), chunk or chunk_size(k.shape[-2]))


def _chunked_scan(k: Tensor, rate: Tensor, size: int) -> Tensor:
    batch, heads, length, dim = k.shape
    chunks = -(-length // size)
    blocks = F.pad(k, (0, 0, 0, chunks * size - length)).view(batch, heads, chunks, size, dim)
    # (B, H, n, C, d): the sums inside each chunk
    local = torch.einsum("hij,bhnjd->bhnid", decay_matrix(rate, size), blocks)
    # (B, H, n, d): the state entering each chunk, from the end states of the chunks before it
    carried = torch.einsum(
        "hij,bhjd->bhid", decay_matrix(rate, chunks, stride=size, shift=1), local[:, :, :, -1]
    )
    # that state reaches position i of its chunk decayed by e^{−λ(i+1)}
    entry = torch.exp(-rate[:, None] * torch.arange(1, size + 1, device=k.device, dtype=k.dtype))
    out = local + carried[:, :, :, None, :] * entry[:, None, :, None]
    return out.reshape(batch, heads, chunks * size, dim)[:, :, :length]

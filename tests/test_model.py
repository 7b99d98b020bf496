"""Memory Mosaics against a from-scratch per-position computation, and the facts SPEC §3 pins."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mosaic_core.config import ModelConfig
from mosaic_core.kernels import attention_weights
from mosaic_core.model import ContextualMemory, MemoryMosaics

KERNELS = [
    ("softmax", {}),
    ("sparsemax", {}),
    ("entmax", {"alpha": 1.5}),
    ("relumax", {"b": 1.0}),
    ("topk_softmax", {"k": 2}),
    ("normrelu", {}),
    ("normrelu", {"gamma": 0.5, "b": -0.2}),
]


def small_model(kernel: str = "softmax", params: dict | None = None, **overrides) -> MemoryMosaics:
    torch.manual_seed(0)
    config = ModelConfig(
        n_layer=2, n_embd=16, n_head=2, kernel=kernel, kernel_params=params or {}, **overrides
    )
    return MemoryMosaics(config, vocab_size=11).double()


def contextual_by_loop(memory: ContextualMemory, x: torch.Tensor) -> torch.Tensor:
    """SPEC §3 written out one position and one head at a time (float64)."""
    batch, length, n_embd = x.shape
    n_head = memory.n_head
    d = n_embd // n_head
    wk = memory.key.proj.weight
    wv = memory.value.weight
    lam = 10 * memory.key.leaky_key_beta.abs()
    beta = torch.exp(torch.clamp(10 * memory.kernel_beta, max=5))
    value_scale = torch.exp(torch.clamp(10 * memory.value_beta, max=5))
    c = memory.lookahead_mix
    out = torch.zeros(batch, length, n_embd, dtype=x.dtype)
    for h in range(n_head):
        rows = slice(h * d, (h + 1) * d)
        for b in range(batch):
            keys, values = [], []
            for t in range(length):
                leaky = sum(
                    math.exp(-lam[h].item() * (t - j)) * (wk[rows] @ x[b, j]) for j in range(t + 1)
                )
                keys.append(leaky / leaky.norm() * (1 if memory.kernel == "normrelu" else beta[h]))
                nxt = wv[rows] @ x[b, t + 1] if t + 1 < length else torch.zeros(d, dtype=x.dtype)
                v = (1 - c[h]) * nxt + c[h] * (wv[rows] @ x[b, t])
                values.append(value_scale[h] * v / v.norm())
            for t in range(1, length):  # position 0 has no key before it: output 0
                scores = torch.stack([keys[t] @ keys[j] for j in range(t)])
                # normrelu: on cosines
                w = attention_weights(scores, memory.kernel, **memory.kernel_params)
                out[b, t, rows] = w @ torch.stack(values[:t])
    return memory.out(out)


@pytest.mark.parametrize(("kernel", "params"), KERNELS)
def test_contextual_memory_matches_the_per_position_definition(kernel, params):
    model = small_model(kernel, params)
    memory = model.blocks[0].contextual
    x = torch.randn(2, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(memory(x), contextual_by_loop(memory, x), atol=1e-10)


@pytest.mark.parametrize(("kernel", "params"), KERNELS)
def test_position_t_uses_keys_up_to_t_minus_1_only(kernel, params):
    """Perturbing input t changes outputs from t on; outputs before t never move (strict causality)."""
    model = small_model(kernel, params).eval()
    idx = torch.randint(0, 11, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(idx)
        for t in (3, 8):
            changed = idx.clone()
            changed[0, t] = (changed[0, t] + 1) % 11
            diff = (model(changed) - base).abs().amax(-1)[0]
            assert torch.equal(diff[:t], torch.zeros(t, dtype=diff.dtype)), (
                "a future token leaked into the past"
            )
            assert diff[t] > 0


@pytest.mark.parametrize(("kernel", "params"), KERNELS)
def test_position_zero_outputs_zero_and_position_one_returns_the_first_value(kernel, params):
    memory = small_model(kernel, params).blocks[0].contextual
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y = memory(x)
        assert torch.equal(y[0, 0], torch.zeros(16, dtype=y.dtype))
        # position 1 sees key 0 alone, whatever the kernel: weight 1 on v_0 = mix of W_v x_1 and W_v x_0
        c = memory.lookahead_mix.repeat_interleave(8)
        v0 = (1 - c) * memory.value(x[0, 1]) + c * memory.value(x[0, 0])
        scale = torch.exp(torch.clamp(10 * memory.value_beta, max=5)).repeat_interleave(8)
        v0 = torch.cat([F.normalize(part, dim=0) for part in v0.split(8)]) * scale
        assert torch.allclose(y[0, 1], memory.out(v0), atol=1e-12)


def test_normrelu_head_bandwidth_option_uses_the_heads_own_bandwidth():
    """normrelu_bandwidth 'head' (eq. 11): weight [1 − 2(β² − s)]_+ on s = β² cos, i.e. Epanechnikov of h = 1/β."""
    memory = small_model("normrelu", normrelu_bandwidth="head").blocks[0].contextual
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    keys, params, temperature = memory.kernel_inputs(x)
    beta = torch.exp(torch.clamp(10 * memory.kernel_beta.detach(), max=5))
    assert torch.allclose(keys.norm(dim=-1), beta[:, None].expand(2, 3)[None])
    assert torch.allclose(temperature.flatten(), beta**-2)
    s = torch.tensor(
        [beta[0] ** 2, beta[0] ** 2 - 0.25, beta[0] ** 2 - 0.5, 0.0], dtype=torch.float64
    )
    w = attention_weights(s, "normrelu", gamma=params["gamma"], b=params["b"][0, 0, 0])
    unnormalised = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(w, unnormalised / unnormalised.sum())


def test_normrelu_by_default_is_the_papers_normalised_positive_cosine():
    """The paper's code: weights [cos]_+ / Σ [cos]_+ (γ = 1, b = 0 on unit keys), whatever β is."""
    memory = small_model("normrelu").blocks[0].contextual
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    keys, params, _ = memory.kernel_inputs(x)
    assert params == {"gamma": 1.0, "b": 0.0}
    assert torch.allclose(keys.norm(dim=-1), torch.ones(2, 2, 9, dtype=torch.float64))
    cos = keys @ keys.transpose(-1, -2)
    mask = torch.ones(9, 9, dtype=torch.bool).tril(-1)
    relu = cos.clamp(min=0) * mask
    expected = relu / relu.sum(-1, keepdim=True)
    uniform = mask / mask.sum(-1, keepdim=True).clamp(min=1)
    expected = torch.where(relu.sum(-1, keepdim=True) > 0, expected, uniform)
    assert torch.allclose(attention_weights(cos, "normrelu", mask=mask), expected)


def test_normrelu_output_changes_with_gamma_and_b():
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    outputs = [
        small_model("normrelu", params).blocks[0].contextual(x)
        for params in ({}, {"gamma": 1.0, "b": 0.5}, {"gamma": 0.25, "b": -0.5})
    ]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


def test_normrelu_head_bandwidth_refuses_explicit_parameters_and_other_kernels():
    with pytest.raises(ValueError, match="normrelu_bandwidth 'head'"):
        ModelConfig(kernel="normrelu", kernel_params={"b": 0.5}, normrelu_bandwidth="head")
    with pytest.raises(ValueError, match="normrelu_bandwidth 'head'"):
        ModelConfig(kernel="softmax", normrelu_bandwidth="head")


@pytest.mark.parametrize("n_embd", [16, 256])
def test_tied_embedding_starts_with_std_one_over_sqrt_n_embd(n_embd):
    """As the reference, whose head (tied to the embedding) is initialised last: std 1/√n_embd."""
    torch.manual_seed(0)
    model = MemoryMosaics(ModelConfig(n_layer=1, n_embd=n_embd, n_head=4), vocab_size=4096)
    assert model.embed.weight.std().item() == pytest.approx(n_embd**-0.5, rel=0.05)
    untied = MemoryMosaics(
        ModelConfig(n_layer=1, n_embd=n_embd, n_head=4, tie_weights=False), vocab_size=4096
    )
    assert untied.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_persistent_memory_output_gain_starts_at_exp_minus_half_and_is_capped_at_five():
    model = small_model().eval()
    memory = model.blocks[0].persistent
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        first = memory(x)
        memory.value_beta.fill_(0.0)  # gain e^0 = 1
        unit = memory(x)
        memory.value_beta.fill_(1.0)  # gain e^10, capped at 5
        capped = memory(x)
    assert torch.allclose(first, math.exp(-0.5) * unit)
    assert torch.allclose(capped, 5 * unit)


def test_attention_dropout_drops_weights_of_both_memories_only_in_training():
    model = small_model(attn_dropout=0.5)
    idx = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), model.eval()(idx))
        torch.manual_seed(1)
        first = model.train()(idx)
        torch.manual_seed(1)
        assert torch.equal(first, model(idx))  # seeded: the same weights dropped
        assert not torch.allclose(first, model.eval()(idx))
        for contextual in (True, False):
            one = small_model(attn_dropout=0.5, contextual_attn_dropout=contextual).blocks[0]
            x = torch.randn(1, 9, 16, dtype=torch.float64)
            changed = not torch.allclose(one.contextual.train()(x), one.contextual.eval()(x))
            assert changed == contextual
            assert not torch.allclose(one.persistent.train()(x), one.persistent.eval()(x))


def test_no_sequence_length_cap():
    model = small_model("entmax", {"alpha": 1.5}).float().eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, 4500, dtype=torch.long))
    assert logits.shape == (1, 4500, 11) and torch.isfinite(logits).all()


def test_block_has_about_twelve_n_embd_squared_parameters():
    n = 64
    model = MemoryMosaics(ModelConfig(n_layer=1, n_embd=n, n_head=4), vocab_size=10)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert abs(block - 12 * n * n) / (12 * n * n) < 0.01


def test_head_is_tied_and_logits_scaled():
    model = small_model().eval()
    idx = torch.randint(0, 11, (1, 4))
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x)
    expected = model.ln_f(x) @ model.embed.weight.T / math.sqrt(16)
    with torch.no_grad():
        assert torch.allclose(model(idx), expected)
    others = sum(p.numel() for m in (*model.blocks, model.ln_f) for p in m.parameters())
    # no output matrix
    assert sum(p.numel() for p in model.parameters()) == model.embed.weight.numel() + others


def test_initialisation_and_decay_groups():
    model = MemoryMosaics(ModelConfig(n_layer=4, n_embd=256, n_head=4), vocab_size=10)
    block = model.blocks[0]
    assert block.contextual.key.proj.weight.std().item() == pytest.approx(
        1 / math.sqrt(256), rel=0.05
    )
    assert block.contextual.out.weight.std().item() == pytest.approx(
        1 / math.sqrt(256 * 4), rel=0.05
    )
    lam = 10 * block.contextual.key.leaky_key_beta.abs()
    assert torch.allclose(lam, torch.linspace(0.5, 5, 4))
    assert torch.allclose(torch.exp(10 * block.contextual.kernel_beta), torch.full((4,), math.e))
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )
    assert any(p is block.persistent.slot_keys for p in decay["params"])
    assert any(p is model.embed.weight for p in decay["params"])


def test_persistent_memory_is_softmax_over_slots_whatever_the_kernel():
    model = small_model("sparsemax")
    memory = model.blocks[0].persistent
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        q = (
            memory.key(x)
            * torch.exp(torch.clamp(10 * memory.kernel_beta, max=5))[:, None, None] ** 2
        )
        w = torch.softmax(q @ memory.slot_keys.transpose(-1, -2), dim=-1)
        gain = math.exp(-0.5)  # the output gain e^{10·v} at its initial value
        expected = memory.out(gain * (w @ memory.slot_values).transpose(1, 2).reshape(1, 3, 16))
        assert torch.allclose(memory(x), expected, atol=1e-12)
    assert memory.slot_keys.shape == (2, 56, 8)  # pmem_size = 3.5 · n_embd slots per head


def test_model_config_errors():
    with pytest.raises(ValueError, match="divisible by n_head"):
        ModelConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="alpha must be > 1"):
        ModelConfig(kernel="entmax", kernel_params={"alpha": 1.0})
    with pytest.raises(ValueError, match="unknown kernel"):
        ModelConfig(kernel="nope")


def test_gradients_reach_every_parameter():
    model = small_model("entmax", {"alpha": 1.5})
    logits = model(torch.randint(0, 11, (2, 9)))
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 11, (18,))).backward()
    missing = [
        name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


@pytest.mark.parametrize(("kernel", "params"), KERNELS)
def test_diagnostics_match_the_weights_the_model_uses(kernel, params):
    model = small_model(kernel, params)
    idx = torch.randint(0, 11, (3, 13), generator=torch.Generator().manual_seed(4))
    stats = model.diagnose(idx)
    assert len(stats) == 2
    x = model.embed(idx)
    memory = model.blocks[0].contextual
    with torch.no_grad():
        beta = torch.exp(torch.clamp(10 * memory.kernel_beta, max=5))[:, None, None]
        unit = memory.key(model.blocks[0].ln1(x))
        k = unit if kernel == "normrelu" else unit * beta
        scores = k @ k.transpose(-1, -2)
        mask = torch.ones(13, 13, dtype=torch.bool).tril(-1)
        weights = attention_weights(scores, memory.kernel, mask=mask, **memory.kernel_params)
    nonzero = (weights > 0).sum(-1)[:, :, 1:].double()  # queries 1..12 (query 0 sees no key)
    assert torch.allclose(stats[0]["support_size"].double(), nonzero.mean((0, 2)), atol=1e-6)
    zeros = ((weights == 0) & mask).sum((0, 2, 3)).double() / (3 * 13 * 12 / 2)
    assert torch.allclose(stats[0]["zero_fraction"].double(), zeros, atol=1e-6)
    assert torch.allclose(stats[0]["beta"].double(), beta.flatten())
    if kernel == "softmax":  # Gaussian of fixed bandwidth sqrt(T) = 1/β
        assert torch.allclose(stats[0]["bandwidth"].double(), 1 / beta.flatten(), atol=1e-6)
    if (
        kernel == "normrelu"
    ):  # on cosines, [cos/γ + b]_+ is Epanechnikov of h² = 2 + 2γb (√2 by default)
        h = math.sqrt(2 + 2 * memory.kernel_params["gamma"] * memory.kernel_params["b"])
        assert torch.allclose(
            stats[0]["bandwidth"].double(), torch.full((2,), h, dtype=torch.float64), atol=1e-6
        )
    if kernel.startswith("topk"):
        assert stats[0]["bandwidth"].isnan().all()


def test_post_ln_block_follows_its_definition_and_stays_causal():
    model = small_model(prenorm=False).eval()
    block = model.blocks[0]
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        y = block.ln1(x + block.contextual(x))
        assert torch.allclose(block(x), block.ln2(y + block.persistent(y)))
        idx = torch.randint(0, 11, (1, 10))
        changed = idx.clone()
        changed[0, 6] = (changed[0, 6] + 1) % 11
        diff = (model(changed) - model(idx)).abs().amax(-1)[0]
        assert torch.equal(diff[:6], torch.zeros(6, dtype=diff.dtype)) and diff[6] > 0


def test_untied_head_padded_vocabulary_and_embedding_dropout():
    tied = small_model()
    untied = small_model(tie_weights=False)
    extra = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert extra == 11 * 16 and untied.head.weight.shape == (11, 16)
    padded = small_model(vocab_size=16)
    assert padded(torch.randint(0, 11, (1, 5))).shape == (1, 5, 16)
    with pytest.raises(ValueError, match="smaller than the task's vocabulary"):
        small_model(vocab_size=8)
    dropped = small_model(embd_dropout=0.5)
    idx = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        assert torch.equal(dropped.eval()(idx), dropped.eval()(idx))
        assert not torch.equal(dropped.train()(idx), dropped.eval()(idx))


def test_adasplash_backend_refuses_attention_dropout_before_training():
    with pytest.raises(
        ValueError, match="attention_backend 'adasplash' cannot drop attention weights"
    ):
        ModelConfig(kernel="sparsemax", attention_backend="adasplash", attn_dropout=0.05)
    ModelConfig(
        kernel="sparsemax",
        attention_backend="adasplash",
        attn_dropout=0.05,
        contextual_attn_dropout=False,
    )

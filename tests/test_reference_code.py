"""`model.reference_code`: the paper's code where it departs from its text, on request only."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_core import attention
from mosaic_core.attention import attend
from mosaic_core.config import ModelConfig, TrialConfig
from mosaic_core.kernels import attention_weights
from mosaic_core.model import ContextualMemory, MemoryMosaics

LAGGED = [("normrelu", {}), ("relumax", {"b": 1.0}), ("topk_uniform", {"k": 3})]
NOT_LAGGED = [("softmax", {}), ("sparsemax", {}), ("entmax", {"alpha": 1.5}), ("topk_softmax", {"k": 3})]  # fmt: skip


def weights_through(
    path: str, kernel: str, params: dict, mask_mode: str, monkeypatch
) -> torch.Tensor:
    """The (T, T) weights `attend` gives, read out with the identity as values (out = weights)."""
    if path == "fast":  # the path CUDA takes (on the CPU: Triton's interpreter, SDPA's CPU kernel)
        pytest.importorskip("triton")
        fast = "sdpa" if kernel == "softmax" else "fused"
        monkeypatch.setattr(attention, "_path", lambda *args, **kwargs: fast)
    length = 16
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1, 1, length, 16, generator=generator), dim=-1)
    identity = torch.eye(length)[None, None]
    backend = "reference" if path == "reference" else "fast"
    return attend(keys * 2, keys * 2, identity, kernel, mask_mode=mask_mode, backend=backend, **params)[0, 0]  # fmt: skip


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize(("kernel", "params"), LAGGED + NOT_LAGGED)
def test_the_lag2_mask_zeroes_key_t_minus_1_and_keeps_the_rest(path, kernel, params, monkeypatch):
    lagged = weights_through(path, kernel, params, "causal_lag2", monkeypatch)
    strict = weights_through(path, kernel, params, "strict_causal", monkeypatch)
    t = torch.arange(16)
    assert torch.all(lagged[t[1:], t[1:] - 1] == 0) and torch.all(lagged.triu() == 0)
    assert torch.allclose(lagged.sum(-1)[2:], torch.ones(14), atol=1e-5)  # rows 0, 1 see no key
    assert lagged[:2].abs().sum() == 0
    assert strict[t[1:], t[1:] - 1].abs().sum() > 0  # the strict mask does give key t − 1 weight


@pytest.mark.parametrize(("kernel", "params"), LAGGED + NOT_LAGGED)
def test_reference_code_lags_only_the_three_kernels_of_the_lm_length_code(kernel, params):
    for family, expected in (("lm_length", (kernel, params) in LAGGED), ("regbench", False), (False, False)):  # fmt: skip
        config = ModelConfig(n_embd=32, n_head=2, kernel=kernel, kernel_params=params,
                             reference_code=family)  # fmt: skip
        assert (ContextualMemory(config).mask_mode == "causal_lag2") is expected


def test_reference_code_true_is_the_code_of_the_tasks_experiment():
    regbench = TrialConfig.model_validate({"task": {"name": "regbench"}, "model": {"reference_code": True}})  # fmt: skip
    sort = TrialConfig.model_validate({"task": {"name": "sort"}, "model": {"reference_code": True}})
    assert (
        regbench.model.reference_family == "regbench" and sort.model.reference_family == "lm_length"
    )
    assert TrialConfig().model.reference_family is None


def regbench_weights(kernel: str, cosines: list[float]) -> torch.Tensor:
    """One query's weights over keys at the given cosines to it (the query itself first), through
    the RegBench reference model's own scores, with β = e (kernel_beta at its init 0.1)."""
    config = ModelConfig(n_embd=3, n_head=1, kernel=kernel, reference_code="regbench")
    memory = ContextualMemory(config).double()
    angles = torch.tensor([math.acos(c) for c in cosines], dtype=torch.float64)
    unit = torch.stack([angles.cos(), angles.sin(), torch.zeros_like(angles)], -1)[None, None]
    memory.key.forward = lambda x: unit  # the keys themselves, so the cosines are exact
    keys, params, _ = memory.kernel_inputs(unit)
    scores = keys[0, 0, :1] @ keys[0, 0].T
    return attention_weights(scores, memory.kernel, **params)[0]


def test_regbench_relumax_is_one_plus_beta4_times_the_cosine_gap():
    """[1 + β⁴(cos − max cos)]₊ with β⁴ = e⁴ ≈ 54.6: gaps 0, 0.01, 0.03 give 1, 0.454, 0."""
    got = regbench_weights("relumax", [1.0, 0.99, 0.97])
    raw = torch.tensor([1.0, 1 - 0.01 * math.e**4, 0.0], dtype=torch.float64)
    assert torch.allclose(got, raw / raw.sum(), atol=1e-12)
    assert got[2] == 0 and abs(got[1].item() - 0.4540 / 1.4540) < 1e-3


def test_regbench_normrelu_is_seq_icls_beta4_form():
    """[1 − 2β² + 2β⁴·cos]₊ (eq. (11) with β applied twice), β = e: cos 1 → 1 − 2e² + 2e⁴."""
    cosines = [1.0, 0.2, 0.1]
    got = regbench_weights("normrelu", cosines)
    raw = torch.tensor([max(0.0, 1 - 2 * math.e**2 + 2 * math.e**4 * c) for c in cosines], dtype=torch.float64)  # fmt: skip
    assert raw[2] == 0 < raw[1]  # the support ends at cos = (2β² − 1)/2β⁴ ≈ 0.126
    assert torch.allclose(got, raw / raw.sum(), atol=1e-12)


def test_regbench_normrelu_refuses_kernel_params():
    with pytest.raises(ValueError, match="takes no kernel_params"):
        ModelConfig(kernel="normrelu", kernel_params={"b": 0.5}, reference_code="regbench")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lm_length_code_feeds_the_entmax_family_float32_under_autocast(monkeypatch):
    seen = []
    real = attention.attend
    monkeypatch.setattr("mosaic_core.model.attend", lambda q, k, v, *a, **kw: seen.append(q.dtype) or real(q, k, v, *a, **kw))  # fmt: skip
    for reference in (False, True):
        model = MemoryMosaics(ModelConfig(n_embd=64, n_head=1, kernel="sparsemax", reference_code=reference), 11).cuda()  # fmt: skip
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(torch.randint(0, 11, (2, 8), device="cuda"))
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]


def test_results_rows_carry_the_flag():
    from orchestrator.tracking.callback import trial_columns

    on = TrialConfig.model_validate({"task": {"name": "sort"}, "model": {"reference_code": True}})
    assert trial_columns(on)["reference_code"] == "lm_length"
    assert trial_columns(TrialConfig())["reference_code"] is None

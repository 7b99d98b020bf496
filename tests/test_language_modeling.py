"""Language modelling (SPEC §4): offline GPT-2 BPE, corpus preparation, windows and losses.

No network: the GPT-2 ranks come from mosaic_core/assets/gpt2.tiktoken (a copy of openai-whisper's asset).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
from torch import Tensor, nn

from mosaic_core import tokenizer
from mosaic_core.config import LanguageModelConfig
from mosaic_core.tasks.language_modeling import (
    OOD_EMA_ALPHA,
    LanguageModelTask,
    ema,
    per_position_loss,
    prepare_corpus,
    reported_positions,
)
from mosaic_core.tokenizer import EOT, PADDED_VOCAB, gpt2_encoding

DATA = Path(__file__).parent / "data"
RANKS = tokenizer.PACKAGED_RANKS
JSONL_STORIES = [
    "Mia had a red kite. One windy day she ran up the hill, and the kite flew higher than the birds.",
    "Tom found a small frog in the garden. He gave it a name, Hop, and built it a house of leaves.",
    "The old owl could not sleep.\nShe counted the stars until the sun came up, then she laughed and went to bed.",
    "Lily wanted to bake a cake for her dad. She used too much salt, but he ate every bite and said thank you.",
    'A little boat was afraid of the big sea. Its friend the gull said: "Waves are only the sea saying hello."',
]
TXT_STORIES = [
    "Ben and his dog Max walked to the park. Max found a stick that was bigger than Ben.",
    'The moon asked the sun why it never came out at night.\nThe sun said: "Because then you would have no one to talk to."',
    "Sara planted one seed and waited. After many days a tiny green leaf said hello.",
]
LN_V = math.log(PADDED_VOCAB)


@pytest.fixture(autouse=True)
def offline_gpt2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets the shipped ranks file, no tiktoken cache writes, and a fresh encoding cache."""
    monkeypatch.setenv(tokenizer.ENV_VAR, str(RANKS))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" disables tiktoken's copy into the temp folder
    gpt2_encoding.cache_clear()
    yield
    gpt2_encoding.cache_clear()


def decode(path: Path) -> str:
    return gpt2_encoding().decode(np.fromfile(path, dtype=np.uint16).tolist())


def joined(stories: list[str]) -> str:
    return "".join(story + "<|endoftext|>" for story in stories)


# --- tokenizer ---------------------------------------------------------------------------------


def test_gpt2_ids_from_local_ranks() -> None:
    encoding = gpt2_encoding()
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.eot_token == EOT == 50256 and encoding.n_vocab == 50257 < PADDED_VOCAB
    # text never turns into the special token
    assert encoding.encode_ordinary("<|endoftext|>") != [EOT]


def test_gpt2_from_installed_whisper_without_importing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    package = tmp_path / "whisper"
    (package / "assets").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('whisper must not be imported')\n")
    shutil.copy(RANKS, package / "assets" / "gpt2.tiktoken")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(tokenizer.ENV_VAR)
    monkeypatch.setattr(tokenizer, "PACKAGED_RANKS", Path("/nonexistent/gpt2.tiktoken"))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("went to the network"))
    assert gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]
    assert "whisper" not in sys.modules


def test_gpt2_named_file_missing_or_wrong(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(tokenizer.ENV_VAR, str(tmp_path / "absent.tiktoken"))
    with pytest.raises(FileNotFoundError, match=r"absent\.tiktoken.*MOSAIC_GPT2_TIKTOKEN"):
        gpt2_encoding()
    wrong = tmp_path / "tiny.tiktoken"
    wrong.write_text("SA== 0\naQ== 1\n")  # a valid ranks file, but not GPT-2's
    monkeypatch.setenv(tokenizer.ENV_VAR, str(wrong))
    with pytest.raises(ValueError, match="not GPT-2's ranks file"):
        gpt2_encoding()


def test_gpt2_from_the_packaged_copy_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tokenizer.ENV_VAR)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("went to the network"))
    assert gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]


def test_gpt2_offline_without_any_file_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(name: str) -> tiktoken.Encoding:
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv(tokenizer.ENV_VAR)
    monkeypatch.setattr(tokenizer, "PACKAGED_RANKS", Path("/nonexistent/gpt2.tiktoken"))
    monkeypatch.setattr(tokenizer, "_whisper_ranks_file", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(
        RuntimeError, match="could not download.*set MOSAIC_GPT2_TIKTOKEN"
    ) as caught:
        gpt2_encoding()
    assert "\n" not in str(caught.value)


# --- prepare_corpus ----------------------------------------------------------------------------


def test_prepare_jsonl_writes_uint16_stories_joined_by_eot(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    meta = prepare_corpus(
        [DATA / "stories.jsonl"],
        tmp_path / "out",
        val_fraction=0.0,
        progress=lambda done, total: calls.append((done, total)),
    )
    train, val = tmp_path / "out" / "train.bin", tmp_path / "out" / "val.bin"
    assert decode(train) == joined(JSONL_STORIES)
    assert val.stat().st_size == 0
    tokens = np.fromfile(train, dtype=np.uint16)
    assert (
        train.stat().st_size == 2 * len(tokens) and tokens[-1] == EOT and (tokens == EOT).sum() == 5
    )
    assert meta["tokens"] == {"train": len(tokens), "val": 0} and meta["documents"] == {
        "train": 5,
        "val": 0,
    }
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert calls[-1] == (5, 5)


def test_prepare_text_and_parquet_in_order(tmp_path: Path) -> None:
    parquet = tmp_path / "more.parquet"
    pq.write_table(
        pa.table({"text": ["Parquet story one.", None, "Parquet story two."], "id": [1, 2, 3]}),
        parquet,
    )
    meta = prepare_corpus([DATA / "stories.txt", parquet], tmp_path / "out", val_fraction=0.0)
    assert decode(tmp_path / "out" / "train.bin") == joined(
        [*TXT_STORIES, "Parquet story one.", "Parquet story two."]
    )
    assert meta["documents"]["train"] == 5  # the null row is no document


def test_prepare_split_is_deterministic_and_partitions_documents(tmp_path: Path) -> None:
    first = prepare_corpus([DATA / "stories.jsonl"], tmp_path / "a", val_fraction=0.5)
    prepare_corpus([DATA / "stories.jsonl"], tmp_path / "b", val_fraction=0.5)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = decode(tmp_path / "a" / "train.bin").split("<|endoftext|>")[:-1]
    val = decode(tmp_path / "a" / "val.bin").split("<|endoftext|>")[:-1]
    assert train and val and sorted(train + val) == sorted(JSONL_STORIES)
    assert first["documents"] == {"train": len(train), "val": len(val)}
    prepare_corpus([DATA / "stories.jsonl"], tmp_path / "all", val_fraction=1.0)
    assert decode(tmp_path / "all" / "val.bin") == joined(JSONL_STORIES)


def test_a_given_validation_file_is_the_validation_split(tmp_path: Path) -> None:
    """The official valid file as val, every training document as train, whatever val_fraction."""
    meta = prepare_corpus(
        [DATA / "stories.jsonl"],
        tmp_path / "out",
        val_fraction=0.5,
        val_sources=[DATA / "stories.txt"],
    )
    assert decode(tmp_path / "out" / "train.bin") == joined(JSONL_STORIES)
    assert decode(tmp_path / "out" / "val.bin") == joined(TXT_STORIES)
    assert meta["documents"] == {"train": len(JSONL_STORIES), "val": len(TXT_STORIES)}
    assert meta["val_fraction"] is None and meta["val_sources"] == [
        str((DATA / "stories.txt").resolve())
    ]
    with pytest.raises(FileNotFoundError, match="nowhere.txt does not exist"):
        prepare_corpus(
            [DATA / "stories.jsonl"], tmp_path / "x", val_sources=[tmp_path / "nowhere.txt"]
        )


def test_prepare_refuses_to_overwrite(tmp_path: Path) -> None:
    prepare_corpus([DATA / "stories.jsonl"], tmp_path, val_fraction=0.0)
    with pytest.raises(
        FileExistsError,
        match=r"already holds train\.bin, val\.bin, meta\.json; pass --overwrite to replace it",
    ):
        prepare_corpus([DATA / "stories.txt"], tmp_path)
    prepare_corpus([DATA / "stories.txt"], tmp_path, val_fraction=0.0, overwrite=True)
    assert decode(tmp_path / "train.bin") == joined(TXT_STORIES)
    # no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]


def test_prepare_rejects_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n42\n')
    with pytest.raises(
        ValueError, match=r'bad\.jsonl:2: expected a JSON string or an object with a "text"'
    ):
        prepare_corpus([bad], tmp_path / "out")
    assert not (tmp_path / "out" / "train.bin").exists()
    csv = tmp_path / "stories.csv"
    csv.write_text("text\nA story.\n")
    with pytest.raises(
        ValueError,
        match=r"unsupported file type '\.csv'; expected one of \.txt, \.jsonl, \.parquet",
    ):
        prepare_corpus([csv], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_corpus([tmp_path / "absent.jsonl"], tmp_path / "out")


# --- LanguageModelTask -------------------------------------------------------------------------


def write_corpus(folder: Path, train: np.ndarray, val: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(folder / "train.bin")
    val.astype(np.uint16).tofile(folder / "val.bin")
    return folder


def lm_config(data_dir: Path, **overrides: object) -> LanguageModelConfig:
    return LanguageModelConfig(
        name="lm", data_dir=str(data_dir), context=8, eval_batches=2, eval_batch_size=3, **overrides
    )


class Uniform(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros(*x.shape, PADDED_VOCAB)


class SuccessorAtEvenPositions(nn.Module):
    """Knows the corpus rule next = (token + 1) % K, but uses it only at even positions p = t + 1."""

    def __init__(self, modulus: int) -> None:
        super().__init__()
        self.modulus = modulus

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(*x.shape, PADDED_VOCAB)
        odd_t = torch.arange(x.shape[1]) % 2 == 1
        logits[:, odd_t] = -1e4
        logits[:, odd_t] = logits[:, odd_t].scatter(
            -1, ((x[:, odd_t] + 1) % self.modulus).unsqueeze(-1), 0.0
        )
        return logits


def test_train_batch_deterministic_shifted_windows(tmp_path: Path) -> None:
    data = write_corpus(tmp_path, np.arange(5000) % 50000, np.arange(100))
    task = LanguageModelTask(lm_config(data), seed=3)
    inputs, labels = task.train_batch(7, batch_size=4)
    assert inputs.shape == labels.shape == (4, 8) and inputs.dtype == labels.dtype == torch.long
    assert torch.equal(labels, inputs + 1)  # consecutive corpus tokens, shifted by one
    assert torch.equal(inputs, task.train_batch(7, 4)[0])
    assert torch.equal(inputs, LanguageModelTask(lm_config(data), seed=3).train_batch(7, 4)[0])
    assert not torch.equal(inputs, task.train_batch(8, 4)[0])
    assert not torch.equal(inputs, LanguageModelTask(lm_config(data), seed=4).train_batch(7, 4)[0])
    assert task.vocab_size == PADDED_VOCAB


def test_evaluate_uniform_model_gives_log_vocab(tmp_path: Path) -> None:
    data = write_corpus(tmp_path, np.arange(100), np.arange(200) % 7)
    task = LanguageModelTask(lm_config(data), seed=0)
    assert task.evaluate(Uniform(), torch.device("cpu")) == pytest.approx(
        {"val_loss": LN_V}, abs=1e-4
    )
    # evaluation windows do not depend on the trial seed
    inputs = task.diagnostic_inputs(2)[1.0]
    assert inputs.shape == (2, 8)
    assert torch.equal(inputs, LanguageModelTask(lm_config(data), seed=9).diagnostic_inputs(2)[1.0])


def test_per_position_loss_closed_form() -> None:
    modulus = 11
    windows = (
        np.arange(5)[:, None] + np.arange(9)
    ) % modulus  # (N=5, T+1=9), next = (token + 1) % 11
    curve = per_position_loss(
        SuccessorAtEvenPositions(modulus), windows, torch.device("cpu"), batch_size=2
    )
    expected = np.array([LN_V, 0.0] * 4)  # positions 1..8: uniform at odd p, certain at even p
    np.testing.assert_allclose(curve, expected, atol=1e-5)


def test_evaluate_reports_ood_curve(tmp_path: Path) -> None:
    modulus = 11
    data = write_corpus(tmp_path / "main", np.arange(100), np.arange(100) % modulus)
    ood = write_corpus(tmp_path / "ood", np.array([], dtype=np.int64), np.arange(300) % modulus)
    task = LanguageModelTask(lm_config(data, ood_data_dir=str(ood)), seed=0)
    metrics = task.evaluate(SuccessorAtEvenPositions(modulus), torch.device("cpu"))
    curve = np.array([LN_V, 0.0] * 4)
    smooth = ema(curve, OOD_EMA_ALPHA)
    expected = {"val_loss": LN_V / 2, "ood_loss": LN_V / 2}
    for position in (1, 2, 4, 8):
        expected[f"ood_loss/pos{position}"] = curve[position - 1]
        expected[f"ood_loss_ema/pos{position}"] = smooth[position - 1]
    assert metrics == pytest.approx(expected, abs=1e-4)


def test_reported_positions() -> None:
    assert reported_positions(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert reported_positions(6) == [1, 2, 4, 6]


def test_ema_closed_form() -> None:
    alpha = 0.25
    step = np.array([0.0] + [1.0] * 9)
    np.testing.assert_allclose(ema(step, alpha), 1 - (1 - alpha) ** np.arange(10))
    np.testing.assert_allclose(ema(np.full(5, 3.0), alpha), 3.0)
    np.testing.assert_allclose(ema(step, 1.0), step)
    with pytest.raises(ValueError, match="alpha"):
        ema(step, 0.0)


def test_missing_or_short_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"train\.bin does not exist; run `mosaic-sweep prepare`"
    ):
        LanguageModelTask(lm_config(tmp_path / "nowhere"), seed=0)
    data = write_corpus(tmp_path / "short", np.arange(100), np.arange(5))
    with pytest.raises(
        ValueError, match=r"val\.bin holds 5 tokens, fewer than one window of context \+ 1 = 9"
    ):
        LanguageModelTask(lm_config(data), seed=0)

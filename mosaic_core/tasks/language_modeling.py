"""Language modelling on BabiStories (paper Figure 2/3, Appendix C): next-token loss on GPT-2 tokens.

A corpus is tokenised once (`prepare_corpus`) into flat uint16 files, `train.bin` and `val.bin`,
with <|endoftext|> after every document; training reads random `context`-token windows from the
memory-mapped train file, so corpora larger than memory cost nothing. Evaluation uses windows at
fixed positions, the same for every trial seed, so seeds and kernels are compared on equal text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mosaic_core.config import LanguageModelConfig
from mosaic_core.metrics import OOD_LOSS, OOD_LOSS_EMA, VAL_LOSS
from mosaic_core.tokenizer import EOT, PADDED_VOCAB, gpt2_encoding

SPLITS = ("train", "val")
SUFFIXES = (".txt", ".jsonl", ".parquet")
OOD_EMA_ALPHA = (
    0.1  # smooths the noisy per-position OOD curve over ~10 positions (SPEC §4: "and its EMA")
)
_CHUNK = 1024  # documents tokenised per batch call (tiktoken threads within a batch)
_TRAIN_STREAM, _VAL_STREAM, _OOD_STREAM = 0, 1, 2  # disjoint numpy seed streams


def prepare_corpus(
    sources: list[Path],
    out_dir: Path,
    *,
    val_fraction: float = 0.005,
    val_sources: list[Path] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenise `sources` into `out_dir`/{train,val}.bin (uint16 GPT-2 ids) and meta.json; returns the meta.

    Documents: a `.txt` file splits on blank lines (or `<|endoftext|>` lines, TinyStories' format);
    a `.jsonl` line is a JSON string or an object with a "text" string (BabiStories); a `.parquet`
    file has a "text" column. With `val_sources` (a corpus's official validation file) those are
    the validation split and every document of `sources` trains; otherwise a document goes to val
    when a hash of its running index falls below `val_fraction`: the split is the same on every
    run and needs no shuffling in memory. `progress(done, total)` is called as documents are
    tokenised.
    """
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must lie in [0, 1]; got {val_fraction}")
    if not sources:
        raise ValueError("no corpus files given")
    sources = [Path(source) for source in sources]
    val_sources = [Path(source) for source in val_sources or []]
    for source in sources + val_sources:
        if source.is_dir():
            raise ValueError(f"corpus file {source} is a directory; give its files")
        if not source.is_file():
            raise FileNotFoundError(f"corpus file {source} does not exist")
        if source.suffix not in SUFFIXES:
            raise ValueError(
                f"{source}: unsupported file type {source.suffix!r}; expected one of {', '.join(SUFFIXES)}"
            )
    out_dir = Path(out_dir)
    outputs = {split: out_dir / f"{split}.bin" for split in SPLITS} | {
        "meta": out_dir / "meta.json"
    }
    existing = [path.name for path in outputs.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(existing)}; pass --overwrite to replace it"
        )

    encoding = gpt2_encoding()  # before the long read: a missing tokenizer fails at once
    total = sum(_count_documents(source) for source in sources + val_sources)
    if not total:
        raise ValueError(
            f"{', '.join(map(str, sources + val_sources))}: no documents (an empty corpus); "
            "nothing written"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = {split: outputs[split].with_suffix(".bin.partial") for split in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    done = 0
    try:
        with partial["train"].open("wb") as train_file, partial["val"].open("wb") as val_file:
            files = {"train": train_file, "val": val_file}
            for chunk in _batched(_split_documents(sources, val_sources, val_fraction), _CHUNK):
                ids = {split: [] for split in SPLITS}
                splits, texts = zip(*chunk)
                for split, encoded in zip(splits, encoding.encode_ordinary_batch(list(texts))):
                    if not encoded:  # an empty record: no document, not even an <|endoftext|>
                        continue
                    ids[split] += [*encoded, EOT]
                    documents[split] += 1
                for split in SPLITS:
                    np.array(ids[split], dtype=np.uint16).tofile(files[split])
                    tokens[split] += len(ids[split])
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        for split in SPLITS:
            os.replace(partial[split], outputs[split])
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)

    meta = {
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "eot": EOT,
        "vocab_size": PADDED_VOCAB,
        "sources": [str(source.resolve()) for source in sources],
        "val_fraction": None if val_sources else val_fraction,
        "val_sources": [str(source.resolve()) for source in val_sources],
        "documents": documents,
        "tokens": tokens,
    }
    outputs["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _split_documents(
    sources: list[Path], val_sources: list[Path], val_fraction: float
) -> Iterator[tuple[str, str]]:
    """(split, document) in file order: `val_sources` are the validation split when given, else a
    hash of each document's running index decides."""
    texts = itertools.chain.from_iterable(_documents(source) for source in sources)
    if val_sources:
        held_out = itertools.chain.from_iterable(_documents(source) for source in val_sources)
        yield from itertools.chain(
            (("train", text) for text in texts), (("val", text) for text in held_out)
        )
        return
    for index, text in enumerate(texts):
        yield ("val" if _in_val(index, val_fraction) else "train"), text


def _documents(path: Path) -> Iterator[str]:
    """The file's documents; ValueError naming the file when it is not what its suffix says."""
    read = {".parquet": _parquet_documents, ".jsonl": _jsonl_documents}.get(
        path.suffix, _text_documents
    )
    with _naming(path):
        yield from read(path)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A corpus file that is not UTF-8 text (or not Parquet) as one line naming it."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None
    except pa.ArrowException as error:
        raise ValueError(
            f"{path}: not a Parquet file ({' '.join(str(error).split())[:120]})"
        ) from None


def _text_documents(path: Path) -> Iterator[str]:
    """Streamed, so a multi-gigabyte text file is never held whole."""
    lines: list[str] = []
    with path.open(encoding="utf-8") as file:
        for line in itertools.chain(file, [""]):  # the final "" closes the last document
            if line.strip() in ("", "<|endoftext|>"):
                if lines:
                    yield "".join(lines).strip()
                lines = []
            else:
                lines.append(line)


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise ValueError(
                    f'{path}:{number}: expected a JSON string or an object with a "text" string'
                )
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise ValueError(
            f"{path}: no 'text' column; columns: {', '.join(parquet.schema_arrow.names)}"
        )
    for batch in parquet.iter_batches(batch_size=_CHUNK, columns=["text"]):
        yield from (text or "" for text in batch.column(0).to_pylist())


def _count_documents(path: Path) -> int:
    """Records to expect, for progress: cheap (metadata, or a scan without JSON parsing)."""
    if path.suffix == ".parquet":
        with _naming(path):
            return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".jsonl":
        with path.open("rb") as file:
            return sum(1 for line in file if line.strip())
    return sum(1 for _ in _documents(path))


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _in_val(index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


@torch.no_grad()
def per_position_loss(
    model: nn.Module, windows: Tensor | np.ndarray, device: torch.device, batch_size: int = 16
) -> np.ndarray:
    """Mean cross-entropy at each position of (N, T+1) token windows, shape (T,).

    Entry p−1 is the loss of predicting token p from the p tokens before it: how the loss falls as
    context accumulates is what in-context learning looks like (paper Figure 3).
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64, device=device)
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        total += loss.view(len(batch), -1).sum(0)
    return (total / len(windows)).cpu().numpy()


def ema(curve: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average along the curve, as pandas' ewm(alpha, adjust=False).

    s₀ = x₀ and sₜ = (1−α)·sₜ₋₁ + α·xₜ: no look-ahead, so the smoothed loss at p uses positions ≤ p only.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must lie in (0, 1]; got {alpha}")
    smooth = np.empty(len(curve), dtype=np.float64)
    for position, value in enumerate(curve):
        smooth[position] = (
            value if position == 0 else (1 - alpha) * smooth[position - 1] + alpha * value
        )
    return smooth


def reported_positions(context: int) -> list[int]:
    """Where the OOD curve enters the flat metrics: powers of two up to `context`, and `context` itself."""
    positions = [2**k for k in range(context.bit_length())]
    return positions if positions[-1] == context else [*positions, context]


class LanguageModelTask:
    """Next-token prediction on a prepared corpus; optionally the per-position loss on another one."""

    vocab_size = PADDED_VOCAB

    def __init__(self, config: LanguageModelConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        window = config.context + 1  # inputs are window[:-1], labels window[1:]
        count = config.eval_batches * config.eval_batch_size
        data_dir = Path(config.data_dir)
        self.train_tokens = _open_tokens(data_dir / "train.bin", window)
        self.val_windows = _windows(
            _open_tokens(data_dir / "val.bin", window), count, window, _VAL_STREAM
        )
        self.ood_windows = None
        if config.ood_data_dir is not None:
            ood_tokens = _open_tokens(Path(config.ood_data_dir) / "val.bin", window)
            self.ood_windows = _windows(ood_tokens, count, window, _OOD_STREAM)

    def train_batch(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Random windows of the train file: the same (seed, index), the same batch."""
        rng = np.random.default_rng([_TRAIN_STREAM, self.seed, index])
        window = self.config.context + 1
        starts = rng.integers(0, len(self.train_tokens) - window + 1, size=batch_size)
        tokens = torch.from_numpy(
            self.train_tokens[starts[:, None] + np.arange(window)].astype(np.int64)
        )
        return tokens[:, :-1], tokens[:, 1:]

    METRICS = (VAL_LOSS, OOD_LOSS, OOD_LOSS_EMA)  # the OOD ones also per position: `/pos64`

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """`val_loss`; with an OOD corpus also `ood_loss` (mean over positions) and its per-position
        curve at powers of two, raw (`ood_loss/pos64`) and smoothed (`ood_loss_ema/pos64`)."""
        batch_size = self.config.eval_batch_size
        metrics = {
            VAL_LOSS: float(per_position_loss(model, self.val_windows, device, batch_size).mean())
        }
        if self.ood_windows is not None:
            curve = per_position_loss(model, self.ood_windows, device, batch_size)
            smooth = ema(curve, OOD_EMA_ALPHA)
            metrics[OOD_LOSS] = float(curve.mean())
            for position in reported_positions(len(curve)):
                metrics[f"{OOD_LOSS}/pos{position}"] = float(curve[position - 1])
                metrics[f"{OOD_LOSS_EMA}/pos{position}"] = float(smooth[position - 1])
        return metrics

    def diagnostic_inputs(self, examples: int) -> dict[float, Tensor]:
        return {1.0: self.val_windows[:examples, :-1]}


def _open_tokens(path: Path, min_tokens: int) -> np.memmap:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; run `mosaic-sweep prepare` to tokenise a corpus into {path.parent}"
        )
    tokens = path.stat().st_size // np.dtype(np.uint16).itemsize
    if tokens < min_tokens:
        raise ValueError(
            f"{path} holds {tokens} tokens, fewer than one window of context + 1 = {min_tokens}"
        )
    return np.memmap(path, dtype=np.uint16, mode="r")


def _windows(tokens: np.ndarray, count: int, length: int, stream: int) -> Tensor:
    """`count` windows at positions fixed by `stream` alone: every trial seed sees the same ones."""
    starts = np.random.default_rng([stream]).integers(0, len(tokens) - length + 1, size=count)
    return torch.from_numpy(tokens[starts[:, None] + np.arange(length)].astype(np.int64))

"""GPT-2 BPE (SPEC §4) that also works offline.

`tiktoken.get_encoding("gpt2")` downloads its merge files on first use, which fails on machines
without internet. The same ranks ship as a `.tiktoken` file (tiktoken's `r50k_base`, also
`whisper/assets/gpt2.tiktoken` in the openai-whisper package, MIT): this package carries a copy
(`mosaic_core/assets/gpt2.tiktoken`), checked against tiktoken's own hash, so every route gives
the same token ids.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

EOT = 50256  # <|endoftext|>, appended after every document
PADDED_VOCAB = (
    50304  # 50257 rounded up to a multiple of 64: faster matmuls, the extra ids never occur
)
ENV_VAR = "MOSAIC_GPT2_TIKTOKEN"
PACKAGED_RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"

# GPT-2's pre-tokeniser regex and the sha256 tiktoken expects of the r50k_base (= GPT-2) ranks file
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_HOW_TO = (
    f"set {ENV_VAR} to a copy of GPT-2's ranks file (gpt2.tiktoken / r50k_base.tiktoken, e.g. from "
    "`pip download --no-deps openai-whisper`: whisper/assets/gpt2.tiktoken in the sdist)"
)


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2 BPE from, in order: $MOSAIC_GPT2_TIKTOKEN, the copy shipped with this package, an
    installed openai-whisper, tiktoken's download.

    Local files come first so that an offline machine never waits on the network; an explicitly
    named file that is missing or wrong is an error rather than something to skip past.
    """
    named = os.environ.get(ENV_VAR)
    if named:
        return _from_ranks_file(Path(named), f"${ENV_VAR}")
    if PACKAGED_RANKS.is_file():
        return _from_ranks_file(PACKAGED_RANKS, "mosaic_core/assets")
    whisper_file = _whisper_ranks_file()
    if whisper_file is not None:
        return _from_ranks_file(whisper_file, "openai-whisper")
    try:
        return tiktoken.get_encoding("gpt2")
    except (
        OSError,
        ValueError,
    ) as error:  # requests' errors are OSErrors; ValueError: bad download
        reason = f"tiktoken could not download it ({type(error).__name__})"
        raise RuntimeError(f"cannot load GPT-2 BPE: {reason}; {_HOW_TO}") from error


def _whisper_ranks_file() -> Path | None:
    """whisper/assets/gpt2.tiktoken of an installed openai-whisper, found without importing it (torch-heavy)."""
    spec = importlib.util.find_spec("whisper")
    if (
        spec is None or spec.submodule_search_locations is None
    ):  # absent, or an unrelated module `whisper`
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "assets" / "gpt2.tiktoken"
        if candidate.is_file():
            return candidate
    return None


def _from_ranks_file(path: Path, origin: str) -> tiktoken.Encoding:
    if not path.is_file():
        raise FileNotFoundError(
            f"GPT-2 ranks file {path} (from {origin}) does not exist; {_HOW_TO}"
        )
    if hashlib.sha256(path.read_bytes()).hexdigest() != _RANKS_SHA256:
        raise ValueError(
            f"{path} (from {origin}) is not GPT-2's ranks file (sha256 differs); {_HOW_TO}"
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_PAT_STR,
        mergeable_ranks=load_tiktoken_bpe(str(path), expected_hash=_RANKS_SHA256),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=EOT + 1,
    )

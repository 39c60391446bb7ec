"""Tests never touch the network: the Hugging Face hub and datasets run offline, so a wrong
name fails at once instead of after connection retries (the hub code path stays the same)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the flat modules at the top level


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> str:
    """A tiny randomly initialised GPT-2 with GPT-2's real tokenizer (no downloads)."""
    import activations

    return str(activations.tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2") / "gpt2"))

"""Tests never touch the network: the Hugging Face hub and datasets run offline, so a wrong
name fails at once instead of after connection retries (the hub code path stays the same).

`pytest --device cuda` runs every test that takes the `device` fixture (the dictionaries, the
sparsifiers, sparse_decode, metrics, probing, a short train.py run) on that device; the default
is the CPU, which is what CI runs."""
import os
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the flat modules at the top level


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device of the model tests: cpu (default) | cuda | cuda:N")


@pytest.fixture(scope="session")
def device(request):
    """The torch.device given by --device (default cpu); a CUDA device that is not there is a usage error."""
    import torch

    name = request.config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name} asked for, but torch sees no CUDA device")
    return dev


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> str:
    """A tiny randomly initialised GPT-2 with GPT-2's real tokenizer (no downloads)."""
    from tiny_gpt2 import tiny_gpt2

    return str(tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2") / "gpt2"))


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """ctrl_c_at(s): from now on train.py receives a SIGINT (Ctrl-C) while it starts step s; it
    finishes that step, saves and stops. ctrl_c_at(None) disarms it."""
    import train

    real = train.get_lr

    def arm(step: int | None) -> None:
        def get_lr(s, cfg, total):
            if s == step:
                os.kill(os.getpid(), signal.SIGINT)
            return real(s, cfg, total)

        monkeypatch.setattr(train, "get_lr", real if step is None else get_lr)

    return arm

"""Data-parallel training with torchrun (gloo, 2 CPU processes) gives the 1-process model."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import activations
import sae
import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    gpt2 = activations.tiny_gpt2(base / "gpt2")
    cache = base / "acts"
    activations.build_cache(cache, str(gpt2), [0, 1, 2], n_tokens=4096, context=64, multi=True, drop_outliers=10.0)
    return str(gpt2), str(cache)


def flags(setup, out, *extra):
    gpt2, cache = setup
    return ["--model", gpt2, "--layers", "0-2", "--cache", cache, "--tokens", "2048", "--eval-tokens", "512",
            "--batch-size", "128", "--context", "64", "--n-latents", "96", "--k", "6", "--dead-tokens", "512", "--lr", "3e-3",
            "--device", "cpu", "--ckpt-every", "0", "--out", str(out), *extra]


def torchrun(args, nproc=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", str(ROOT / "train.py"), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def assert_same_model(a_dir, b_dir, atol=1e-5):
    a, b = sae.load(a_dir), sae.load(b_dir)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(v.float(), w.float(), atol=atol), (k, (v.float() - w.float()).abs().max())


def test_rank_shards_are_disjoint_and_cover_each_global_batch():
    for step in (0, 5, 17):
        full = train.batch_indices(step, 64, 1000, seed=3)
        shards = [full[r::4] for r in range(4)]
        joined = torch.cat(shards)
        assert len(joined) == 64 and len(set(joined.tolist())) == 64
        assert set(joined.tolist()) == set(full.tolist())
    # an epoch of steps visits every training token at most once
    seen = torch.cat([train.batch_indices(s, 64, 1000, seed=3) for s in range(1000 // 64)])
    assert len(set(seen.tolist())) == len(seen)


@pytest.mark.parametrize("sparsity", ["batchtopk", "topk"])
def test_two_ranks_equal_one_rank(setup, tmp_path, sparsity):
    extra = ["--dict", "crosscoder", "--sparsity", sparsity, "--mask-prob", "0"]
    torchrun(flags(setup, tmp_path / "one", *extra), nproc=1)   # same launcher, same 1 thread per process
    res = torchrun(flags(setup, tmp_path / "two", *extra))
    assert_same_model(tmp_path / "one", tmp_path / "two")
    # only rank 0 writes: one checkpoint, one model, one summary, and one progress report
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "checkpoint.pt", "config.json", "model.safetensors", "summary.json"]
    assert res.stdout.count("wrote ") == 1


def test_resume_on_a_different_number_of_ranks(setup, tmp_path, monkeypatch):
    extra = ["--dict", "sae", "--sparsity", "batchtopk"]
    train.train(train.parse_args(flags(setup, tmp_path / "ref", *extra)))
    real = train.get_lr

    def interrupt(step, cfg, total):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, cfg, total)

    monkeypatch.setattr(train, "get_lr", interrupt)
    assert train.train(train.parse_args(flags(setup, tmp_path / "part", *extra)))["steps"] == 7
    torchrun(flags(setup, tmp_path / "part", *extra, "--resume"))  # 1 rank → 2 ranks
    for layer in (0, 1, 2):
        assert_same_model(tmp_path / "ref" / f"layer_{layer}", tmp_path / "part" / f"layer_{layer}")

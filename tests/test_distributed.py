"""Data-parallel training with torchrun (gloo, 2 CPU processes) gives the 1-process model."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import cache as activation_cache
from support import corpora
from support import batches
import train
from tiny_gpt2 import tiny_gpt2
from support import saved

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    gpt2 = tiny_gpt2(base / "gpt2")
    cache = base / "acts"
    activation_cache.build_cache(cache, str(gpt2), [0, 1, 2], n_tokens=4096, context=64, multi=True, drop_outliers=10.0)
    return str(gpt2), str(cache)


def flags(setup, out, *extra):
    gpt2, cache = setup
    return ["--model", gpt2, "--layers", "0-2", "--cache", cache, "--tokens", "2048", "--eval-tokens", "512",
            "--batch-size", "128", "--context", "64", "--n-latents", "96", "--k", "6", "--dead-tokens", "512", "--lr", "3e-3",
            "--device", "cpu", "--ckpt-every", "0", "--out", str(out), *extra]


def torchrun(args, nproc=2, script="train.py", env=None, expect=0):
    """Run `script` (train.py or the instrumented tests/train_worker.py) on nproc gloo ranks. The
    timeout only guards against a hang (the defect this file tests for), it times nothing."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", str(ROOT / script), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == expect, res.stderr[-3000:]
    return res


def assert_same_model(a_dir, b_dir, atol=1e-5):
    a, b = saved.load(a_dir), saved.load(b_dir)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(v.float(), w.float(), atol=atol), (k, (v.float() - w.float()).abs().max())


def test_rank_shards_are_disjoint_and_cover_each_global_batch():
    for step in (0, 5, 17):
        full = batches.batch_indices(step, 64, 1000, seed=3)
        shards = [full[r::4] for r in range(4)]
        joined = torch.cat(shards)
        assert len(joined) == 64 and len(set(joined.tolist())) == 64
        assert set(joined.tolist()) == set(full.tolist())
    # an epoch of steps visits every training token at most once
    seen = torch.cat([batches.batch_indices(s, 64, 1000, seed=3) for s in range(1000 // 64)])
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


def test_a_set_of_dictionaries_on_two_ranks_equals_one_rank(setup, tmp_path):
    """Several dictionaries from one stream under torchrun: each DDP-wrapped on its own, rank 0 writes the set."""
    extra = ["--dict", "crosscoder", "--mask-prob", "0", "--dict", "fmxcoder", "--rank", "16", "--mask-prob", "0"]
    torchrun(flags(setup, tmp_path / "one", *extra), nproc=1)
    torchrun(flags(setup, tmp_path / "two", *extra))
    for name in ("crosscoder", "fmxcoder"):
        assert_same_model(tmp_path / "one" / name, tmp_path / "two" / name)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "crosscoder", "fmxcoder",
                                                                     "summary.json"]


def test_resume_on_a_different_number_of_ranks(setup, tmp_path, ctrl_c_at):
    extra = ["--dict", "sae", "--sparsity", "batchtopk"]
    train.train(train.parse_args(flags(setup, tmp_path / "ref", *extra)))
    ctrl_c_at(6)
    assert train.train(train.parse_args(flags(setup, tmp_path / "part", *extra)))["steps"] == 7
    torchrun(flags(setup, tmp_path / "part", *extra, "--resume"))  # 1 rank → 2 ranks
    for layer in (0, 1, 2):
        assert_same_model(tmp_path / "ref" / f"layer_{layer}", tmp_path / "part" / f"layer_{layer}")


# ----------------------------------------------------------------------------------------
# Streaming (--cache none) on several ranks, per-rank randomness, multi-rank resume
# ----------------------------------------------------------------------------------------


def stream_flags(gpt2, out, dataset, *extra):
    return ["--model", gpt2, "--layers", "0-2", "--cache", "none", "--dataset", str(dataset), "--tokens", "2048",
            "--eval-tokens", "256", "--batch-size", "128", "--context", "64", "--n-latents", "96", "--k", "6",
            "--dead-tokens", "512", "--lr", "3e-3", "--device", "cpu", "--ckpt-every", "0", "--out", str(out), *extra]


def rank_states(dump):
    return [torch.load(Path(dump) / f"rank{r}.pt") for r in (0, 1)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of very uneven length: rank 0 (documents 0, 2, 4, ...) gets one long text, rank 1
    (documents 1, 3, ...) only short ones, so rank 1's stream ends long before rank 0's."""
    texts = corpora.bbc_news()[0]
    d = tmp_path_factory.mktemp("uneven")
    (d / "a000.txt").write_text(" ".join(texts[:80]))         # ~40k tokens for rank 0
    for i in range(1, 26):                                     # rank 1: 12 articles, ~6k tokens
        (d / f"a{i:03d}.txt").write_text(texts[100 + i] if i % 2 else texts[100 + i][:200])
    return d


def test_streamed_ranks_hold_identical_models(setup, corpus, tmp_path):
    """Each rank sets b_dec from its own documents: without the broadcast from rank 0 the two
    models differ in b_dec (and then everywhere). Gathered tensor by tensor, they must be equal."""
    dump = tmp_path / "dump"
    dump.mkdir()
    torchrun(stream_flags(setup[0], tmp_path / "run", corpus, "--dict", "crosscoder", "--tokens", "768"),
             script="tests/train_worker.py", env={"FMX_DUMP": str(dump)})
    a, b = rank_states(dump)
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_streamed_ranks_stop_together_when_one_runs_out_of_documents(setup, corpus, tmp_path):
    """Rank 1's short documents end after a few batches; rank 0 could go on. Both must stop at the
    same step (the old code left rank 0 waiting in the next step's collective forever)."""
    dump = tmp_path / "dump"
    dump.mkdir()
    res = torchrun(stream_flags(setup[0], tmp_path / "run", corpus, "--dict", "sae", "--tokens", "100000"),
                   script="tests/train_worker.py", env={"FMX_DUMP": str(dump)})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_exhausted"] and summary["complete"] and 0 < summary["steps"] < summary["steps_planned"]
    assert "the data ran out" in res.stdout
    a, b = rank_states(dump)
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_masks_differ_between_ranks_and_a_multi_rank_resume_is_exact(setup, tmp_path):
    """With layer masking each rank draws its own masks (seeded by seed, rank and step), and a
    2-rank run interrupted by Ctrl-C on rank 0 and resumed on 2 ranks equals the uninterrupted one."""
    extra = ["--dict", "crosscoder", "--mask-prob", "0.3", "--sparsity", "batchtopk"]
    full, dump = tmp_path / "full", tmp_path / "dump"
    dump.mkdir()
    torchrun(flags(setup, full, *extra), script="tests/train_worker.py", env={"FMX_DUMP": str(dump)})
    m0, m1 = (torch.load(dump / f"masks{r}.pt") for r in (0, 1))
    assert len(m0) == len(m1) == 16 and m0 != m1
    part = tmp_path / "part"
    res = torchrun(flags(setup, part, *extra), script="tests/train_worker.py", env={"FMX_SIGINT_AT": "6"}, expect=1)
    assert "exitcode  : 130" in res.stderr                   # train.py's code; torchrun itself exits 1
    assert json.loads((part / "summary.json").read_text())["complete"] is False
    torchrun(flags(setup, part, *extra, "--resume"))
    assert json.loads((part / "summary.json").read_text())["complete"] is True
    assert_same_model(full, part, atol=0)

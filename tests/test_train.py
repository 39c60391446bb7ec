"""train.py end to end on a tiny random GPT-2 (real GPT-2 tokenizer, no downloads)."""

import json

import pytest
import torch

from support import progress, runs
from support import cache as activation_cache
from support import corpora
import train
import core
from support import saved


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("acts"))


def flags(gpt2_dir, cache_dir, out, *extra):
    return ["--model", gpt2_dir, "--layers", "0-3", "--tokens", "3072", "--eval-tokens", "1024",
            "--batch-size", "128", "--n-latents", "128", "--k", "8", "--context", "64",
            "--cache", cache_dir, "--out", str(out), "--device", "cpu", "--dead-tokens", "1000",
            "--ckpt-every", "0", "--lr", "3e-3", *extra]


@pytest.mark.parametrize("kind,extra", [
    ("sae", []),
    ("crosscoder", ["--mask-prob", "0.05"]),
    ("fmxcoder", ["--factorization", "tr", "--rank", "16"]),
    ("fmxcoder", ["--factorization", "cp", "--rank", "64"]),
    ("polysae", ["--ranks", "64,16,16"]),
])
def test_each_dictionary_trains_saves_and_reconstructs(gpt2_dir, cache_dir, tmp_path, kind, extra, device):
    """A short train.py run of every kind on the test device (pytest --device cuda: the LM, the
    harvest, the training and the export run there)."""
    out = tmp_path / kind
    summary = train.train(train.parse_args(flags(gpt2_dir, cache_dir, out, "--dict", kind, *extra,
                                                 "--device", str(device))))
    assert summary["complete"] and summary["steps"] == 3072 // 128
    entries = saved.load_run(out)
    cache = activation_cache.ActivationCache(cache_dir)
    n_train = summary["eval"] and cache.n_tokens - entries[0][2]["run"]["eval_tokens"]
    x = cache.read(n_train, cache.n_tokens) * cache.scale[:, None]
    expected_layers = [[0], [1], [2], [3]] if kind in ("sae", "polysae") else [[0, 1, 2, 3]]
    assert [e[0] for e in entries] == expected_layers
    for layers, model, meta in entries:
        model.eval()
        xi = x[:, layers[0]] if len(layers) == 1 else x
        with torch.no_grad():
            recon = model(xi).recon
        # reconstructs better than predicting the mean of the held-out tokens
        assert core.fvu(xi, recon).item() < 0.9
        assert meta["train"]["dictionaries"][0]["kind"] == kind and meta["run"]["dict"] == kind and meta["run"]["hooks"]


def test_resume_matches_uninterrupted_run(gpt2_dir, cache_dir, tmp_path, ctrl_c_at):
    common = ["--dict", "crosscoder", "--sparsity", "batchtopk", "--mask-prob", "0.1", "--tokens", "2560",
              "--decay", "cosine", "--warmup-steps", "3"]
    full = tmp_path / "full"
    train.train(train.parse_args(flags(gpt2_dir, cache_dir, full, *common)))

    part = tmp_path / "part"
    ctrl_c_at(7)                    # the loop finishes step 7, then saves
    s1 = train.train(train.parse_args(flags(gpt2_dir, cache_dir, part, *common)))
    assert s1["steps"] == 8
    ctrl_c_at(None)
    s2 = train.train(train.parse_args(flags(gpt2_dir, cache_dir, part, *common, "--resume")))
    assert s2["steps"] == 20
    a, b = saved.load(full), saved.load(part)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(v, w, atol=1e-6), k


def test_interrupted_constant_lr_run_can_be_extended(gpt2_dir, cache_dir, tmp_path, ctrl_c_at):
    """With --decay none the first s steps of a longer run are the same steps: an interrupted run
    resumes with a larger --tokens and equals the longer run; with a decaying lr it is refused."""
    common = ["--dict", "crosscoder", "--sparsity", "batchtopk", "--mask-prob", "0.1", "--cache-tokens", "4096"]
    full = tmp_path / "full"
    train.train(train.parse_args(flags(gpt2_dir, cache_dir, full, *common, "--tokens", "2560")))
    part = tmp_path / "part"
    ctrl_c_at(5)
    assert train.train(train.parse_args(flags(gpt2_dir, cache_dir, part, *common, "--tokens", "1280")))["steps"] == 6
    ctrl_c_at(None)
    with pytest.raises(runs.RunFolderError, match="tokens"):   # the data read depends on --tokens without --cache-tokens
        train.train(train.parse_args(flags(gpt2_dir, cache_dir, part, *common[:-2], "--tokens", "2560", "--resume")))
    s = train.train(train.parse_args(flags(gpt2_dir, cache_dir, part, *common, "--tokens", "2560", "--resume")))
    assert s["steps"] == 20 and s["complete"]
    a, b = saved.load(full), saved.load(part)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(v, w, atol=1e-6), (k, (v-w).abs().max(), s)


@pytest.mark.parametrize("extra,message", [
    (["--model", "no-such-model-xyz"], "unknown model 'no-such-model-xyz'"),
    (["--layers", "0-9"], "out of range"),
    (["--k", "128"], "--k must be smaller than --n-latents"),
    (["--dict", "fmxcoder", "--factorization", "cp", "--rank", "8"], "rank"),
    (["--dict", "fmxcoder", "--factorization", "tr", "--rank", "100000"], "rank"),
    (["--dict", "transcoder"], "--dict must be one of"),
    (["--dataset", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--lm-dtype", "fp8"], "--lm-dtype must be one of float32, bfloat16, float16, got 'fp8'"),
    (["--cache-tokens", "1000"], "--cache-tokens must exceed --eval-tokens 1024"),
])
def test_bad_input_gives_one_line_error(gpt2_dir, cache_dir, tmp_path, capsys, extra, message):
    code = train.main(flags(gpt2_dir, str(tmp_path / "fresh-cache"), tmp_path / "o", *extra))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]   # (transformers may print a loading bar before it)
    assert code == 2
    assert last.startswith("error: ") and message in last and "Traceback" not in err


def test_unwritable_out_and_cache_mismatch(gpt2_dir, cache_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train.main(flags(gpt2_dir, cache_dir, blocker / "sub")) == 2
    err = capsys.readouterr().err
    assert "cannot create the run folder" in err and "(a file, not a folder)" in err
    # a cache made for layers 0-3 of the tiny GPT-2 cannot serve layers 1,2
    activation_cache.build_cache(cache_dir, gpt2_dir, [0, 1, 2, 3], n_tokens=4096, context=64, multi=True, drop_outliers=10.0)
    assert train.main(flags(gpt2_dir, cache_dir, tmp_path / "o", "--layers", "1,2")) == 2
    assert "layers" in capsys.readouterr().err


def test_cache_tokens_one_big_cache_for_several_runs(gpt2_dir, tmp_path, capsys):
    """--cache-tokens harvests more than one run needs; each run trains on random batches of all of
    it but the held-out end, and records the LM dtype it was harvested with."""
    cache = str(tmp_path / "big")
    args = flags(gpt2_dir, cache, tmp_path / "a", "--dict", "sae", "--layers", "1", "--cache-tokens", "12000",
                 "--lm-dtype", "bfloat16")
    train.train(train.parse_args(args))
    assert activation_cache.ActivationCache(cache).n_tokens == 12000
    [(_, _, meta)] = saved.load_run(tmp_path / "a")
    assert meta["run"]["train_tokens"] == 12000 - 1024 and meta["run"]["lm_dtype"] == "bfloat16"
    assert train.main(flags(gpt2_dir, "none", tmp_path / "b", "--cache-tokens", "6000")) == 2
    assert "--cache none streams" in capsys.readouterr().err


def test_streaming_without_a_cache(gpt2_dir, tmp_path, device):
    """--cache none: held-out tokens first (more than the 4,096 used for the scale), then training
    batches from the shuffle buffer (on the device); the exported model reconstructs its held-out
    tokens, and the summary splits the time between producing data and training."""
    args = flags(gpt2_dir, "none", tmp_path / "s", "--dict", "sae", "--layers", "1", "--eval-tokens", "4608",
                 "--tokens", "2048", "--device", str(device))
    summary = train.train(train.parse_args(args))
    [(layers, model, meta)] = saved.load_run(tmp_path / "s")
    assert layers == [1] and meta["run"]["cache"] is None and meta["run"]["eval_tokens"] == 4608
    assert summary["steps"] == 16
    assert 0 < summary["eval"]["1"]["fvu"] < 0.9
    assert all(torch.isfinite(p).all() for p in model.parameters())
    t = summary["time"]
    assert t["loop_s"] > 0 and t["data_s"] > 0 and 0 <= t["waited_for_data_s"] <= t["loop_s"]


def test_passes_repeat_a_finite_streamed_corpus_without_its_held_out_tokens(gpt2_dir, tmp_path):
    """--cache none over a corpus of ~7k tokens: one pass runs out after a few steps, two passes
    train on the same training tokens twice (the held-out ones never)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(corpora.bbc_news()[0][:20]):
        (corpus / f"{i:02d}.txt").write_text(text)
    runs = {}
    for passes in (1, 2):
        args = flags(gpt2_dir, "none", tmp_path / f"p{passes}", "--dict", "sae", "--layers", "1", "--dataset",
                     str(corpus), "--eval-tokens", "512", "--tokens", "100000", "--passes", str(passes))
        runs[passes] = train.train(train.parse_args(args))
    one, two = runs[1], runs[2]
    assert one["data_exhausted"] and two["data_exhausted"]
    # pass 1 trains on the tokens after the 512 held out; pass 2 on the same ones again
    assert abs(two["steps"] - 2 * one["steps"]) <= 1


def test_the_loop_reads_the_device_only_every_log_every_steps(gpt2_dir, cache_dir, tmp_path, monkeypatch, device):
    """Between two progress readings (--log-every), the training loop's own thread makes no
    host-device synchronisation: no .item(), bool/int/float of a tensor, tolist, nonzero or boolean
    indexing (counted on the CPU; on CUDA torch.cuda.set_sync_debug_mode("error") also raises on
    syncs inside torch). Evaluation and checkpoints (outside the steps) are not counted; the
    background data thread is not either."""
    import threading

    from test_sparse_backward import SyncCounter

    class LoopCounter(SyncCounter):
        paused = 0

        def _counts(self):
            return threading.current_thread() is threading.main_thread() and not self.paused

        def _wrap(self, name, fn):
            def wrapper(t, *a, **kw):
                if self._counts():
                    self.calls.append(name)
                return fn(t, *a, **kw)
            return wrapper

        def _wrap_index(self, name, fn):
            inner = SyncCounter._wrap_index(self, name, fn)

            def wrapper(t, index, *a):
                return inner(t, index, *a) if self._counts() else fn(t, index, *a)
            return wrapper

    counter, reads, cuda = LoopCounter(), [], torch.device(device).type == "cuda"

    def paused(fn, record=None):
        def wrapper(*a, **kw):
            counter.paused += 1
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            try:
                if record is not None:
                    record.append(1)
                return fn(*a, **kw)
            finally:
                counter.paused -= 1
                if cuda and counting:
                    torch.cuda.set_sync_debug_mode("error")
        return wrapper

    monkeypatch.setattr(progress.Logs, "read", paused(progress.Logs.read, reads))
    monkeypatch.setattr(train, "evaluate", paused(train.evaluate))
    monkeypatch.setattr(runs.RunFolder, "save_checkpoint", paused(runs.RunFolder.save_checkpoint))
    real_step, real_fit, counting = core.train_step, train.fit, []

    def step(*a, **kw):                 # count from the second step on: on a GPU the first step reads
        out = real_step(*a, **kw)       # the dead counter once (core.HostMirror), and fit's setup copies
        if not counting:                # the scales to the device
            counting.append(counter.counting(device))
            counting[0].__enter__()
        return out

    def counted_fit(*a, **kw):
        try:
            return real_fit(*a, **kw)
        finally:
            if counting:
                counting.pop().__exit__(None, None, None)

    monkeypatch.setattr(core, "train_step", step)
    monkeypatch.setattr(train, "fit", counted_fit)
    args = flags(gpt2_dir, cache_dir, tmp_path / "r", "--dict", "crosscoder", "--sparsity", "batchtopk",
                 "--mask-prob", "0.1", "--log-every", "10", "--ckpt-every", "10", "--dead-tokens", "256",
                 "--device", str(device))
    summary = train.train(train.parse_args(args))
    assert summary["steps"] == 24 and len(reads) == 3          # steps 10, 20 and the last one
    assert counter.calls == []


# ----------------------------------------------------------------------------------------
# Several dictionaries from one stream of batches
# ----------------------------------------------------------------------------------------

SET = ["--dict", "crosscoder", "--mask-prob", "0.1", "--dict", "fmxcoder", "--rank", "16", "--dict", "sae",
       "--sparsity", "topk"]
ALONE = {"crosscoder": ["--dict", "crosscoder", "--mask-prob", "0.1"], "fmxcoder": ["--dict", "fmxcoder", "--rank", "16"],
         "sae": ["--dict", "sae", "--sparsity", "topk"]}


def assert_same_dicts(a_dir, b_dir):
    a, b = saved.load_run(a_dir), saved.load_run(b_dir)
    assert [la for la, _, _ in a] == [lb for lb, _, _ in b]
    for (_, ma, _), (_, mb, _) in zip(a, b):
        for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
            assert torch.equal(v, w), k


def test_dictionaries_trained_together_equal_each_trained_alone(gpt2_dir, cache_dir, tmp_path):
    """One harvest, three dictionaries on the same batches, each its own optimiser, init and masks: each
    equals the same dictionary trained alone, bit for bit (the same computation)."""
    both = tmp_path / "set"
    summary = train.train(train.parse_args(flags(gpt2_dir, cache_dir, both, "--tokens", "1536", *SET)))
    assert summary["complete"] and summary["steps"] == 12
    assert sorted(p.name for p in both.iterdir()) == ["checkpoint.pt", "crosscoder", "fmxcoder", "sae", "summary.json"]
    assert sorted(json.loads((both / "summary.json").read_text())["dictionaries"]) == ["crosscoder", "fmxcoder", "sae"]
    for name, extra in ALONE.items():
        alone = tmp_path / name
        train.train(train.parse_args(flags(gpt2_dir, cache_dir, alone, "--tokens", "1536", *extra)))
        assert_same_dicts(both / name, alone)
        own = json.loads((both / name / "summary.json").read_text())
        assert own["run"]["name"] == name and own["run"]["dict"] == name


def test_a_set_of_dictionaries_resumes_exactly(gpt2_dir, cache_dir, tmp_path, ctrl_c_at):
    full, part = tmp_path / "full", tmp_path / "part"
    common = flags(gpt2_dir, cache_dir, full, "--tokens", "1536", "--ckpt-every", "4", *SET)
    train.train(train.parse_args(common))
    ctrl_c_at(6)
    assert train.train(train.parse_args(flags(gpt2_dir, cache_dir, part, "--tokens", "1536", "--ckpt-every", "4",
                                              *SET)))["steps"] == 7
    ctrl_c_at(None)
    train.train(train.parse_args(flags(gpt2_dir, cache_dir, part, "--tokens", "1536", "--ckpt-every", "4", *SET,
                                       "--resume")))
    for name in ALONE:
        assert_same_dicts(full / name, part / name)


@pytest.mark.parametrize("argv,message", [
    (["--dict", "sae", "--name", "a", "--dict", "crosscoder", "--name", "a"], "--name 'a' names two dictionaries: each needs a name of its own"),
    (["--dict", "sae", "--rank", "8"], "--rank is not an option of --dict sae"),
    (["--rank", "8", "--dict", "sae", "--dict", "polysae"], "--rank is not an option of --dict sae, polysae"),
    (["--name", "x", "--dict", "sae", "--dict", "crosscoder"], "--name names the --dict before it"),
    (["--dict", "sae", "--name", "a/b"], "--name 'a/b' must start with a letter or digit and hold only letters"),
    (["--dict", "crosscoder,transcoder"], "--dict must be one of sae, crosscoder, fmxcoder, polysae, got 'transcoder'"),
])
def test_incompatible_sets_are_refused_in_one_line(gpt2_dir, cache_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    assert train.main(flags(gpt2_dir, cache_dir, out, *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_a_time_limit_ends_the_run_complete_at_the_step_it_reached(gpt2_dir, cache_dir, tmp_path, capsys,
                                                                   monkeypatch):
    import time

    real = train.get_lr
    monkeypatch.setattr(train, "get_lr", lambda s, cfg, total: (time.sleep(3.1) if s == 3 else None) or
                        real(s, cfg, total))                     # step 3 outlasts the limit: the run ends after it
    out = tmp_path / "run"
    summary = train.train(train.parse_args(flags(gpt2_dir, cache_dir, out, "--dict", "crosscoder",
                                                 "--time-limit", "3")))
    assert summary["time_limit_reached"] and summary["complete"] and 1 <= summary["steps"] <= 4
    assert f"--time-limit 3 s reached after {summary['steps']} of 24 steps" in capsys.readouterr().out
    assert saved.load(out)                                       # exported as a finished run
    # (a limit reached before the first step saves a failed run: tests/test_faults3.py)

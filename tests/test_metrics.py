"""metrics.py: every metric against a hand-built case or an independent reference."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

import activations
from support import cache as activation_cache
from support import corpora
import metrics
from crosscoder import CrossCoder, CrossCoderConfig
from polysae import PolySAE, PolySAEConfig
import core
from support import evaluate, saved


def fake_output(recon, latents):
    z = torch.zeros(())
    return core.Output(recon, latents, latents, z, z, z, z)


def naive_fvu(x, x_hat):
    """One shot, float64: Σ‖x − x̂‖² / Σ‖x − mean‖² over all tokens (and layers)."""
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


def accumulate(x, recon, latents, sizes):
    st, lo = metrics.ReconStats(), 0
    for n in sizes:
        st.update(x[lo:lo + n], fake_output(recon[lo:lo + n], latents[lo:lo + n]))
        lo += n
    assert lo == len(x)
    return st


# ----------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------


def test_fvu_is_zero_for_perfect_and_one_for_predicting_the_mean():
    torch.manual_seed(0)
    x = torch.randn(300, 3, 8) * 2 + 5
    ones = torch.ones(3)
    lat = torch.rand(300, 16)
    perfect = accumulate(x, x.clone(), lat, [300]).result(ones, ones)
    assert perfect["fvu"] == 0 and perfect["mse_raw"] == 0
    mean = accumulate(x, x.mean(0).expand_as(x), lat, [7, 100, 193]).result(ones, ones)
    assert mean["fvu"] == pytest.approx(1.0, abs=1e-9)
    assert mean["fvu_per_layer"] == pytest.approx([1.0] * 3, abs=1e-9)


def test_fvu_accumulated_over_uneven_batches_equals_one_shot_formula(device):
    torch.manual_seed(1)
    x = torch.randn(1000, 2, 16) * 3 + 1000.0       # a large offset: naive Σx² − (Σx)²/n would suffer
    recon = x + 0.5 * torch.randn_like(x)
    lat = torch.rand(1000, 32)
    x, recon, lat = x.to(device), recon.to(device), lat.to(device)
    ones = torch.ones(2)
    got = accumulate(x, recon, lat, [1, 2, 997 - 300, 300]).result(ones, ones)
    assert got["fvu"] == pytest.approx(naive_fvu(x, recon), rel=1e-6)
    for l in range(2):
        assert got["fvu_per_layer"][l] == pytest.approx(naive_fvu(x[:, l], recon[:, l]), rel=1e-6)
    one = accumulate(x, recon, lat, [1000]).result(ones, ones)
    assert got["fvu"] == pytest.approx(one["fvu"], rel=1e-9)


def test_merge_moments_matches_numpy_mean_and_variance():
    rng = np.random.default_rng(2)
    x = rng.normal(5, 3, size=(101, 4))
    acc = (0, None, None)
    for lo, hi in [(0, 1), (1, 40), (40, 101)]:
        acc = metrics.merge_moments(acc, metrics.moments(torch.tensor(x[lo:hi])))
    n, mean, m2 = acc
    assert n == 101
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m2.numpy() / n, x.var(0), rtol=1e-10)


def test_mse_sums_over_d_and_averages_over_tokens_in_raw_and_normalised_units():
    torch.manual_seed(3)
    x_raw = torch.randn(50, 2, 4)
    err_raw = 0.1 * torch.randn(50, 2, 4)
    s_model = torch.tensor([2.0, 0.5])          # what the dictionary reads: x_raw · s
    s_norm = torch.tensor([3.0, 4.0])           # the data's normalising scale
    x_model = x_raw * s_model[:, None]
    recon_model = (x_raw + err_raw) * s_model[:, None]
    st = accumulate(x_model, recon_model, torch.rand(50, 8), [13, 37])
    r = st.result(s_model, s_norm)
    per_layer = [0.0, 0.0]
    for n in range(50):                          # naive loop, raw units
        for l in range(2):
            for d in range(4):
                per_layer[l] += float(err_raw[n, l, d]) ** 2
    per_layer = [v / 50 for v in per_layer]
    assert r["mse_raw_per_layer"] == pytest.approx(per_layer, rel=1e-5)
    assert r["mse_raw"] == pytest.approx(sum(per_layer), rel=1e-5)
    assert r["mse_norm"] == pytest.approx(9 * per_layer[0] + 16 * per_layer[1], rel=1e-5)
    assert metrics.mse(x_raw + err_raw, x_raw).item() == pytest.approx(sum(per_layer), rel=1e-5)


def test_l0_and_dead_fraction_on_eval_tokens():
    lat = torch.zeros(4, 5)
    lat[0, [0, 1]] = 1.0
    lat[1, 1] = 2.0
    lat[3, [0, 1, 2]] = 0.5      # latents 3 and 4 never fire
    x = torch.randn(4, 3)
    r = accumulate(x, x, lat, [3, 1]).result(torch.ones(1), torch.ones(1))
    assert r["l0"] == pytest.approx(6 / 4)
    assert r["dead_eval"] == pytest.approx(2 / 5)


# ----------------------------------------------------------------------------------------
# Functional coherence and decoder-norm spread
# ----------------------------------------------------------------------------------------


def hand_crosscoder(L=4, d=6):
    """Latent 0 reads only layer 0, latent 1 reads all L layers equally, latents 2, 3 never fire."""
    cc = CrossCoder(CrossCoderConfig(d_in=d, n_latents=4, k=2, n_layers=L, sparsity="topk"))
    w = torch.zeros(d)
    w[0] = 1.0
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, :, 0] = w
        cc.W_enc[:, :, 1] = w
        cc.W_enc[:, :, 2:] = -w[None, :, None]
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc.eval()


def test_fc_is_one_for_a_single_layer_latent_and_L_for_an_all_layer_latent(device):
    L = 4
    cc = hand_crosscoder(L).to(device)
    torch.manual_seed(4)
    v = torch.randn(64, 6)
    v[:, 0] = v[:, 0].abs() + 0.1                   # the read direction is positive: latents 0, 1 fire
    x = v[:, None, :].expand(64, L, 6).contiguous().to(device)  # the same vector at every layer
    dsum, fires = metrics.layer_deltas(cc, x)
    assert fires.tolist() == [64, 64, 0, 0]
    delta = dsum / fires.clamp_min(1)[:, None]
    assert delta[0].tolist() == pytest.approx([1.0, 0, 0, 0], abs=1e-6)       # only layer 0 matters
    assert delta[1].tolist() == pytest.approx([1 / L] * L, abs=1e-6)          # each layer is 1/L of it
    fc = metrics.functional_coherence(cc, [x[:20], x[20:]], min_fires=1, bins=3)
    assert fc["fc_latents"] == 2
    assert fc["fc_mean"] == pytest.approx((1 + L) / 2, abs=1e-5)
    assert fc["fc_frac_ge2"] == pytest.approx(0.5)
    assert fc["fc_hist"] == [1, 0, 1]              # FC 1 in the first bin, FC L in the last


def test_decoder_norm_spread_on_hand_built_norms():
    norms = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    assert metrics.spread(norms).tolist() == pytest.approx([1.0, 3.0, 1.5, 2.0])


def test_fc_report_includes_decoder_norm_spread_of_the_crosscoder(device):
    L = 3
    cc = hand_crosscoder(L)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0, 0] = 1.0                      # latent 0 writes only layer 0: spread 1
        cc.W_dec[1, :, 1] = 2.0                      # latent 1 writes all layers equally: spread L
    v = torch.randn(32, 6)
    v[:, 0] = v[:, 0].abs() + 0.1
    x = v[:, None].expand(32, L, 6).contiguous()
    fc = metrics.functional_coherence(cc.to(device), [x.to(device)], min_fires=1)
    assert fc["norm_spread_mean"] == pytest.approx((1 + L) / 2)


# ----------------------------------------------------------------------------------------
# Wasserstein
# ----------------------------------------------------------------------------------------


def test_wasserstein_equals_scipy_on_unequal_samples(device):
    rng = np.random.default_rng(5)
    u = rng.normal(0, 1, size=(37, 6))
    v = rng.exponential(2, size=(91, 6))
    u[:5, 0] = 0.0                                   # ties and zeros, as in sparse latents
    v[:40, 0] = 0.0
    got = metrics.wasserstein_1d(torch.tensor(u, device=device), torch.tensor(v, device=device)).cpu().numpy()
    want = [wasserstein_distance(u[:, i], v[:, i]) for i in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_class_wasserstein_is_the_mean_over_latents_one_vs_rest():
    rng = np.random.default_rng(6)
    feats = rng.gamma(1.0, 1.0, size=(60, 5))
    labels = np.array(["a"] * 10 + ["b"] * 20 + ["c"] * 30)
    r = metrics.class_wasserstein(torch.tensor(feats), labels, chunk=2)
    for c in "abc":
        pos = labels == c
        want = np.mean([wasserstein_distance(feats[pos, i], feats[~pos, i]) for i in range(5)])
        assert r["per_class"][c] == pytest.approx(want, rel=1e-10)
    assert r["mean"] == pytest.approx(np.mean(list(r["per_class"].values())))
    assert r["median"] == pytest.approx(np.median(list(r["per_class"].values())))
    with pytest.raises(ValueError, match="two classes"):
        metrics.class_wasserstein(torch.tensor(feats), ["a"] * 60)


# ----------------------------------------------------------------------------------------
# Interaction vs co-occurrence
# ----------------------------------------------------------------------------------------


def test_offdiag_pearson_identical_is_one_and_matches_numpy():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(9, 9))
    a = a + a.T
    b = a + rng.normal(size=(9, 9))
    assert metrics.offdiag_pearson(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0)
    assert metrics.offdiag_pearson(torch.tensor(a), torch.tensor(-a)) == pytest.approx(-1.0)
    iu = np.triu_indices(9, 1)
    want = np.corrcoef(a[iu], b[iu])[0, 1]
    assert metrics.offdiag_pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(want, rel=1e-10)


def test_interaction_vs_cooccurrence_matches_naive_theta2_and_counts(device):
    torch.manual_seed(8)
    model = PolySAE(PolySAEConfig(d_in=8, n_latents=24, k=4, ranks=(8, 4, 2))).eval().to(device)
    with torch.no_grad():
        batches = [model.encode(torch.randn(n, 8).to(device)) for n in (50, 31)]
    z = torch.cat(batches).cpu()
    counts = (z > 0).sum(0)
    r = metrics.interaction_vs_cooccurrence(model, batches, counts, n=10)
    idx = counts.topk(10).indices
    # independent: Θ2[i,j,:] = Σ_{r≤R2} U_ir U_jr C2[:, r] built explicitly, then a naive count loop
    U, C2 = model.U.detach().cpu()[:, :4], model.C2.detach().cpu()
    theta = torch.einsum("ir,jr,dr->ijd", U[idx], U[idx], C2).norm(dim=-1).numpy()
    zi = z[:, idx].double().numpy()
    cooc = np.zeros((10, 10))
    for t in range(len(zi)):
        for i in range(10):
            for j in range(10):
                cooc[i, j] += (zi[t, i] > 0) and (zi[t, j] > 0)
    cooc /= len(zi)
    cov = np.cov(zi.T, bias=True)
    iu = np.triu_indices(10, 1)
    assert r["n_latents"] == 10
    assert r["r_interaction_cooc"] == pytest.approx(np.corrcoef(theta[iu], cooc[iu])[0, 1], rel=1e-5)
    assert r["r_covariance_cooc"] == pytest.approx(np.corrcoef(cov[iu], cooc[iu])[0, 1], rel=1e-6)


# ----------------------------------------------------------------------------------------
# LM loss with the reconstruction spliced in (tiny random GPT-2)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_windows(gpt2_dir):
    lm, tok = activations.load_lm(gpt2_dir)
    texts = ["The cat sat on the mat. " * 5, "Stocks fell sharply on Monday as investors worried.",
             "A short one."]
    return lm, tok, corpora.tokenize(tok, texts, context=32)


def test_next_token_ce_matches_torch_cross_entropy_on_kept_positions(lm_windows):
    lm, tok, batch = lm_windows
    logits = torch.randn(*batch["input_ids"].shape, 50257)
    s, n = metrics.next_token_ce(logits, batch["input_ids"], batch["keep"])
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if batch["keep"][b, t] and batch["keep"][b, t + 1]:
                total += torch.nn.functional.cross_entropy(logits[b, t], batch["input_ids"][b, t + 1]).item()
                count += 1
    assert n == count > 0
    assert s == pytest.approx(total, rel=1e-5)


def test_ce_recovered_is_one_for_identity_and_zero_for_zero_reconstruction(lm_windows):
    lm, tok, batch = lm_windows
    h = activations.hidden_states(lm, batch["input_ids"], batch["attention_mask"], [1])[:, :, 0]
    mean_D = h[batch["keep"]].mean(0)
    ident = metrics.ce_recovered(lm, [batch], 1, lambda x: x, mean_D)
    assert ident["ce_spliced"] == pytest.approx(ident["ce_clean"], abs=1e-6)
    assert ident["frac_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert ident["frac_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert ident["ce_zero"] != pytest.approx(ident["ce_clean"], abs=1e-3)   # the ablation matters
    zero = metrics.ce_recovered(lm, [batch], 1, torch.zeros_like, mean_D)
    assert zero["frac_recovered_zero"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_increase"] == pytest.approx(zero["ce_zero"] - zero["ce_clean"])
    half = metrics.ce_recovered(lm, [batch], 1, lambda x: 0.5 * x, mean_D)
    assert half["ce_spliced"] != pytest.approx(ident["ce_spliced"], abs=1e-4)


def naive_spliced_logits(lm, batch, layer, replace):
    """The reference: a full forward pass with a hook replacing block `layer`'s output at the kept tokens."""
    keep = batch["keep"]

    def hook(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[keep] = replace(h[keep])
        return (h, *output[1:]) if isinstance(output, tuple) else h

    block = dict(lm.named_modules())[activations.block_paths(lm)[layer]]
    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_replayed_splice_equals_a_full_spliced_forward_pass(lm_windows, layer):
    """logits_from_block skips blocks 0..layer (their outputs come from the clean pass): the logits of the
    spliced, zero- and mean-ablated passes equal those of full forward passes with a hook."""
    lm, tok, batch = lm_windows
    logits, outs = activations.block_outputs(lm, batch, [layer])
    with torch.no_grad():
        plain = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)                    # the clean pass, untouched
    torch.testing.assert_close(activations.logits_from_block(lm, batch, layer, outs[layer]), plain, rtol=0, atol=0)
    g = torch.Generator().manual_seed(layer)
    noise = torch.randn(int(batch["keep"].sum()), 64, generator=g)
    for replace in (lambda h: 0.5 * h + noise, torch.zeros_like):
        got = activations.logits_from_block(lm, batch, layer, activations.spliced(outs[layer], batch["keep"], replace))
        torch.testing.assert_close(got, naive_spliced_logits(lm, batch, layer, replace), rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in lm.modules())                  # the blocks are restored


def test_ce_recovered_all_equals_one_splice_at_a_time(lm_windows):
    lm, tok, batch = lm_windows
    h = activations.hidden_states(lm, batch["input_ids"], batch["attention_mask"], [0, 2])
    splices = [(0, lambda x: 0.9 * x, h[:, :, 0][batch["keep"]].mean(0)),
               (2, lambda x: x + 0.1, h[:, :, 1][batch["keep"]].mean(0))]
    together = metrics.ce_recovered_all(lm, [batch], splices)
    for (layer, fn, mean), got in zip(splices, together):
        alone = metrics.ce_recovered(lm, [batch], layer, fn, mean)
        assert got == pytest.approx(alone, rel=1e-9)
        logits = naive_spliced_logits(lm, batch, layer, fn)
        s, n = metrics.next_token_ce(logits, batch["input_ids"], batch["keep"])
        assert got["ce_spliced"] == pytest.approx(s / n, rel=1e-5)


def test_heldout_windows_continue_the_cache_after_the_training_tokens(gpt2_dir, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"{i}.txt").write_text(f"Document {i}. " + "Some words that follow, and more of them. " * (5 + 3 * i))
    cache = activation_cache.build_cache(tmp_path / "acts", gpt2_dir, layers=[1, 2], dataset=str(texts),
                                    n_tokens=100_000, context=32, dtype="float32")
    lm, tok = activations.load_lm(gpt2_dir)
    # naive: the windows of the whole stream, and the kept tokens each one holds
    windows = corpora.tokenize(tok, list(corpora.load_texts(str(texts))), context=32)
    per_window = windows["keep"].sum(1).tolist()
    for skip in (sum(per_window[:5]), sum(per_window[:5]) + 7):   # at a window boundary, and inside one
        got = list(corpora.heldout_windows(tok, str(texts), "train", 32, skip, batch_size=2))
        assert torch.equal(got[0]["input_ids"], windows["input_ids"][5:7])
        assert sum(int(w["keep"].sum()) for w in got) == cache.n_tokens - skip
        h = torch.cat([activations.hidden_states(lm, w["input_ids"], w["attention_mask"], [1, 2])[w["keep"]]
                       for w in got])
        torch.testing.assert_close(h, cache.read(skip, cache.n_tokens), rtol=1e-4, atol=1e-4)


def test_take_tokens_keeps_exactly_n_tokens(lm_windows):
    lm, tok, batch = lm_windows
    total = int(batch["keep"].sum())
    clone = lambda: {k: v.clone() for k, v in batch.items()}                  # noqa: E731
    got = list(corpora.take_tokens([clone(), clone()], total + 5))
    assert [int(w["keep"].sum()) for w in got] == [total, 5]
    first_five = batch["keep"].flatten().nonzero()[:5, 0]
    assert got[1]["keep"].flatten().nonzero()[:, 0].tolist() == first_five.tolist()
    assert len(list(corpora.take_tokens([clone(), clone()], total))) == 1


# ----------------------------------------------------------------------------------------
# End to end: train.py runs on the tiny GPT-2, then `python metrics.py RUN ...`
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind,extra", [
    ("sae", ["--layers", "1-2"]),
    ("polysae", ["--layers", "1", "--ranks", "32,8,8"]),
    ("crosscoder", ["--layers", "0-3"]),
    ("fmxcoder", ["--layers", "0-3", "--rank", "16"]),
])
def test_every_metric_is_finite_on_a_trained_run(gpt2_dir, tmp_path_factory, tmp_path, kind, extra, capsys, device):
    import train

    cache = tmp_path_factory.getbasetemp() / f"acts-{kind}"
    out = tmp_path / kind
    train.train(train.parse_args([
        "--model", gpt2_dir, "--dict", kind, *extra, "--tokens", "2048", "--eval-tokens", "512",
        "--batch-size", "128", "--n-latents", "64", "--k", "4", "--context", "64", "--cache", str(cache),
        "--out", str(out), "--device", str(device), "--dead-tokens", "1000", "--ckpt-every", "0"]))
    assert evaluate.main([str(out), "--ce-tokens", "300", "--fc-tokens", "512", "--pairs", "16",
                         "--min-fires", "1", "--device", str(device), "--wasserstein-texts", "20"]) == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and out.name in printed
    ev = json.loads((out / "eval.json").read_text())
    assert "cache" in ev["data"]
    multi = kind in ("crosscoder", "fmxcoder")
    keys = ["fvu", "mse_raw", "mse_norm", "l0", "dead_eval", "wasserstein_mean", "wasserstein_median"]
    keys += ["fc_mean", "fc_frac_ge2", "norm_spread_mean"] if multi else ["ce_increase", "frac_recovered_zero",
                                                                         "frac_recovered_mean"]
    keys += ["r_interaction_cooc", "r_covariance_cooc"] if kind == "polysae" else []
    for r in ev["results"]:
        if r["name"].startswith("set of"):
            continue
        for key in keys:
            assert math.isfinite(r[key]), (kind, key, r[key])
        assert 0 < r["l0"] <= 64
        assert len(r["mse_raw_per_layer"]) == (4 if multi else 1)
    # the same held-out tokens as train.py's own summary (its FVU: Σx² − (Σx)²/n in float32)
    for (layers, _, meta), r in zip(saved.load_run(out), ev["results"]):
        assert r["fvu"] == pytest.approx(meta["metrics"]["eval"]["fvu"], rel=1e-3)
        assert r["l0"] == pytest.approx(meta["metrics"]["eval"]["l0"], rel=1e-6)
    if kind == "sae":
        assert [r["name"] for r in ev["results"]] == ["layer 1", "layer 2", "set of 2"]
        # without the cache, the same held-out tokens are harvested again from the text stream
        with_cache = evaluate.evaluate_run(out, "cpu", eval_tokens=256, ce_tokens=0, wasserstein_task=None)
        for layer_dir in out.glob("layer_*"):
            meta = json.loads((layer_dir / "config.json").read_text())
            meta["run"]["cache"] = str(tmp_path / "gone")
            (layer_dir / "config.json").write_text(json.dumps(meta))
        harvested = evaluate.evaluate_run(out, "cpu", eval_tokens=256, ce_tokens=0, wasserstein_task=None)
        assert "harvested 256 tokens" in harvested["data"]
        for a, b in zip(with_cache["results"][:2], harvested["results"][:2]):
            assert b["mse_raw"] == pytest.approx(a["mse_raw"], rel=1e-3)   # the cache is float16
            assert b["fvu_per_layer"] == pytest.approx(a["fvu_per_layer"], rel=1e-3)


@pytest.mark.slow
def test_streamed_run_is_evaluated_on_the_tokens_it_held_out(gpt2_dir, tmp_path):
    import train

    out = tmp_path / "stream"
    train.train(train.parse_args([
        "--model", gpt2_dir, "--dict", "sae", "--layers", "1", "--tokens", "1024", "--eval-tokens", "512",
        "--batch-size", "128", "--n-latents", "64", "--k", "4", "--context", "64", "--cache", "none",
        "--out", str(out), "--device", "cpu", "--dead-tokens", "1000", "--ckpt-every", "0"]))
    ev = evaluate.evaluate_run(out, "cpu", ce_tokens=0, wasserstein_task=None)
    assert "harvested 512 tokens" in ev["data"] and "streamed" in ev["data"]
    (_, _, meta), = saved.load_run(out)
    r = ev["results"][0]
    assert r["fvu"] == pytest.approx(meta["metrics"]["eval"]["fvu"], rel=1e-3)
    assert r["mse_norm"] == pytest.approx(meta["metrics"]["eval"]["mse"], rel=1e-3)


def test_wasserstein_intervals_pair_the_resamples():
    """W1 is scale-equivariant, so features × 2 have exactly twice the W1 on every paired resample
    (the ratio interval is [2, 2]); an independent copy of the same distribution has a ratio interval
    around 1; the intervals narrow with more texts."""
    g = torch.Generator().manual_seed(0)

    def sample(n):
        labels = np.array(["a", "b", "c"] * (n // 3))
        x = torch.rand(len(labels), 16, generator=g, dtype=torch.float64)
        x[labels == "a", :4] += 0.5                       # class a differs on 4 of 16 latents
        return x, labels

    widths = []
    for n in (60, 600):
        x, labels = sample(n)
        y, _ = sample(n)
        out = metrics.wasserstein_intervals({"x": x, "2x": 2 * x, "y": y}, labels, n_boot=100, seed=1, reference="x")
        assert out["2x"]["mean"] == pytest.approx(2 * out["x"]["mean"])
        assert out["ratio_ci"]["2x"] == pytest.approx([2.0, 2.0])
        lo, hi = out["ratio_ci"]["y"]
        assert lo < 1 < hi
        widths.append(out["x"]["mean_ci"][1] - out["x"]["mean_ci"][0])
    assert widths[1] < 0.6 * widths[0]


def naive_fc_readings(cc, x, eps=1e-8):
    """Every reading of FC written out token by token from the weights (metrics.FC_READINGS)."""
    B, L, d = x.shape
    F_ = cc.config.n_latents
    W, b, b_dec = cc.W_enc.detach().double(), cc.b_enc.detach().double(), cc.b_dec.detach().double()
    scale = cc.W_dec.detach().double().norm(dim=-1).sum(-1)                    # Σ_l ‖W_dec[f, l]‖

    def pre_and_z(xt):                                                         # one token (L, d)
        pre = [sum(float((xt[l] - b_dec[l]) @ W[l][:, f]) for l in range(L)) + float(b[f]) for f in range(F_)]
        order = sorted(range(F_), key=lambda f: -pre[f] * float(scale[f]))[:cc.config.k]
        return [max(p, 0.0) for p in pre], [max(pre[f], 0.0) if f in order else 0.0 for f in range(F_)]

    out = {}
    rows = [[pre_and_z(x[t].double())] + [pre_and_z(torch.cat([x[t, :l], 0 * x[t, l:l + 1], x[t, l + 1:]]).double())
                                          for l in range(L)] for t in range(B)]
    for act in ("pre", "post"):
        i = 0 if act == "pre" else 1
        for over in ("fired", "all"):
            for form in ("ratio_mean", "mean_ratio"):
                fc = []
                for f in range(F_):
                    toks = [r for r in rows if over == "all" or r[0][1][f] > 0]
                    if not any(r[0][1][f] > 0 for r in rows):
                        continue                                               # never fires: no FC
                    if form == "ratio_mean":
                        delta = [sum(abs(r[0][i][f] - r[1 + l][i][f]) / (r[0][i][f] + eps) for r in toks) / len(toks)
                                 for l in range(L)]
                    else:
                        delta = [sum(abs(r[0][i][f] - r[1 + l][i][f]) for r in toks) /
                                 (sum(r[0][i][f] for r in toks) + eps * len(toks)) for l in range(L)]
                    if max(delta) > 0:
                        fc.append(sum(delta) / max(delta))
                out[f"{act}/{over}/{form}"] = sum(fc) / len(fc)
    return out


def test_every_reading_of_fc_matches_a_token_by_token_computation():
    """metrics.functional_coherence(variants=True) against naive_fc_readings on a random crosscoder whose
    latents fire on some tokens and not others (so the readings differ)."""
    torch.manual_seed(11)
    cc = CrossCoder(CrossCoderConfig(d_in=4, n_latents=6, k=2, n_layers=3, sparsity="topk")).eval()
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.3)
        cc.b_dec.normal_(0, 0.3)
    x = torch.randn(24, 3, 4)
    fc = metrics.functional_coherence(cc, [x[:10], x[10:]], min_fires=1, variants=True, artefacts=True)
    want = naive_fc_readings(cc, x)
    got = {k: v["mean"] for part in ("fc_readings", "fc_artefacts") for k, v in fc[part].items()}
    assert got.keys() == want.keys() and len(got) == 8
    assert set(fc["fc_artefacts"]) == {"pre/all/ratio_mean", "post/all/ratio_mean"}      # only behind the flag
    assert "fc_artefacts" not in metrics.functional_coherence(cc, [x], min_fires=1, variants=True)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    assert got["pre/fired/ratio_mean"] == pytest.approx(fc["fc_mean"], rel=1e-12)        # the main reading
    assert len({round(v, 3) for v in got.values()}) > 4                                  # the readings differ

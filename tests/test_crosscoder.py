"""crosscoder.py: shapes, sparsity, L=1 equals the SAE, masking, folding, save/load, learning."""
import math

import pytest
import torch

import crosscoder as cc
import sae
from support.synthetic import fit, make_toy_data, recovery
import core
from support import saved


def make(L=3, d=8, n=64, k=4, **kw):
    torch.manual_seed(0)
    model = cc.CrossCoder(cc.CrossCoderConfig(d_in=d, n_latents=n, k=k, n_layers=L, **kw))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
    return model


def test_shapes_dtypes_and_init_norms():
    model = make(L=3, d=8, n=64)
    assert model.W_enc.shape == (3, 8, 64) and model.W_dec.shape == (64, 3, 8)
    assert model.b_enc.shape == (64,) and model.b_dec.shape == (3, 8)
    norms = model.decoder_norms()
    assert norms.shape == (64, 3)
    torch.testing.assert_close(norms, torch.full((64, 3), 1 / math.sqrt(3)))
    torch.testing.assert_close(model.decoder_vectors().flatten(1).norm(dim=-1), torch.ones(64))
    assert torch.equal(model.W_enc, model.W_dec.permute(1, 2, 0))
    x = torch.randn(5, 3, 8)
    out = model(x)
    assert out.recon.shape == (5, 3, 8) and out.latents.shape == (5, 64) and out.pre_acts.shape == (5, 64)
    assert all(t.dtype == torch.float32 for t in out)
    with pytest.raises(ValueError, match=r"\(B, 3, 8\)"):
        model(torch.randn(5, 8))
    with pytest.raises(ValueError, match="input_scale"):
        cc.CrossCoderConfig(d_in=8, n_latents=64, k=4, n_layers=3, input_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="mask_prob"):
        cc.CrossCoderConfig(d_in=8, n_latents=64, k=4, n_layers=3, mask_prob=1.0)


def test_pre_acts_and_decode_match_naive_loops():
    model = make(L=3, d=8, n=64)
    x = torch.randn(6, 3, 8)
    naive_pre = sum((x[:, l] - model.b_dec[l]) @ model.W_enc[l] for l in range(3)) + model.b_enc
    torch.testing.assert_close(model.pre_acts(x), naive_pre)
    z = torch.relu(torch.randn(6, 64))
    naive = torch.stack([z @ model.W_dec[:, l] + model.b_dec[l] for l in range(3)], 1)
    torch.testing.assert_close(model.decode(z), naive)


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu"])
def test_forward_equals_decode_encode_in_eval(sparsity):
    model = make(sparsity=sparsity).eval()
    x = torch.randn(32, 3, 8)
    out = model(x)
    z = model.encode(x)
    torch.testing.assert_close(out.latents, z)
    torch.testing.assert_close(out.recon, model.decode(z))
    naive_mse = ((x - out.recon) ** 2).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(out.mse, naive_mse)


def test_topk_selects_by_activation_times_summed_decoder_norm():
    model = make(k=5)
    with torch.no_grad():
        model.W_dec[:, 1] *= torch.rand(64, 1) * 3   # unequal decoder norms
    x = torch.randn(16, 3, 8)
    z = model.eval().encode(x)
    assert ((z > 0).sum(-1) == 5).all()
    score = torch.relu(model.pre_acts(x)) * model.W_dec.norm(dim=-1).sum(-1)
    for row_z, row_s in zip(z, score):
        assert set(row_z.nonzero().flatten().tolist()) == set(row_s.topk(5).indices.tolist())
    torch.testing.assert_close(z[z > 0], torch.relu(model.pre_acts(x))[z > 0])  # unscaled acts


def test_batchtopk_mean_l0_is_k_in_training():
    model = make(sparsity="batchtopk", k=4).train()
    out = model(torch.randn(128, 3, 8) + 0.5)
    assert (out.latents > 0).sum().item() == 128 * 4
    assert model.threshold.item() > 0


def test_l1_equals_one_layer_sae_with_same_weights():
    torch.manual_seed(3)
    for sparsity in ["topk", "batchtopk", "relu"]:
        s = sae.SAE(sae.SAEConfig(d_in=8, n_latents=64, k=4, sparsity=sparsity, l1_coeff=0.1,
                                  dead_tokens=10, aux_k=6))
        with torch.no_grad():
            s.b_enc.normal_(0, 0.1)
            s.b_dec.normal_(0, 0.1)
        c = cc.CrossCoder(cc.CrossCoderConfig(d_in=8, n_latents=64, k=4, n_layers=1, sparsity=sparsity,
                                              l1_coeff=0.1, dead_tokens=10, aux_k=6))
        with torch.no_grad():
            c.W_enc.copy_(s.W_enc[None])
            c.W_dec.copy_(s.W_dec[:, None])
            c.b_enc.copy_(s.b_enc)
            c.b_dec.copy_(s.b_dec[None])
        x = torch.randn(8, 8)   # 8 tokens · k=4 < 64 latents: after step 1 some are dead
        for step in range(3):
            o_s, o_c = s.train()(x), c.train()(x[:, None])
            for a, b in [(o_s.latents, o_c.latents), (o_s.pre_acts, o_c.pre_acts),
                         (o_s.recon, o_c.recon[:, 0])] + [(o_s[i], o_c[i]) for i in range(3, 7)]:
                torch.testing.assert_close(a, b)
        if sparsity != "relu":
            assert o_c.auxk > 0
        assert torch.equal(s.tokens_since_fired, c.tokens_since_fired)
        torch.testing.assert_close(s.threshold, c.threshold)
        o_s, o_c = s.eval()(x), c.eval()(x[:, None])
        torch.testing.assert_close(o_s.recon, o_c.recon[:, 0])
        torch.testing.assert_close(o_s.loss, o_c.loss)


def test_mask_layers_fraction_and_no_rescaling():
    x = torch.randn(20_000, 4, 3) + 5.0
    torch.manual_seed(0)
    m = cc.mask_layers(x, 0.05)
    zeroed = (m == 0).all(-1)                                     # (B, L)
    kept = (m == x).all(-1)
    assert (zeroed | kept).all()                                  # whole (token, layer) rows, unscaled
    n = zeroed.numel()
    assert abs(zeroed.float().mean().item() - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    # independent across layers: P(both of two layers masked) = p²
    both = (zeroed[:, 0] & zeroed[:, 1]).float().mean().item()
    assert abs(both - 0.0025) < 4 * math.sqrt(0.0025 / 20_000)
    assert torch.equal(cc.mask_layers(x, 0.0), x)


def test_masking_in_training_only_and_targets_clean():
    model = make(L=3, d=8, mask_prob=0.3)
    x = torch.randn(256, 3, 8) + 1.0
    model.eval()
    out = model(x)
    torch.testing.assert_close(out.pre_acts, model.pre_acts(x))   # eval: no masking
    model.train()
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    x_masked = cc.mask_layers(x, 0.3)
    assert not torch.equal(x_masked, x)
    torch.testing.assert_close(out.pre_acts, model.pre_acts(x_masked))   # encoder saw the masked x
    naive_mse = ((x - out.recon) ** 2).sum(dim=(1, 2)).mean()             # ... scored against clean x
    torch.testing.assert_close(out.mse, naive_mse)


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu"])
def test_fold_input_scale_leaves_outputs_unchanged(sparsity):
    model = make(sparsity=sparsity, input_scale=[0.5, 2.0, 3.0])
    with torch.no_grad():
        model.W_dec[:, 0] *= 2.5                      # unequal norms so the score matters
    x_raw = torch.randn(64, 3, 8) * torch.tensor([2.0, 0.5, 0.3])[:, None]
    s = torch.tensor([0.5, 2.0, 3.0])[:, None]
    if sparsity == "batchtopk":   # calibrate θ first, on other tokens (one of these would score exactly θ)
        model.train()(torch.randn(64, 3, 8) * torch.tensor([2.0, 0.5, 0.3])[:, None] * s)
    model.eval()
    before = model(x_raw * s)
    model.fold_input_scale()
    assert model.config.input_scale == [1.0, 1.0, 1.0]
    after = model(x_raw)
    torch.testing.assert_close(after.latents, before.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.recon, before.recon / s, rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_exact(tmp_path):
    model = make(sparsity="batchtopk", mask_prob=0.05, input_scale=[1.0, 2.0, 0.5])
    model.train()(torch.randn(64, 3, 8))
    saved.save(model, tmp_path / "m")
    loaded = saved.load(tmp_path / "m")
    assert type(loaded) is cc.CrossCoder and loaded.config == model.config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(16, 3, 8)
    assert torch.equal(model.eval()(x).recon, loaded.eval()(x).recon)


def test_init_b_dec_per_layer_median_and_mean():
    model = make(L=2, d=3)
    x = torch.randn(400, 2, 3) + torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 5.0]])
    model.init_b_dec(x, "mean")
    torch.testing.assert_close(model.b_dec, x.mean(0))
    model.init_b_dec(x, "median")
    for l in range(2):   # the geometric median minimises the sum of distances: check against scipy
        from scipy.optimize import minimize
        ref = minimize(lambda m: ((x[:, l].double().numpy() - m) ** 2).sum(-1).__pow__(0.5).sum(),
                       x[:, l].mean(0).double().numpy(), method="Nelder-Mead",
                       options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 4000}).x
        torch.testing.assert_close(model.b_dec[l].double(), torch.tensor(ref), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="median"):
        model.init_b_dec(x, "bogus")


def test_learns_toy_atoms():
    torch.manual_seed(0)
    data = make_toy_data()
    model = cc.CrossCoder(cc.CrossCoderConfig(d_in=32, n_latents=512, k=8, n_layers=4, sparsity="topk",
                                              dead_tokens=50_000))
    res = fit(model, data, steps=400)
    best, frac = recovery(model.decoder_vectors(), data)
    shared = data.profile_NL.sum(-1) == 4
    assert res["fvu"] < 0.15
    assert frac > 0.9
    assert best[shared].gt(0.9).float().mean() > 0.9   # (1.0 at this seed; fmxcoder TR reaches 1.0 too)
    assert core.dead_fraction(model) < 0.5


def test_batchtopk_threshold_under_masking_is_measured_on_the_clean_rows():
    """Layer masking zeroes inputs in training, but θ serves clean inputs at inference: a masked step sets θ
    (uncalibrated: the first batch sets it) to the smallest score BatchTopK would keep on the batch's clean
    rows alone, the (n_clean·k)-th largest, computed here from the clean rows' own pre-activations. Before,
    θ was the B·k-th largest score of the masked batch, which the masked rows push up or down."""
    torch.manual_seed(0)
    model = cc.CrossCoder(cc.CrossCoderConfig(d_in=4, n_latents=16, k=2, n_layers=2, sparsity="batchtopk",
                                              mask_prob=0.5)).train()
    with torch.no_grad():
        model.W_enc[1] = -model.W_enc[1]                  # zeroing layer 1 moves the scores a lot
    x = torch.randn(32, 2, 4)
    x_in = x.clone()
    x_in[:12, 1] = 0                                      # 12 masked rows, 20 clean
    with torch.no_grad():
        core.forward_with_losses(model, x_in, x)
        score = model.pre_acts(x[12:]).relu() * model.decoder_scale()
        want = score.flatten().topk(20 * 2).values.min()
        masked_batch = (model.pre_acts(x_in).relu() * model.decoder_scale()).flatten().topk(32 * 2).values.min()
    assert not torch.isclose(want, masked_batch)         # the old rule gives another θ here
    torch.testing.assert_close(model.threshold, want)
    model.threshold.fill_(-1.0)
    with torch.no_grad():                                 # every row masked: nothing to measure, θ stays
        core.forward_with_losses(model, torch.zeros_like(x), x)
    assert model.threshold.item() == -1.0
    with torch.no_grad():                                 # unmasked input (x_in is target): the batch's B·k-th
        core.forward_with_losses(model, x, x)
        full = (model.pre_acts(x).relu() * model.decoder_scale()).flatten().topk(32 * 2).values.min()
    torch.testing.assert_close(model.threshold, full)

"""fmxcoder.py: factorised == materialised, rank checks, init, costs, masking, save/load, learning."""
import math

import pytest
import torch

import crosscoder as cc
import fmxcoder as fx
from support.synthetic import fit, make_toy_data, recovery
from support import saved

SMALL = dict(d_in=8, n_latents=48, k=4, n_layers=3)
FACTS = [("cp", 12), ("tr", [2, 4, 3]), ("tr", 3)]


def make(factorization="tr", rank=3, **kw):
    torch.manual_seed(0)
    model = fx.FMXCoder(fx.FMXCoderConfig(**{**SMALL, **kw}, factorization=factorization, rank=rank))
    with torch.no_grad():   # make encoder and decoder factors differ, biases non-zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def naive_tensor(factorization, fs):
    """W[d, f, l] from the factors by the defining formula, as an explicit loop over l."""
    if factorization == "cp":
        A, B, C = fs
        return torch.stack([torch.einsum("dr,fr,r->df", A, B, C[l]) for l in range(C.shape[0])], -1)
    G1, G2, G3 = fs
    d, F, L = G1.shape[1], G2.shape[1], G3.shape[1]
    W = torch.empty(d, F, L)
    for l in range(L):
        for i in range(d):
            W[i, :, l] = torch.stack([torch.trace(G1[:, i, :] @ G2[:, f, :] @ G3[:, l, :]) for f in range(F)])
    return W


@pytest.mark.parametrize("factorization,rank", FACTS)
def test_full_weights_match_the_defining_formula(factorization, rank):
    model = make(factorization, rank)
    W_enc, W_dec = model.full_weights()
    torch.testing.assert_close(W_enc, naive_tensor(factorization, model.factors("enc")).permute(2, 0, 1))
    torch.testing.assert_close(W_dec, naive_tensor(factorization, model.factors("dec")).permute(1, 2, 0))
    assert W_enc.shape == (3, 8, 48) and W_dec.shape == (48, 3, 8)
    torch.testing.assert_close(model.decoder_vectors(), W_dec)
    torch.testing.assert_close(model.decoder_norms(), W_dec.norm(dim=-1))


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu"])
@pytest.mark.parametrize("factorization,rank", FACTS)
def test_factorised_forward_equals_dense_crosscoder_with_materialised_weights(factorization, rank, sparsity):
    model = make(factorization, rank, sparsity=sparsity, mask_prob=0.0, l1_coeff=0.1, dead_tokens=4)
    dense = cc.CrossCoder(cc.CrossCoderConfig(**SMALL, sparsity=sparsity, l1_coeff=0.1, dead_tokens=4))
    W_enc, W_dec = model.full_weights()
    with torch.no_grad():
        dense.W_enc.copy_(W_enc)
        dense.W_dec.copy_(W_dec)
        dense.b_enc.copy_(model.b_enc)
        dense.b_dec.copy_(model.b_dec)
    x = torch.randn(6, 3, 8)
    for mode in ["train", "train", "eval"]:   # second train step has dead latents (AuxK on)
        getattr(model, mode)(), getattr(dense, mode)()
        a, b = model(x), dense(x)
        for name in a._fields:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("factorization,rank", FACTS)
def test_gradients_reach_every_factor(factorization, rank):
    model = make(factorization, rank, mask_prob=0.0)
    model.train()(torch.randn(16, 3, 8)).loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 8   # 3 encoder factors, 3 decoder factors, 2 biases
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("factorization,rank", FACTS)
def test_forward_equals_decode_encode_topk_and_batchtopk_l0(factorization, rank):
    model = make(factorization, rank).eval()
    x = torch.randn(32, 3, 8)
    out = model(x)
    torch.testing.assert_close(out.recon, model.decode(model.encode(x)))
    assert ((out.latents > 0).sum(-1) == 4).all()
    assert all(t.dtype == torch.float32 for t in out)
    btk = make(factorization, rank, sparsity="batchtopk").train()
    assert (btk(x + 1.0).latents > 0).sum().item() == 32 * 4


def test_rank_validation():
    ok = dict(d_in=32, n_latents=64, k=4, n_layers=4)
    with pytest.raises(ValueError, match="CP rank R=16 < d_in=32"):
        fx.FMXCoderConfig(**ok, factorization="cp", rank=16)
    with pytest.raises(ValueError, match="largest CP rank"):
        fx.FMXCoderConfig(**ok, factorization="cp", rank=129)        # min(dF, dL, FL) = 128
    fx.FMXCoderConfig(**ok, factorization="cp", rank=128)
    with pytest.raises(ValueError, match="R1\\*R2=24 < d_in=32"):
        fx.FMXCoderConfig(**ok, factorization="tr", rank=[4, 6, 8])
    with pytest.raises(ValueError, match="exceed 32"):
        fx.FMXCoderConfig(**ok, factorization="tr", rank=[4, 33, 8])
    with pytest.raises(ValueError, match="three"):
        fx.FMXCoderConfig(**ok, factorization="tr", rank=[8, 8])
    with pytest.raises(ValueError, match="one rank"):
        fx.FMXCoderConfig(**ok, factorization="cp", rank=[32, 32, 32])
    with pytest.raises(ValueError, match="factorization"):
        fx.FMXCoderConfig(**ok, factorization="tucker", rank=32)
    assert fx.FMXCoderConfig(**ok, factorization="tr", rank=(4, 8, 2)).rank == [4, 8, 2]
    assert fx.FMXCoderConfig(**ok, factorization="cp", rank=[40]).rank == 40
    assert fx.FMXCoderConfig(**ok).mask_prob == 0.05


@pytest.mark.parametrize("factorization,rank", [("cp", 64), ("tr", [4, 8, 8])])
def test_init_matches_dense_crosscoder_statistics(factorization, rank):
    torch.manual_seed(0)
    d, F, L = 16, 2048, 4
    model = fx.FMXCoder(fx.FMXCoderConfig(d_in=d, n_latents=F, k=4, n_layers=L,
                                          factorization=factorization, rank=rank))
    W_enc, W_dec = model.full_weights()
    torch.testing.assert_close(W_enc, W_dec.permute(1, 2, 0))               # W_enc = W_dec^T
    torch.testing.assert_close(W_dec.flatten(1).norm(dim=-1), torch.ones(F))  # concatenated norm 1
    assert abs(W_dec.var().item() * L * d - 1) < 0.05                        # dense per-entry variance
    per_layer = model.decoder_norms()                                         # dense: 1/√L each
    assert abs(per_layer.mean().item() * math.sqrt(L) - 1) < 0.1


def test_costs_match_hand_counts_and_real_parameters():
    cfg = fx.FMXCoderConfig(d_in=768, n_latents=16384, k=64, n_layers=8, factorization="tr", rank=32)
    c = fx.costs(cfg)
    assert c["params"] == 2 * (32 * 32 * 768 + 32 * 32 * 16384 + 32 * 32 * 8)   # docs/fmxcoder-ranks.md
    assert c["dense_params"] == 2 * 768 * 16384 * 8
    assert c["enc_macs"] == 8 * 768 * 1024 + 8 * 32 ** 3 + 16384 * 1024
    cp = fx.costs(fx.FMXCoderConfig(d_in=768, n_latents=16384, k=64, n_layers=8, factorization="cp",
                                    rank=1024))
    assert cp["params"] == 2 * 1024 * (768 + 16384 + 8)
    for factorization, rank in FACTS:
        model = make(factorization, rank)
        n_weights = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("b_"))
        assert fx.costs(model.config)["params"] == n_weights
        assert fx.param_count(model.config) == sum(p.numel() for p in model.parameters())
        assert "dense" in model.cost_report()


@pytest.mark.parametrize("factorization,rank", FACTS)
def test_fold_input_scale_leaves_outputs_unchanged(factorization, rank):
    model = make(factorization, rank, input_scale=[0.5, 2.0, 3.0])
    s = torch.tensor([0.5, 2.0, 3.0])[:, None]
    x_raw = torch.randn(64, 3, 8) / s
    model.eval()
    before = model(x_raw * s)
    model.fold_input_scale()
    after = model(x_raw)
    torch.testing.assert_close(after.latents, before.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.recon, before.recon / s, rtol=1e-4, atol=1e-5)


def test_masking_default_on_in_training_only():
    model = make("tr", 3)
    assert model.config.mask_prob == 0.05
    x = torch.randn(4096, 3, 8) + 1.0
    torch.manual_seed(1)
    out = model.train()(x)
    torch.manual_seed(1)
    x_masked = cc.mask_layers(x, 0.05)
    frac = (x_masked == 0).all(-1).float().mean().item()
    assert abs(frac - 0.05) < 4 * math.sqrt(0.05 * 0.95 / x_masked[..., 0].numel())
    torch.testing.assert_close(out.pre_acts, model.pre_acts(x_masked))
    torch.testing.assert_close(out.mse, ((x - out.recon) ** 2).sum(dim=(1, 2)).mean())
    out = model.eval()(x)
    torch.testing.assert_close(out.pre_acts, model.pre_acts(x))


@pytest.mark.parametrize("factorization,rank", FACTS)
def test_save_load_roundtrip_exact(tmp_path, factorization, rank):
    model = make(factorization, rank, sparsity="batchtopk")
    model.train()(torch.randn(32, 3, 8))
    saved.save(model, tmp_path / "m")
    loaded = saved.load(tmp_path / "m")
    assert type(loaded) is fx.FMXCoder and loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randn(16, 3, 8)
    assert torch.equal(model.eval()(x).recon, loaded.eval()(x).recon)


@pytest.mark.slow
def test_tr_learns_toy_atoms_and_every_shared_atom():
    """All cross-layer atoms recovered (fraction 1.0), so at least as well as any crosscoder
    (tests/test_crosscoder.py trains the dense one on the same data: it also reaches 1.0)."""
    data = make_toy_data()
    shared = data.profile_NL.sum(-1) == 4
    torch.manual_seed(0)
    model = fx.FMXCoder(fx.FMXCoderConfig(d_in=32, n_latents=512, k=8, n_layers=4, sparsity="topk", dead_tokens=50_000,
                                          rank=[8, 16, 16], norm_every=1))
    assert model.config.factorization == "tr" and model.config.mask_prob == 0.05
    res = fit(model, data, steps=400)
    best, frac = recovery(model.decoder_vectors(), data)
    assert res["fvu"] < 0.15
    assert frac > 0.8
    assert best[shared].gt(0.9).float().mean() == 1.0


@pytest.mark.parametrize("factorization,rank", [("cp", 128)])
def test_cp_learns_toy_atoms(factorization, rank):
    data = make_toy_data()
    torch.manual_seed(0)
    model = fx.FMXCoder(fx.FMXCoderConfig(d_in=32, n_latents=512, k=8, n_layers=4, sparsity="topk",
                                          dead_tokens=50_000, factorization=factorization, rank=rank))
    res = fit(model, data, steps=400)
    best, frac = recovery(model.decoder_vectors(), data)
    shared = data.profile_NL.sum(-1) == 4
    assert res["fvu"] < 0.15
    assert frac > 0.8
    assert best[shared].gt(0.9).float().mean() > 0.95


def test_selection_norms_refresh_every_norm_every_steps_and_are_exact_in_eval():
    model = make("tr", 3, norm_every=3, mask_prob=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 3, 8)
    model.train()
    assert torch.equal(model.decoder_scale(), model.exact_decoder_scale())   # exact before step 1
    refreshed_at = []
    for step in range(1, 8):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
        model.after_step()
        if torch.equal(model.decoder_scale(), model.exact_decoder_scale()):
            refreshed_at.append(step)
        else:   # stale: the value of the last refresh, which no longer matches the weights
            assert not torch.allclose(model.decoder_scale(), model.exact_decoder_scale(), atol=1e-7)
    assert refreshed_at == [1, 4, 7]
    model.eval()
    assert torch.equal(model.decoder_scale(), model.exact_decoder_scale())
    assert "score_scale" in model.state_dict() and int(model.steps_done) == 7   # resumes exactly
    with pytest.raises(ValueError, match="norm_every must be a positive integer"):
        make("tr", 3, norm_every=0)

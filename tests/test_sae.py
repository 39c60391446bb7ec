"""sae.py: sparsifiers, AuxK, geometric median, the TopK SAE and save/load."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import sae
from support.synthetic import fit, make_toy_data, recovery, ToyData
import core
from support import saved


def topk(pre, k, scale=None):
    """The training-time selection of core.sparsify, as a dense (B, F) tensor."""
    return core.dense(core.sparsify(pre, "topk", k, True, torch.tensor(-1.0), scale))


def batch_topk(pre, k, scale=None):
    return core.dense(core.sparsify(pre, "batchtopk", k, True, torch.tensor(-1.0), scale))


def test_topk_keeps_exactly_the_k_largest_relu_values():
    torch.manual_seed(0)
    pre = torch.randn(64, 100) + 1.0
    z = topk(pre, 7)
    assert ((z > 0).sum(-1) == 7).all()
    for row_pre, row_z in zip(pre, z):
        top = set(row_pre.topk(7).indices.tolist())
        assert set(row_z.nonzero().flatten().tolist()) == top
        assert torch.equal(row_z[list(top)], row_pre[list(top)].relu())


def test_topk_with_scale_selects_by_score_but_returns_unscaled_acts():
    pre = torch.tensor([[1.0, 2.0, 3.0]])
    scale = torch.tensor([10.0, 1.0, 1.0])
    z = topk(pre, 1, scale)
    assert torch.equal(z, torch.tensor([[1.0, 0.0, 0.0]]))


def test_batch_topk_mean_l0_is_k_and_selects_global_top():
    torch.manual_seed(1)
    pre = torch.randn(32, 200) + 2.0  # all positive enough that B·k entries exist
    z = batch_topk(pre, 5)
    assert (z > 0).sum().item() == 32 * 5
    kth = pre.flatten().topk(32 * 5).values.min()
    assert torch.equal(z > 0, pre >= kth)
    # rows may differ in L0: that is the point of BatchTopK
    assert (z > 0).sum(-1).float().std() > 0


def test_batchtopk_threshold_calibrates_and_is_used_in_eval():
    torch.manual_seed(2)
    model = sae.SAE(sae.SAEConfig(d_in=16, n_latents=64, k=4, sparsity="batchtopk"))
    x = torch.randn(256, 16)
    model.eval()
    assert ((model.encode(x) > 0).sum(-1) == 4).all()  # uncalibrated: per-row TopK
    model.train()
    for _ in range(5):
        model(x)
    theta = model.threshold.item()
    assert theta > 0
    model.eval()
    pre = model.pre_acts(x)
    assert torch.equal(model.encode(x), pre.relu() * (pre > theta))
    # single tokens are encoded without a batch
    assert torch.allclose(model.encode(x[:1]), model.encode(x)[:1], atol=1e-5)


def test_update_threshold_is_an_ema_of_the_smallest_kept_value():
    th = torch.tensor(-1.0)
    core.update_threshold(th, torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
    assert th.item() == 2.0
    core.update_threshold(th, torch.tensor([[1.0, 0.0]]), momentum=0.5)
    assert th.item() == pytest.approx(1.5)


def _auxk(pre, dead, resid, W, aux_k):
    idx, keep = core.auxk_indices(pre, dead, aux_k)
    z_aux = core.Selection(idx, pre.reshape(-1)[idx].relu() * keep, tuple(pre.shape))
    return core.auxk_loss(z_aux, dead, resid, lambda z: z.dense() @ W, aux_k)


def test_auxk_matches_naive_formula():
    torch.manual_seed(3)
    B, Fn, d, k_aux = 8, 20, 6, 3
    pre = torch.randn(B, Fn)
    dead = torch.zeros(Fn, dtype=torch.bool)
    dead[[1, 4, 5, 9, 13]] = True
    W = torch.randn(Fn, d)
    resid = torch.randn(B, d)
    got = _auxk(pre, dead, resid, W, k_aux)
    total = 0.0
    for b in range(B):
        cand = [(pre[b, i].item(), i) for i in range(Fn) if dead[i]]
        chosen = sorted(cand, reverse=True)[:k_aux]
        recon = sum(max(v, 0.0) * W[i] for v, i in chosen)
        total += ((resid[b] - recon) ** 2).sum().item()
    expected = min(5 / k_aux, 1.0) * total / B
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # fewer dead latents than k_aux scales the loss down (and the selection holds only the dead one)
    dead2 = torch.zeros(Fn, dtype=torch.bool)
    dead2[2] = True
    got2 = _auxk(pre, dead2, resid, W, 4)
    naive2 = ((resid - pre[:, 2:3].relu() * W[2]) ** 2).sum(-1).mean() * 0.25
    assert got2.item() == pytest.approx(naive2.item(), rel=1e-5)
    assert _auxk(pre, torch.zeros(Fn, dtype=torch.bool), resid, W, 3).item() == 0.0
    # k_aux larger than F: all 5 dead latents, scaled by 5/50
    naive50 = 0.1 * ((resid - pre[:, dead].relu() @ W[dead]) ** 2).sum(-1).mean()
    assert _auxk(pre, dead, resid, W, 50).item() == pytest.approx(naive50.item(), rel=1e-5)


def test_geometric_median_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)) + rng.standard_exponential((200, 1)) * 3
    res = minimize(lambda m: np.linalg.norm(x - m, axis=1).sum(), x.mean(0), method="Nelder-Mead",
                   options={"xatol": 1e-9, "fatol": 1e-9, "maxiter": 20000, "maxfev": 40000})
    got = core.geometric_median(torch.tensor(x, dtype=torch.float64), iters=1000).numpy()
    obj = lambda m: np.linalg.norm(x - m, axis=1).sum()
    assert obj(got) <= obj(res.x) + 1e-6
    assert np.allclose(got, res.x, atol=1e-3)


def test_fvu_known_answers():
    x = torch.randn(100, 8)
    assert core.fvu(x, x).item() == 0.0
    assert core.fvu(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)


def _model(sparsity="topk", seed=0):
    torch.manual_seed(seed)
    return sae.SAE(sae.SAEConfig(d_in=12, n_latents=48, k=3, sparsity=sparsity))


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu"])
def test_forward_equals_decode_encode_and_shapes(sparsity):
    model = _model(sparsity).eval()
    x = torch.randn(10, 12)
    out = model(x)
    assert out.recon.shape == x.shape and out.latents.shape == (10, 48) and out.pre_acts.shape == (10, 48)
    assert out.recon.dtype == torch.float32
    # forward decodes a Selection, decode(encode(x)) a dense z: the same sums, maybe in another order
    torch.testing.assert_close(out.recon, model.decode(model.encode(x)), rtol=1e-5, atol=1e-6)
    assert out.mse.item() == pytest.approx(((x - out.recon) ** 2).sum(-1).mean().item())


def test_init_ties_encoder_to_decoder_and_unit_norm():
    model = _model()
    assert torch.equal(model.W_enc, model.W_dec.T)
    assert torch.allclose(model.W_dec.norm(dim=-1), torch.ones(48))


def test_decoder_gradient_projection_and_renormalisation():
    model = _model()
    model.W_dec.grad = torch.randn_like(model.W_dec)
    model.before_step()
    assert (model.W_dec.grad * model.W_dec).sum(-1).abs().max() < 1e-5
    with torch.no_grad():
        model.W_dec.mul_(3.0)
    model.after_step()
    assert torch.allclose(model.W_dec.norm(dim=-1), torch.ones(48), atol=1e-6)


def test_free_decoder_norms_start_at_the_init_norm_and_are_not_renormalised():
    """decoder_norm="free" (SAELens's convention): rows start at decoder_init_norm, tied W_enc,
    and neither the gradient projection nor the renormalisation touches them."""
    torch.manual_seed(0)
    model = sae.SAE(sae.SAEConfig(d_in=16, n_latents=48, k=4, decoder_norm="free", decoder_init_norm=0.1))
    assert torch.allclose(model.W_dec.norm(dim=-1), torch.full((48,), 0.1))
    assert torch.equal(model.W_enc, model.W_dec.T)
    g = torch.randn_like(model.W_dec)
    model.W_dec.grad = g.clone()
    model.before_step()
    assert torch.equal(model.W_dec.grad, g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        core.train_step(model, opt, torch.randn(64, 16))
    norms = model.W_dec.norm(dim=-1)
    assert (norms - 0.1).abs().max() > 1e-3      # trained away from the init norm, not pulled back
    with pytest.raises(ValueError, match="decoder_norm must be one of unit, free, got 'fixed'"):
        sae.SAEConfig(d_in=4, n_latents=8, k=2, decoder_norm="fixed")
    with pytest.raises(ValueError, match="needs decoder_norm free"):
        sae.SAEConfig(d_in=4, n_latents=8, k=2, decoder_init_norm=0.1)


def test_dead_counter_counts_tokens_since_fired():
    model = _model()
    model.config.dead_tokens = 20
    x = torch.randn(8, 12)
    out = model(x)
    fired = (out.latents > 0).any(0)
    assert (model.tokens_since_fired[fired] == 0).all()
    assert (model.tokens_since_fired[~fired] == 8).all()
    model.eval()
    model(x)  # eval does not touch the counters
    assert (model.tokens_since_fired[~fired] == 8).all()


def test_auxk_is_used_when_latents_are_dead():
    model = _model()
    model.config.dead_tokens = 0  # everything counts as dead
    out = model(torch.randn(16, 12))
    assert out.auxk.item() > 0
    assert out.loss.item() == pytest.approx(out.mse.item() + model.config.aux_coeff * out.auxk.item(), rel=1e-6)


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model("batchtopk")
    model(torch.randn(32, 12))  # move the buffers away from their init
    saved.save(model, tmp_path / "m", extra={"run": {"layers": [3]}})
    loaded = saved.load(tmp_path / "m")
    assert type(loaded) is sae.SAE and loaded.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    [(layers, m2, meta)] = saved.load_run(tmp_path / "m")
    assert layers == [3] and meta["kind"] == "sae"


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        saved.load(tmp_path)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="k must be smaller than n_latents"):
        sae.SAEConfig(d_in=4, n_latents=8, k=8)
    with pytest.raises(ValueError, match="sparsity must be one of"):
        sae.SAEConfig(d_in=4, n_latents=8, k=2, sparsity="gated")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 12\)"):
        _model()(torch.randn(3, 5))


def test_fold_input_scale_keeps_outputs_in_raw_units():
    model = _model()
    model.config.input_scale = [2.5]
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_()
    model.eval()
    x_raw = torch.randn(20, 12) * 4
    expected = model(x_raw * 2.5).recon / 2.5
    model.fold_input_scale()
    assert model.config.input_scale == [1.0]
    assert torch.allclose(model(x_raw).recon, expected, atol=1e-5)


def test_sae_learns_ground_truth_atoms():
    data = make_toy_data(d=32, n_layers=4, n_atoms=256, seed=0)
    torch.manual_seed(0)
    model = sae.SAE(sae.SAEConfig(d_in=32, n_latents=512, k=8, sparsity="topk", dead_tokens=50_000))
    res = fit(model, data, steps=300, single_layer=0)
    layer0 = ToyData(data.atoms_NLD[:, :1], data.profile_NL[:, :1], data.density, data.noise, 0)
    present = layer0.profile_NL[:, 0] > 0
    best, _ = recovery(model.W_dec[:, None], layer0)
    assert best[present].gt(0.9).float().mean() > 0.8
    assert res["fvu"] < 0.3


@pytest.mark.parametrize("density", [0.01, 0.5])
def test_sparse_decode_equals_dense_product_and_gradients(density):
    torch.manual_seed(5)
    z = torch.randn(40, 64).relu() * (torch.rand(40, 64) < density)
    z[3] = 0.0  # a token with no active latent
    W = torch.randn(64, 24, requires_grad=True)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    y_sparse, y_dense = core.sparse_decode(z1, W), z2 @ W.detach().clone().requires_grad_()
    assert torch.allclose(y_sparse, y_dense, atol=1e-5)
    g = torch.randn_like(y_dense)
    (y_sparse * g).sum().backward()
    W_grad = W.grad.clone()
    W.grad = None
    (z2 @ W * g).sum().backward()
    assert torch.allclose(W_grad, W.grad, atol=1e-5)
    nz = z != 0
    assert torch.allclose(z1.grad[nz], z2.grad[nz], atol=1e-5)


def test_the_four_dictionaries_provide_the_dictionary_protocol():
    import crosscoder
    import fmxcoder
    import polysae
    models = [sae.SAE(sae.SAEConfig(d_in=8, n_latents=32, k=4)),
              polysae.PolySAE(polysae.PolySAEConfig(d_in=8, n_latents=32, k=4)),
              crosscoder.CrossCoder(crosscoder.CrossCoderConfig(d_in=8, n_latents=32, k=4, n_layers=3)),
              fmxcoder.FMXCoder(fmxcoder.FMXCoderConfig(d_in=8, n_latents=32, k=4, n_layers=3, rank=8))]
    members = [m for m in core.Dictionary.__dict__ if not m.startswith("_")] + list(core.Dictionary.__annotations__)
    assert {"encoder_linear", "decode_nobias", "dead", "tokens_since_fired", "config"} <= set(members)
    for model in models:
        assert isinstance(model, core.Dictionary), type(model).__name__
        assert all(hasattr(model, m) for m in members)
    assert not isinstance(torch.nn.Linear(2, 2), core.Dictionary)

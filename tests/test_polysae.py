"""polysae.py: polynomial decoder vs explicit Θ tensors, QR retraction, interaction weights,
parameter counts, save/load, input-scale folding and learning on toy data."""
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

import polysae
import sae
from polysae import PolySAE, PolySAEConfig
from support.synthetic import ToyData, fit, make_toy_data, recovery
import core
from support import saved


def _model(sparsity="topk", order=3, ranks=(6, 4, 3), seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = PolySAEConfig(d_in=6, n_latents=20, k=3, sparsity=sparsity, order=order, ranks=ranks, **kw)
    return PolySAE(cfg).to(dtype)


def _randomise(model):
    """Move biases and λ's away from their init so the checks see every term."""
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(0.5, 0.1)
        if model.config.order >= 2:
            model.lambda2.fill_(-0.7)
        if model.config.order >= 3:
            model.lambda3.fill_(1.3)
    return model


# -- config ------------------------------------------------------------------------------


def test_parameters_are_exactly_the_encoder_and_the_polynomial():
    """PolySAE's __init__ lists what it learns: no W_dec, no SAE underneath."""
    model = _model()
    assert not isinstance(model, sae.SAE)
    assert [n for n, _ in model.named_parameters()] == ["W_enc", "b_enc", "b_dec", "U", "C1", "C2", "lambda2",
                                                        "C3", "lambda3"]
    assert sorted(n for n, _ in model.named_buffers()) == ["threshold", "tokens_since_fired"]
    assert [n for n, _ in _model(order=1).named_parameters()] == ["W_enc", "b_enc", "b_dec", "U", "C1"]


def test_untied_init_is_the_official_encoder_init():
    """untied_init: W_enc = W_decᵀ of a Kaiming-uniform placeholder with rows at norm 0.1 (the
    official code), not the tied D1ᵀ with unit-norm columns."""
    tied, untied = _model(), _model(untied_init=True)
    D1 = tied.U @ tied.C1.T
    assert torch.allclose(tied.W_enc, (D1 / D1.norm(dim=-1, keepdim=True)).T, atol=1e-6)
    assert torch.allclose(untied.W_enc.norm(dim=0), torch.full((20,), 0.1), atol=1e-6)
    D1u = untied.U @ untied.C1.T
    cos = torch.nn.functional.cosine_similarity(untied.W_enc.T, D1u, dim=-1)
    assert cos.abs().max() < 0.99                 # not aligned with the decoder's directions


def test_config_defaults_and_validation():
    c = PolySAEConfig(d_in=768, n_latents=1024)
    assert c.ranks == (768, 64, 64) and c.order == 3
    assert c.lambda2_init == -0.5 and c.lambda3_init == 0.5
    assert PolySAEConfig(d_in=32, n_latents=64).ranks == (32, 32, 32)  # 64 clipped to R1
    assert PolySAEConfig(d_in=8, n_latents=64, ranks=[8, 4, 2]).ranks == (8, 4, 2)  # JSON list
    with pytest.raises(ValueError, match="R1 >= R2 >= R3"):
        PolySAEConfig(d_in=8, n_latents=64, ranks=(4, 8, 2))
    with pytest.raises(ValueError, match="three integers"):
        PolySAEConfig(d_in=8, n_latents=64, ranks=(8, 4))
    with pytest.raises(ValueError, match=r"R1 >= R2 >= R3 >= 1, got \(8, 0, 0\)"):
        PolySAEConfig(d_in=8, n_latents=64, ranks=(8, 0, 0))
    with pytest.raises(ValueError, match="R1 must be <= n_latents"):
        PolySAEConfig(d_in=8, n_latents=16, k=2, ranks=(32, 4, 4))
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        PolySAEConfig(d_in=8, n_latents=64, order=4)
    with pytest.raises(ValueError, match="k must be smaller"):  # the shared SAE checks still run
        PolySAEConfig(d_in=8, n_latents=8, k=8)


def test_init_matches_the_official_recipe():
    model = _model()
    assert not hasattr(model, "W_dec")
    U = model.U.detach().double()
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-5)
    # Kaiming-uniform (a=0, fan_in = rank): bound sqrt(6 / R)
    for C, r in ((model.C1, 6), (model.C2, 4), (model.C3, 3)):
        assert C.abs().max() <= (6 / r) ** 0.5 and C.abs().max() > 0.5 * (6 / r) ** 0.5
    assert model.lambda2.item() == -0.5 and model.lambda3.item() == 0.5
    D1 = model.U @ model.C1.T
    assert torch.allclose(model.W_enc.T, D1 / D1.norm(dim=-1, keepdim=True), atol=1e-6)
    names = {n for n, _ in model.named_parameters()}
    assert names == {"W_enc", "b_enc", "b_dec", "U", "C1", "C2", "C3", "lambda2", "lambda3"}
    assert {n for n, _ in _model(order=1).named_parameters()} == {"W_enc", "b_enc", "b_dec", "U", "C1"}


# -- the three maps ----------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu"])
def test_forward_equals_decode_encode_and_shapes(sparsity):
    model = _randomise(_model(sparsity)).eval()
    x = torch.randn(10, 6)
    out = model(x)
    assert out.recon.shape == x.shape and out.latents.shape == (10, 20) and out.pre_acts.shape == (10, 20)
    assert out.recon.dtype == torch.float32 and out.latents.dtype == torch.float32
    # two computations of each (a Selection vs a dense z; F.linear's fused addmm vs a matmul and an
    # add): equal up to float32 rounding, which depends on the kernels the CPU picks
    torch.testing.assert_close(out.recon, model.decode(model.encode(x)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pre_acts, (x - model.b_dec) @ model.W_enc + model.b_enc, rtol=1e-5, atol=1e-6)
    assert out.mse.item() == pytest.approx(((x - out.recon) ** 2).sum(-1).mean().item(), rel=1e-6)
    w = model.decoder_norms() if sparsity == "relu" else 1.0  # weighted only where it is in the loss
    assert torch.allclose(out.l1, (out.latents * w).sum(-1).mean())
    l1 = model.config.l1_coeff * out.l1.item() if sparsity == "relu" else 0.0    # eval mode: no AuxK
    assert out.loss.item() == pytest.approx(out.mse.item() + l1)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 6\)"):
        model(torch.randn(3, 5))


def test_float64_model():
    model = _model(dtype=torch.float64).eval()
    out = model(torch.randn(4, 6, dtype=torch.float64))
    assert out.recon.dtype == torch.float64
    model.after_step()
    assert model.U.dtype == torch.float64


def test_topk_has_exactly_k_nonzeros():
    model = _randomise(_model("topk"))
    z = model(torch.randn(32, 6)).latents
    assert ((z > 0).sum(-1) == 3).all()


def test_batchtopk_mean_l0_is_k():
    model = _randomise(_model("batchtopk")).train()
    z = model(torch.randn(32, 6)).latents
    assert (z > 0).sum().item() == 32 * 3
    assert model.threshold.item() > 0  # calibrated for inference


def _theta(model):
    """Explicit Θ2 (F, F, d) and Θ3 (F, F, F, d) by loops over the rank index."""
    U, c = model.U.detach(), model.config
    _, r2, r3 = c.ranks
    n, d = c.n_latents, c.d_in
    T2 = torch.zeros(n, n, d, dtype=U.dtype)
    for r in range(r2):
        T2 += U[:, r, None, None] * U[None, :, r, None] * model.C2[:, r].detach()
    T3 = torch.zeros(n, n, n, d, dtype=U.dtype)
    for r in range(r3):
        T3 += (U[:, r, None, None, None] * U[None, :, r, None, None] * U[None, None, :, r, None]
               * model.C3[:, r].detach())
    return T2, T3


def test_decode_equals_naive_polynomial_with_theta_tensors():
    model = _randomise(_model(dtype=torch.float64))
    T2, T3 = _theta(model)
    D1 = model.U.detach() @ model.C1.detach().T
    n = model.config.n_latents
    z = torch.zeros(5, n, dtype=torch.float64)
    z[:, [1, 4, 7, 11]] = torch.rand(5, 4, dtype=torch.float64)  # sparse codes
    z[0] = torch.rand(n, dtype=torch.float64)                     # and one dense row
    got = model.decode(z)
    for b in range(5):
        y1 = sum(z[b, i] * D1[i] for i in range(n))
        y2 = sum(z[b, i] * z[b, j] * T2[i, j] for i in range(n) for j in range(n))
        y3 = sum(z[b, i] * z[b, j] * z[b, k] * T3[i, j, k]
                 for i, j, k in itertools.product(range(n), repeat=3))
        want = model.b_dec + y1 + model.lambda2 * y2 + model.lambda3 * y3
        assert torch.allclose(got[b], want, atol=1e-10)
        assert (model.lambda3 * y3).norm() > 1e-3 and (model.lambda2 * y2).norm() > 1e-3  # terms matter


def test_order_1_is_linear_and_order_2_is_not():
    z1, z2 = torch.rand(2, 20, dtype=torch.float64).unbind(0)
    lin = _randomise(_model(order=1, dtype=torch.float64))
    f = lin.decode_nobias
    assert torch.allclose(f((2 * z1 + 3 * z2)[None]), 2 * f(z1[None]) + 3 * f(z2[None]), atol=1e-12)
    assert torch.allclose(lin.decode(z1[None])[0], lin.b_dec + z1 @ lin.decoder_vectors())
    quad = _randomise(_model(order=2, dtype=torch.float64))
    g = quad.decode_nobias
    assert not torch.allclose(g((2 * z1)[None]), 2 * g(z1[None]), atol=1e-6)
    assert not hasattr(quad, "C3")


def test_decoder_vectors_and_norms():
    model = _randomise(_model(dtype=torch.float64))
    U, C1, C2, C3 = (p.detach() for p in (model.U, model.C1, model.C2, model.C3))
    assert torch.allclose(model.decoder_vectors(), U @ C1.T)
    T2, T3 = _theta(model)
    for i in range(20):  # one-hot z: D1[i] + λ2 Θ2[i,i] + λ3 Θ3[i,i,i]
        want = (U[i] @ C1.T + model.lambda2 * T2[i, i] + model.lambda3 * T3[i, i, i]).norm()
        assert model.decoder_norms()[i].item() == pytest.approx(want.item(), rel=1e-10)


# -- orthonormalisation ------------------------------------------------------------------


def test_adam_step_breaks_orthonormality_and_after_step_restores_it():
    model = _randomise(_model(ranks=(6, 4, 3)))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(torch.randn(64, 6)).loss.backward()
    model.before_step()
    opt.step()
    U_old = model.U.detach().double().clone()
    I = torch.eye(6, dtype=torch.float64)
    assert (U_old.T @ U_old - I).abs().max() > 1e-2  # the step really broke it
    model.after_step()
    U = model.U.detach().double()
    assert (U.T @ U - I).abs().max() < 1e-5
    # independent reference: scipy's QR with the signs fixed so diag(R) > 0
    Q, R = scipy.linalg.qr(U_old.numpy(), mode="economic")
    Q = Q * np.sign(np.diag(R))
    assert np.allclose(U.numpy(), Q, atol=1e-5)
    # characterisation: U_old = U R with R upper triangular, positive diagonal (same span)
    R_ = U.T @ U_old
    assert torch.allclose(U @ R_, U_old, atol=1e-5)
    assert torch.allclose(R_, R_.triu(), atol=1e-5) and (R_.diagonal() > 0).all()


def test_retraction_guards():
    zero = torch.zeros(10, 3)
    assert torch.equal(polysae.orthonormal_retraction(zero), zero)  # ‖U‖ < 1e-6: unchanged, no NaN
    torch.manual_seed(0)
    tiny = 1e-5 * torch.randn(10, 3, dtype=torch.float64)  # < 1e-4: jitter, then QR
    Q = polysae.orthonormal_retraction(tiny)
    assert torch.allclose(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert (Q.T @ tiny).diagonal().gt(0).all()  # still the (jittered) span, same orientation
    U = torch.randn(10, 3, dtype=torch.float64)
    Q1 = polysae.orthonormal_retraction(U)
    assert torch.allclose(polysae.orthonormal_retraction(Q1), Q1, atol=1e-12)  # idempotent


# -- interactions ------------------------------------------------------------------------


def test_interaction_weight_and_matrix_match_explicit_theta():
    model = _randomise(_model(dtype=torch.float64))
    T2, _ = _theta(model)
    U, C2 = model.U.detach(), model.C2.detach()
    for i, j in [(0, 0), (3, 7), (7, 3), (19, 5)]:
        naive = sum(U[i, r] * U[j, r] * C2[:, r] for r in range(4)).norm().item()
        assert model.interaction_matrix([i, j])[0, 1].item() == pytest.approx(naive, rel=1e-10)
        assert naive == pytest.approx(T2[i, j].norm().item(), rel=1e-10)
    idx = [2, 9, 0, 13, 9]
    M = model.interaction_matrix(idx)
    want = torch.tensor([[sum(U[a, r] * U[b, r] * C2[:, r] for r in range(4)).norm().item() for b in idx]
                         for a in idx], dtype=torch.float64)
    assert M.shape == (5, 5)
    assert torch.allclose(M, want, rtol=1e-8, atol=1e-12)
    assert torch.allclose(M, M.T)
    # float32 model, all latents: still matches the explicit tensor
    m32 = _randomise(_model())
    T2_32, _ = _theta(m32)
    assert torch.allclose(m32.interaction_matrix(torch.arange(20)), T2_32.norm(dim=-1), rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="order >= 2"):
        _model(order=1).interaction_matrix([0, 1])


# -- parameter count ---------------------------------------------------------------------


def sae_param_count(d_in: int, n_latents: int) -> int:
    """The TopK SAE of the same width: W_enc, W_dec, b_enc, b_dec."""
    return 2 * d_in * n_latents + n_latents + d_in


def test_param_count_reproduces_the_gpt2_overhead_without_building_the_model():
    cfg = PolySAEConfig(d_in=768, n_latents=16384, k=64, ranks=(768, 64, 64))
    extra = polysae.param_count(cfg) - sae_param_count(768, 16384)
    assert extra == 688_130 == 768 * (768 + 64 + 64) + 2
    assert sae_param_count(768, 16384) == 25_182_976
    assert extra / sae_param_count(768, 16384) == pytest.approx(0.0273, abs=1e-4)
    cfg_smoke = PolySAEConfig(d_in=768, n_latents=16384, k=64, ranks=(768, 32, 32))
    smoke = polysae.param_count(cfg_smoke) - sae_param_count(768, 16384)
    assert smoke / sae_param_count(768, 16384) == pytest.approx(0.025, abs=1e-3)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_param_count_matches_real_models(order):
    model = _model(order=order)
    assert polysae.param_count(model.config) == sum(p.numel() for p in model.parameters())
    base = sae.SAE(sae.SAEConfig(d_in=6, n_latents=20, k=3))
    assert sae_param_count(6, 20) == sum(p.numel() for p in base.parameters())


# -- upkeep, save/load, folding ----------------------------------------------------------


def test_dead_counter_auxk_and_dead_fraction():
    model = _randomise(_model())
    model.config.dead_tokens = 0  # everything counts as dead
    x = torch.randn(16, 6)
    out = model(x)
    assert out.auxk.item() > 0
    assert out.loss.item() == pytest.approx(out.mse.item() + model.config.aux_coeff * out.auxk.item(), rel=1e-6)
    # AuxK decodes through the polynomial decoder without b_dec
    pre, resid = out.pre_acts, (x - out.recon).detach()
    z_aux = core.dense(core.sparsify(pre, "topk", model.config.aux_k, True, torch.tensor(-1.0)))
    naive = min(20 / model.config.aux_k, 1.0) * (resid - (model.decode(z_aux) - model.b_dec)).pow(2).sum(-1).mean()
    assert out.auxk.item() == pytest.approx(naive.item(), rel=1e-5)
    model.config.dead_tokens = 16
    assert core.dead_fraction(model) == pytest.approx((~(out.latents > 0).any(0)).float().mean().item())


@pytest.mark.parametrize("order", [1, 3])
def test_save_load_round_trip_is_exact(tmp_path, order):
    model = _randomise(_model("batchtopk", order=order))
    model(torch.randn(32, 6))  # move the buffers away from their init
    saved.save(model, tmp_path / "m")
    loaded = saved.load(tmp_path / "m")
    assert type(loaded) is PolySAE and loaded.config == model.config
    assert loaded.config.ranks == (6, 4, 3)  # JSON list back to a tuple
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    model.eval(), loaded.eval()
    x = torch.randn(8, 6)
    assert torch.equal(model(x).recon, loaded(x).recon)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_fold_input_scale_keeps_outputs_in_raw_units(order):
    model = _randomise(_model(order=order)).eval()
    model.config.input_scale = [2.5]
    x_raw = torch.randn(20, 6) * 4
    expected = model(x_raw * 2.5).recon / 2.5
    z_before = model.encode(x_raw * 2.5)
    model.fold_input_scale()
    assert model.config.input_scale == [1.0]
    assert torch.allclose(model.encode(x_raw), z_before, atol=1e-5)
    assert torch.allclose(model(x_raw).recon, expected, atol=1e-5)


# -- learning ----------------------------------------------------------------------------


def test_polysae_learns_ground_truth_atoms():
    data = make_toy_data(d=32, n_layers=4, n_atoms=256, seed=0)
    torch.manual_seed(0)
    model = PolySAE(PolySAEConfig(d_in=32, n_latents=512, k=8, sparsity="topk", dead_tokens=50_000))
    res = fit(model, data, steps=400, single_layer=0)
    layer0 = ToyData(data.atoms_NLD[:, :1], data.profile_NL[:, :1], data.density, data.noise, 0)
    present = layer0.profile_NL[:, 0] > 0
    best, _ = recovery(model.decoder_vectors()[:, None], layer0)
    frac = best[present].gt(0.9).float().mean().item()
    print(f"PolySAE toy: FVU {res['fvu']:.3f}, L0 {res['l0']:.1f}, recovered {frac:.2f} of "
          f"{int(present.sum())} atoms, lambda2 {model.lambda2.item():.3f}, lambda3 {model.lambda3.item():.3f}")
    assert frac > 0.8
    assert res["fvu"] < 0.3
    U = model.U.detach().double()
    assert torch.allclose(U.T @ U, torch.eye(32, dtype=torch.float64), atol=1e-5)

"""Functional coherence against cases with known answers: hand-built readouts, the layered generators of
support/synthetic.py, the oracle readout, the artefact readings' off-token share, the readout profile."""
import math
import warnings

import pytest
import torch
from sklearn.linear_model import Ridge

import metrics
from crosscoder import CrossCoder, CrossCoderConfig
from fmxcoder import FMXCoderConfig, check_ranks
from support import synthetic


def two_layer_reader(w0: float, w1: float, sparsity: str = "relu") -> CrossCoder:
    """One latent that reads w0 · x_0[0] + w1 · x_1[0] (d 2, L 2, b_dec 0, b_enc 0); a second that never fires."""
    cc = CrossCoder(CrossCoderConfig(d_in=2, n_latents=2, k=1, n_layers=2, sparsity=sparsity))
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, 0, 0], cc.W_enc[1, 0, 0] = w0, w1
        cc.W_enc[:, 0, 1] = -10.0
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc.eval()


def stream(prev_T: torch.Tensor, new_T: torch.Tensor) -> torch.Tensor:
    """x_0 = prev · e, x_1 = (prev + new) · e: a feature `new` written at layer 1 on top of what layer 0 held."""
    x = torch.zeros(len(prev_T), 2, 2)
    x[:, 0, 0], x[:, 1, 0] = prev_T, prev_T + new_T
    return x


def test_fc_of_a_latent_reading_one_layer_is_one_under_zeroing_and_mean_ablation():
    cc = two_layer_reader(0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    x = stream(torch.rand(50, generator=g), 0.5 + torch.rand(50, generator=g))
    fc = metrics.functional_coherence(cc, [x], min_fires=1, mean_LD=x.mean(0))
    assert fc["fc_latents"] == 1
    assert fc["fc_mean"] == pytest.approx(1.0)
    assert fc["fc_mean_ablation"] == pytest.approx(1.0)


def test_fc_of_a_differencing_readout_is_the_derived_value():
    """The readout new = x_1 − x_0 (+e at layer 1, −e at layer 0). Zeroing layer 1 leaves pre = −prev ≤ 0, so
    Δ_1 = |new − 0| / new = 1; zeroing layer 0 leaves pre = prev + new, so Δ_0 = mean(prev / new); hence
    FC = (1 + m) / max(1, m), m = mean over tokens of prev / new. Mean ablation (x_l → its mean) is written
    out token by token."""
    cc = two_layer_reader(-1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    prev, new = 2.0 * torch.rand(400, generator=g), 0.5 + torch.rand(400, generator=g)
    x = stream(prev, new)
    m = (prev / new).mean().item()
    fc = metrics.functional_coherence(cc, [x[:150], x[150:]], min_fires=1, mean_LD=x.mean(0))
    assert fc["fc_mean"] == pytest.approx((1 + m) / max(1.0, m), rel=1e-6)
    mu0, mu1 = prev.mean(), (prev + new).mean()
    d0 = ((new - torch.relu(mu1 - mu0 - new)).abs() / new).mean()     # layer 0 → its mean: pre = x_1 − mu0
    d0 = ((new - torch.relu(prev + new - mu0)).abs() / new).mean()
    d1 = ((new - torch.relu(mu1 - prev)).abs() / new).mean()         # layer 1 → its mean: pre = mu1 − x_0
    assert fc["fc_mean_ablation"] == pytest.approx(((d0 + d1) / max(d0, d1)).item(), rel=1e-6)
    # the readout profile of that latent against e: −1 at layer 0, +1 at layer 1
    cos, proj = metrics.readout_profile(cc.W_enc[..., :1], torch.tensor([[1.0, 0.0]]))
    assert cos[0].tolist() == pytest.approx([-1.0, 1.0]) and proj[0].tolist() == pytest.approx([-1.0, 1.0])


def test_off_token_share_of_the_all_token_readings():
    """pre = x_0 − x_1 (ReLU): token 1 (2, 1) fires with a = 1, token 2 (1, 2) is off. Zeroing layer 1 turns
    token 2 on (a_l = 1): the all-token mean of ratios adds 1 / ε from that token against 2 from token 1
    (off share 1 − 2ε / (1 + 2ε)), the all-token ratio of means adds 1 against 2 (off share 1/3)."""
    cc = two_layer_reader(1.0, -1.0)
    x = torch.zeros(2, 2, 2)
    x[0, :, 0] = torch.tensor([2.0, 1.0])
    x[1, :, 0] = torch.tensor([1.0, 2.0])
    fcs, fires, sums = metrics.fc_per_latent(cc, [x], metrics.ALL_READINGS)
    assert fires.tolist() == [1, 0]
    assert metrics.off_token_share(sums, "pre", "ratio_mean")[0].item() == pytest.approx(1 - 2e-8, abs=1e-12)
    assert metrics.off_token_share(sums, "pre", "mean_ratio")[0].item() == pytest.approx(1 / 3)
    fc = metrics.functional_coherence(cc, [x], min_fires=1, artefacts=True)
    art = fc["fc_artefacts"]["pre/all/ratio_mean"]
    assert art["off_token_share"] == pytest.approx(1.0, abs=1e-7) and "artefact" in art["note"]
    assert art["mean"] == pytest.approx(1 + 2e-8 / 2, rel=1e-6)       # Δ = (1/2, 1/(2ε) + 1/2): FC ≈ 1


def test_fc_by_spread_bins_the_latents_by_decoder_norm_spread():
    fc = torch.tensor([1.0, 1.5, 3.0, 5.0, math.nan])
    sp = torch.tensor([1.0, 1.9, 2.0, 4.0, 3.5])
    b = metrics.by_spread(fc, sp, 4)
    assert b["edges"] == [1, 2, 3, 4]
    assert b["latents"] == [2, 1, 1]
    assert b["fc_mean"] == pytest.approx([1.25, 3.0, 5.0])


def test_differencing_signature_of_a_hand_built_persistent_reader():
    """Latent 0 writes u at layers 2..3 and reads +u at 2, −u at 1 (ratio −1); latent 1 reads and writes only
    layer 3 (ratio 0 at the layer before); latent 2 peaks at layer 0 (no layer before: nan)."""
    L, d = 4, 3
    u = torch.tensor([1.0, 0.0, 0.0])
    W_enc = torch.zeros(L, d, 3)
    W_dec = torch.zeros(3, L, d)
    W_enc[2, :, 0], W_enc[1, :, 0] = u, -0.8 * u
    W_dec[0, 2:] = u
    W_enc[3, :, 1], W_dec[1, 3] = u, u
    W_enc[0, :, 2], W_dec[2, 0] = u, u
    sig = metrics.differencing_signature(W_enc, W_dec)
    assert sig["peak"].tolist() == [2, 3, 0]
    assert sig["ratio"][:2].tolist() == pytest.approx([-0.8, 0.0]) and math.isnan(sig["ratio"][2])
    assert sig["cos_before"][0].item() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------
# The generators and the oracle
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gen", list(synthetic.GENERATORS))
def test_layered_generators_plant_what_they_say(gen):
    data = synthetic.GENERATORS[gen](d=16, n_layers=6, n_atoms=60, seed=3)
    N, L, d = data.atoms_NLD.shape
    norms = data.norm_profile()
    inside = (torch.arange(L) >= data.onset_N[:, None]) & (torch.arange(L) < (data.onset_N + data.span_N)[:, None])
    assert ((norms > 0) == inside).all()                                # present exactly over its span
    assert (data.span_N == 1).sum() == 20                               # a third layer-local
    assert data.true_spread().tolist() == pytest.approx(metrics.spread(norms).tolist())
    multi = data.span_N > 1
    u = data.atoms_NLD / norms.clamp_min(1e-12)[..., None]
    adj = (u[:, :-1] * u[:, 1:]).sum(-1)[inside[:, :-1] & inside[:, 1:]]  # cos of the direction at adjacent layers
    if gen == "a":
        assert adj.abs().max() < 0.9                                    # independent directions
        assert ((norms[inside] - 1).abs() < 1e-5).all()
    if gen == "b":
        assert (data.onset_N[multi] + data.span_N[multi] == L).all()    # persistent to the last layer
        assert adj.min() > 1 - 1e-5 and ((norms[inside] - 1).abs() < 1e-5).all()   # drift 0: one direction
    if gen == "c":
        mean_gain = (norms * inside).sum(1) / data.span_N
        assert mean_gain.tolist() == pytest.approx([1.0] * N, rel=1e-5)
        assert norms[multi].std() > 0.05                                # the gain walks
    if gen == "d":
        assert (data.onset_N[multi] + data.span_N[multi] == L).all()
        assert (data.span_N == L).sum() >= 0.8 * multi.sum()            # most carried from before the window
        assert 0.95 < adj.min() < 1                                     # slow drift
        assert data.offset_LD.norm(dim=-1).min() > 0


def test_generator_moments_match_a_large_sample():
    data = synthetic.persistent(d=6, n_layers=3, n_atoms=12, density=0.2, noise=0.05, seed=0)
    x, a = data.sample_codes(200_000, torch.Generator().manual_seed(0))
    mean_a, var_a = data.code_moments()
    assert a.mean().item() == pytest.approx(mean_a, rel=0.02)
    assert a.var().item() == pytest.approx(var_a, rel=0.02)
    flat = x.flatten(1).double()
    assert (flat.mean(0) - data.mean().flatten()).abs().max() < 0.01
    assert (torch.cov(flat.T) - data.covariance()).abs().max() < 0.01


def test_collinear_generator_has_near_collinear_adjacent_layers():
    data = synthetic.collinear(d=32, n_layers=8, n_atoms=256, density=5 / 256, seed=0)
    cos = synthetic.adjacent_cosine(data.sample(8192, torch.Generator().manual_seed(0)))
    assert 0.85 < cos.min() and cos.max() < 0.97


def test_oracle_is_the_closed_form_for_one_atom_and_ridge_on_a_sample():
    """One atom A = e_1 at layer 0: Cov(x) = v A Aᵀ + σ² I, so w = v/(v + σ²) A (Sherman-Morrison). On a random
    generator, w agrees with scikit-learn's ridge regression of each code on a large sample."""
    atoms = torch.zeros(1, 2, 3)
    atoms[0, 0, 0] = 1.0
    one = synthetic.LayeredFeatures(atoms, torch.tensor([0]), torch.tensor([1]), torch.zeros(2, 3), 0.3, 0.1, "hand", 0)
    v = one.code_moments()[1]
    want = torch.zeros(2, 3)
    want[0, 0] = v / (v + 0.01)
    assert synthetic.Oracle(one).W_enc[..., 0].flatten().tolist() == pytest.approx(want.flatten().tolist(), abs=1e-6)

    data = synthetic.write_erase(d=5, n_layers=3, n_atoms=8, density=0.2, noise=0.1, seed=1)
    x, a = data.sample_codes(100_000, torch.Generator().manual_seed(2))
    ridge = Ridge(alpha=1e-6).fit(x.flatten(1).double().numpy(), a.double().numpy())
    W = synthetic.Oracle(data).W_enc.reshape(-1, 8).T
    assert torch.tensor(ridge.coef_).flatten().tolist() == pytest.approx(W.flatten().tolist(), abs=0.03)


def test_oracle_reads_a_persistent_feature_by_differencing_with_the_derived_fc():
    """P is written before layer 0 and persists (x_0 = p e, x_1 = (p + q) e), Q is written at layer 1 in the
    same direction. The best readout of q is x_1 − x_0 (weights −1, +1 on e), and its FC under zeroing is
    1 + E[p / q | q fires] = 1 + density · E[U] · E[1/U] = 1 + density · ln 3 (U ~ Uniform(0.5, 1.5))."""
    e = torch.tensor([1.0, 0.0])
    atoms = torch.stack([torch.stack([e, e]), torch.stack([0 * e, e])])
    data = synthetic.LayeredFeatures(atoms, torch.tensor([0, 1]), torch.tensor([2, 1]), torch.zeros(2, 2), 0.3, 1e-3,
                                     "hand", 0)
    oracle = synthetic.Oracle(data)
    assert oracle.W_enc[:, 0, 1].tolist() == pytest.approx([-1.0, 1.0], abs=1e-3)
    x = data.sample(100_000, torch.Generator().manual_seed(0))
    fcs, fires, _ = metrics.fc_per_latent(oracle, [x])
    assert fcs[metrics.MAIN][1].item() == pytest.approx(1 + 0.3 * math.log(3), abs=0.01)
    assert oracle.W_enc[:, 0, 0].tolist() == pytest.approx([1.0, 0.0], abs=1e-3)     # p is read from x_0 alone
    assert fcs[metrics.MAIN][0].item() == pytest.approx(1.0, abs=1e-3)


def test_match_and_recovery_find_the_planted_atoms():
    data = synthetic.persistent(d=8, n_layers=4, n_atoms=10, seed=0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    decoder = torch.cat([2.0 * data.atoms_NLD[perm], torch.randn(5, 4, 8)])    # scaled copies + junk latents
    cos, latent = synthetic.match(decoder, data)
    assert cos.tolist() == pytest.approx([1.0] * 10, abs=1e-5)
    assert (perm[latent] == torch.arange(10)).all()
    assert synthetic.recovery(decoder, data)[1] == 1.0


# ----------------------------------------------------------------------------------------
# fmxcoder ranks
# ----------------------------------------------------------------------------------------


def test_check_ranks_warns_with_the_numbers_below_full_per_latent_capacity():
    with pytest.warns(UserWarning, match=r"per-latent capacity R2\*R3=96 < L\*d=384 \(0\.25 of it\)"):
        check_ranks("tr", (8, 8, 12), 48, 768, 8)
    with pytest.warns(UserWarning, match=r"per-latent capacity R=96 < L\*d=384"):
        FMXCoderConfig(d_in=48, n_latents=768, n_layers=8, rank=96, factorization="cp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_ranks("tr", (16, 16, 24), 48, 768, 8)                      # R2·R3 = 384 = L·d: no warning
        check_ranks("cp", (384,), 48, 768, 8)

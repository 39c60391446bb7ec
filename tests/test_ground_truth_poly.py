"""Planted composition (support/synthetic.py's composition section), the exact PolySAE of it
(experiments/ground_truth_poly.py), metrics.roc_auc and metrics.interaction_vs_cooccurrence on hand-built
interaction weights and codes with known answers."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import core
import metrics
import polysae
from polysae import PolySAE, PolySAEConfig
from support import synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import ground_truth_poly as gtp  # noqa: E402


def _data(**kw):
    base = dict(d=24, n_atoms=16, n_pairs=2, n_cooc=2, n_triples=1, density=0.1, rate=0.1, strength=1.5,
                strength3=0.7, noise=0.0, seed=3)
    return synthetic.make_composition_data(**{**base, **kw})


# -- the generator -----------------------------------------------------------------------


def test_interaction_directions_are_unit_off_their_atoms_and_in_the_rank_r_subspace():
    data = _data(d=32, n_atoms=40, n_pairs=5, n_cooc=3, n_triples=2, rank=6)
    E = torch.cat([data.pair_dirs_PD, data.triple_dirs_TD])
    assert torch.allclose(E.norm(dim=-1), torch.ones(len(E)), atol=1e-6)
    for members, e in zip(list(data.pairs_P2) + list(data.triples_T3), E):
        assert (data.atoms_ND[members] @ e).abs().max() < 1e-5          # outside span of its own atoms
    assert torch.linalg.matrix_rank(E, atol=1e-4) == 6                  # 7 directions in a 6-dim subspace
    assert torch.linalg.matrix_rank(_data(n_pairs=5, n_cooc=0, n_triples=0).pair_dirs_PD, atol=1e-4) == 5
    # groups are disjoint sets of atoms, pairs first, then co-occurring pairs, then triples
    groups = torch.cat([data.pairs_P2.flatten(), data.cooc_Q2.flatten(), data.triples_T3.flatten()])
    assert groups.tolist() == list(range(2 * 5 + 2 * 3 + 3 * 2))


def test_signal_is_the_equation_written_out():
    data = _data()
    x, a = data.sample(64, torch.Generator().manual_seed(0), codes=True)
    want = torch.zeros(64, data.d)
    for b in range(64):
        for n in range(data.n_atoms):
            want[b] += a[b, n] * data.atoms_ND[n]
        for (i, j), e in zip(data.pairs_P2.tolist(), data.pair_dirs_PD):
            want[b] += data.strength * a[b, i] * a[b, j] * e
        for (i, j, k), e in zip(data.triples_T3.tolist(), data.triple_dirs_TD):
            want[b] += data.strength3 * a[b, i] * a[b, j] * a[b, k] * e
    assert torch.allclose(x, want, atol=1e-5)                           # noise 0
    assert ((a == 0) | ((a >= 0.5) & (a <= 1.5))).all()


def test_interacting_and_cooccurring_pairs_fire_together_equally_often():
    """P(both fire) = rate + (1 − rate)·density² for a pair of P and of Q alike; an atom fires alone with
    density·(1 − density)(1 − rate)."""
    data = _data(n_atoms=40, n_pairs=3, n_cooc=3, n_triples=0, density=0.05, rate=0.08)
    fire = data.draw_fire(200_000, torch.Generator().manual_seed(1)).double()
    n = len(fire)
    want = 0.08 + 0.92 * 0.05 ** 2
    for i, j in torch.cat([data.pairs_P2, data.cooc_Q2]).tolist():
        both = (fire[:, i] * fire[:, j]).mean().item()
        assert abs(both - want) < 5 * math.sqrt(want * (1 - want) / n)
    alone = (fire[:, 0] * (1 - fire[:, 1])).mean().item()
    want_alone = 0.05 * 0.95 * 0.92
    assert abs(alone - want_alone) < 5 * math.sqrt(want_alone / n)
    free = fire[:, 12:].mean().item()                                   # independent atoms: density
    assert abs(free - 0.05) < 5 * math.sqrt(0.05 / (n * 28))


def test_probe_set_labels_follow_the_pair():
    """No superposition and no noise, so the codes come back from x exactly through pinv([D; E])."""
    data = _data()
    E = torch.cat([data.atoms_ND, data.pair_dirs_PD, data.triple_dirs_TD])
    pair = data.pairs_P2[1]
    for task in ("compound", "part"):
        x, y = synthetic.probe_set(data, pair, task, 40, torch.Generator().manual_seed(2))
        coef = x @ torch.linalg.pinv(E)                                  # (n, N + P + T): a, then s a_i a_j, ...
        on_i, on_j = coef[:, pair[0]] > 0.25, coef[:, pair[1]] > 0.25
        want = (on_i & on_j) if task == "compound" else on_i
        assert torch.equal(y.bool(), want)
        if task == "compound":
            assert (on_i | on_j).all()                                   # negatives hold exactly one part
        assert y.sum() == 20
    with pytest.raises(ValueError, match="multiple of 4"):
        synthetic.probe_set(data, pair, "part", 42)


def test_generator_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="rank must lie in"):
        _data(rank=3)
    with pytest.raises(ValueError, match="n_atoms must hold"):
        _data(n_atoms=10, n_pairs=3, n_cooc=2, n_triples=1)


# -- the ground-truth readings -----------------------------------------------------------


def test_latent_roles_match_atoms_interactions_and_compounds():
    data = _data(d=32, n_atoms=16)
    D, s = data.atoms_ND, data.strength
    i, j = data.pairs_P2[0].tolist()
    k, l = data.cooc_Q2[1].tolist()
    rows = torch.stack([D[5], 3 * D[9], data.pair_dirs_PD[1], D[i] + D[j] + s * data.pair_dirs_PD[0],
                        D[k] + D[l], torch.randn(32, generator=torch.Generator().manual_seed(0))])
    r = synthetic.latent_roles(rows, data)
    assert r["role_F"][:5] == ["atom", "atom", "pair E", "pair compound", "cooc compound"]
    assert r["counts"]["atom"] == 2 and r["counts"]["pair compound"] == 1 and r["counts"]["none"] == 1
    assert r["atom_recovery"] == pytest.approx(2 / 16)
    latent, cos = synthetic.match_atoms(rows, data)
    assert latent[5] == 0 and latent[9] == 1 and cos[9] == pytest.approx(1.0, abs=1e-6)


def test_pair_scores_read_the_matched_latents():
    data = _data(n_atoms=16)                      # pairs (0,1), (2,3); cooc (4,5), (6,7); triple 8-10; free 11-15
    latent = torch.arange(16).flip(0)             # atom n ↔ latent 15 − n
    ok = torch.ones(16, dtype=torch.bool)
    ok[3] = False                                 # pair (2, 3) unmatched: left out
    S = torch.arange(256.0).view(16, 16)
    r = synthetic.pair_scores(S, data, latent, ok)
    assert r["pair"].tolist() == [S[15, 14].item()]
    assert r["cooc"].tolist() == [S[11, 10].item(), S[9, 8].item()]
    assert len(r["other"]) == math.comb(5, 2)
    assert r["other"][0].item() == S[4, 3].item()                      # atoms 11, 12


def test_roc_auc_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 30).astype(float), rng.integers(0, 5, 40).astype(float)   # with ties
    u = scipy.stats.mannwhitneyu(pos, neg).statistic
    assert metrics.roc_auc(torch.tensor(pos), torch.tensor(neg)) == pytest.approx(u / (30 * 40), rel=1e-12)
    assert metrics.roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert metrics.roc_auc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert metrics.roc_auc(torch.ones(3), torch.ones(4)) == 0.5
    with pytest.raises(ValueError, match="at least one positive"):
        metrics.roc_auc(torch.ones(3), torch.zeros(0))


# -- the exact PolySAE of a planted composition --------------------------------------------


def test_oracle_polysae_writes_the_planted_composition_exactly():
    data = _data()                                                     # 2 pairs, 1 triple, no superposition
    model = gtp.oracle_polysae(data, k=16, n_latents=30)
    U = model.U.detach()
    assert torch.allclose(U.T @ U, torch.eye(24, dtype=U.dtype), atol=1e-12)
    assert torch.allclose(polysae.orthonormal_retraction(U), U, atol=1e-12)   # a fixed point of the retraction
    x, a = data.sample(500, torch.Generator().manual_seed(0), codes=True)
    a = a.double()
    z = torch.cat([a, a.new_zeros(500, 30 - data.n_atoms)], 1)
    assert torch.allclose(model.decode(z), data.signal(a), atol=1e-12)
    assert torch.allclose(model.encode(x.double())[:, :data.n_atoms], a, atol=1e-5)
    # Θ2 is zero everywhere but the planted pairs (diagonal included), where 2 λ2 Θ2[i, j] = s E_ij
    theta = model.interaction_matrix(torch.arange(30))
    planted = torch.zeros(30, 30, dtype=torch.bool)
    for (i, j) in data.pairs_P2.tolist():
        planted[i, j] = planted[j, i] = True
        T = 2 * model.lambda2 * (U[i, :8] * U[j, :8]) @ model.C2.T
        assert torch.allclose(T, data.strength * data.pair_dirs_PD[[i // 2]].double(), atol=1e-12)
    assert theta[~planted].abs().max() < 1e-12
    assert torch.allclose(theta[planted], torch.full((4,), data.strength / (2 * 0.5), dtype=theta.dtype))
    # at the narrowest width it needs, F = R1 = N + T (one latent that never fires per triple)
    narrow = gtp.oracle_polysae(data, k=16, n_latents=17, r1=17)
    assert narrow.config.ranks == (17, 8, 4)
    z = torch.cat([a, a.new_zeros(500, 1)], 1)
    assert torch.allclose(narrow.decode(z), data.signal(a), atol=1e-12)
    with pytest.raises(ValueError, match="N \\+ P \\+ T <= d"):
        gtp.oracle_polysae(_data(d=16), k=4)
    with pytest.raises(ValueError, match="N \\+ T <= r1 <= n_latents"):
        gtp.oracle_polysae(data, k=4, n_latents=17, r1=16)


def _frozen_truth_polysae(data, steps, seed=0):
    """A PolySAE whose encoder is the true one (fixed) and whose decoder starts as ours with C2 = 0."""
    torch.manual_seed(seed)
    model = PolySAE(PolySAEConfig(d_in=data.d, n_latents=data.d, k=6, sparsity="topk", ranks=(data.d, 2, 1), order=2))
    oracle = gtp.oracle_polysae(data, 6, data.d)
    with torch.no_grad():
        model.C2.zero_()
        model.W_enc.copy_(oracle.W_enc)
        model.b_enc.copy_(oracle.b_enc)
    for p in (model.W_enc, model.b_enc, model.b_dec):
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        core.train_step(model, opt, data.sample(256, g))
    return model.eval()


def _effective(model, i, j):
    """T = 2 λ2 Θ2[i, j] / (‖D1[i]‖ ‖D1[j]‖): what the quadratic term adds per unit of a_i a_j."""
    D1 = model.decoder_vectors().detach()
    R2 = model.config.ranks[1]
    theta = (model.U[i, :R2] * model.U[j, :R2]).detach() @ model.C2.detach().T
    return 2 * model.lambda2.detach() * theta / (D1[i].norm() * D1[j].norm())


def test_decoder_learns_one_planted_pair_and_not_the_cooccurring_one():
    """Given the true codes, gradient descent on the polynomial decoder (C2 from 0, U retracted every step)
    finds the planted interaction: the matched latents' Θ2 dominates, and the co-occurring pair's stays small."""
    data = synthetic.make_composition_data(d=16, n_atoms=8, n_pairs=1, n_cooc=1, n_triples=0, density=0.1,
                                           rate=0.1, noise=0.0, seed=0)
    model = _frozen_truth_polysae(data, steps=300)
    T_P, T_Q = _effective(model, 0, 1), _effective(model, 2, 3)
    assert T_P.norm() > 0.5 * data.strength
    assert torch.cosine_similarity(T_P, data.pair_dirs_PD[0], dim=0) > 0.95
    assert T_Q.norm() < 0.15 * T_P.norm()
    theta = model.interaction_matrix(torch.arange(8))
    off = theta.clone().fill_diagonal_(0)
    off[0, 1] = off[1, 0] = 0
    assert theta[0, 1] > 3 * off.max()


def test_cooccurrence_alone_leaves_the_interaction_small():
    """The same decoder on a strength-0 generator (every pair merely co-occurs): no pair gains an effective
    interaction, and the quadratic term is not needed (FVU at the noise-free floor of TopK)."""
    data = synthetic.make_composition_data(d=16, n_atoms=8, n_pairs=1, n_cooc=1, n_triples=0, density=0.1,
                                           rate=0.1, strength=0.0, noise=0.0, seed=0)
    model = _frozen_truth_polysae(data, steps=300)
    for i, j in [(0, 1), (2, 3)]:
        assert _effective(model, i, j).norm() < 0.05


def test_training_from_the_oracle_keeps_the_interaction():
    data = _data(d=24, n_atoms=16, n_triples=0, noise=0.01)
    spec = dict(n_latents=24, k=6)
    oracle = gtp.oracle_polysae(data, **spec).float()
    model = PolySAE(PolySAEConfig(d_in=24, **spec, sparsity="topk", ranks=oracle.config.ranks, order=2))
    model.load_state_dict(oracle.state_dict())
    gtp.train(model, data, None, steps=150, batch=256, lr=3e-3, seed=0)
    for p, (i, j) in enumerate(data.pairs_P2.tolist()):
        T = _effective(model, i, j)
        assert T.norm() == pytest.approx(data.strength, rel=0.2)
        assert torch.cosine_similarity(T, data.pair_dirs_PD[p], dim=0) > 0.98


# -- interaction vs co-occurrence on hand-built weights and codes --------------------------


def _hand_polysae():
    """5 latents; Θ2 is non-zero only at (0, 1), with ‖Θ2[0, 1]‖ = 1 (the exact construction of one pair)."""
    data = synthetic.make_composition_data(d=8, n_atoms=5, n_pairs=1, n_cooc=0, n_triples=0, seed=0)
    return gtp.oracle_polysae(data, k=2, n_latents=8).float()


@pytest.mark.parametrize("cooc01, want", [(4, 1.0), (0, -1.0)])
def test_interaction_vs_cooccurrence_on_hand_built_weights_and_codes(cooc01, want):
    """Five latents fire in tokens of two: every other pair together once, pair (0, 1) `cooc01` times. The only
    non-zero interaction is at (0, 1), so r(‖Θ2‖, cooc) is +1 when (0, 1) co-occurs most and −1 when least;
    a latent that never fires (5..7) is left out."""
    model = _hand_polysae()
    z = torch.zeros(0, 8)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5) if (i, j) != (0, 1)]
    tokens = []
    for i, j in pairs:                                               # 9 tokens: each other pair once
        t = torch.zeros(8)
        t[[i, j]] = 5.0 if (i, j) == (2, 3) else 1.0                 # a magnitude that frequencies must ignore
        tokens.append(t)
    for _ in range(cooc01):
        t = torch.zeros(8)
        t[[0, 1]] = 1.0
        tokens.append(t)
    z = torch.stack(tokens)
    n_tok = len(z)
    counts = (z > 0).sum(0)
    r = metrics.interaction_vs_cooccurrence(model, [z[:4], z[4:]], counts, n=8)
    assert r["n_latents"] == 5
    assert r["r_interaction_cooc"] == pytest.approx(want, abs=1e-6)
    # covariance of 0/1 codes: P(both) − P(i)P(j), checked against numpy on the same pairs
    zi = z[:, counts.topk(5).indices].numpy().astype(float)
    cov = np.cov(zi.T, bias=True)
    cooc = (zi > 0).T.astype(float) @ (zi > 0).astype(float) / n_tok
    iu = np.triu_indices(5, 1)
    assert r["r_covariance_cooc"] == pytest.approx(np.corrcoef(cov[iu], cooc[iu])[0, 1], rel=1e-6)


# -- the experiment's cells ----------------------------------------------------------------


def test_oracle_cell_measures_the_planted_truth(tmp_path):
    """The measuring code on the exact model: AUC 1, effective interaction = s along E at P, 0 at Q."""
    cfg = gtp.GroundTruthConfig(out=str(tmp_path), configs="exact", seeds=1, steps=1, eval_tokens=1024, probe_n=40)
    row = gtp.run_cell("exact", "oracle", 0, cfg)
    assert row["auc_pair_vs_cooc"] == 1.0 and row["auc_pair_vs_other"] == 1.0
    assert row["T_over_s"]["pair"] == pytest.approx(1.0, abs=1e-3) and row["T_over_s"]["cooc"] < 1e-6
    assert row["cos_T_E"] == pytest.approx(1.0, abs=1e-4)
    assert row["roles"]["pair compound"] == 0 and row["roles"]["pair E"] == 0
    assert row["atom_recovery"] == 1.0
    # the true parts probe "part present" with one latent (TopK k 4 drops a part now and then); "compound
    # present" needs two: one part alone is also on in half the negatives (F1 2/3 at best)
    assert row["probe"]["P part"]["f1_top1"] > 0.9
    assert row["probe"]["P compound"]["f1_top1"] < 0.8 < 0.9 < row["probe"]["P compound"]["f1_top2"]


def test_sweep_skips_done_cells_and_refuses_bad_flags(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--configs", "exact", "--seeds", "1", "--steps", "3", "--eval-tokens", "512",
            "--probe-n", "16"]
    cfg = gtp.GroundTruthConfig(out=str(tmp_path), configs="exact", seeds=1, steps=3, eval_tokens=512, probe_n=16)
    import json
    path = tmp_path / "results.jsonl"
    done = [{"config": "exact", "model": m, "seed": 0} for m in gtp.CONFIGS["exact"]["models"] if m != "sae-unit"]
    path.write_text("".join(json.dumps(r) + "\n" for r in done))
    gtp.sweep(cfg)
    rows = gtp.load(path)
    assert [r["model"] for r in rows[len(done):]] == ["sae-unit"]                # only the missing cell ran
    assert gtp.main(args + ["--configs", "main,nope"]) == 2
    assert "--configs must name configs" in capsys.readouterr().err
    assert gtp.main(args + ["--probe-n", "10"]) == 2

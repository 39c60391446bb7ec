"""Synthetic activations built from known sparse features, for the tests and benchmarks.

Ground truth: N atoms, each with a unit direction per layer D[n, l] ∈ R^d and a layer
profile P[n, l] ∈ {0, 1}. A fraction `shared` of the atoms is present in every layer
(cross-layer features); each other atom lives in one random layer (layer-local features).
Every token draws sparse non-negative codes a_n (each atom fires with probability
`density`, magnitude Uniform(0.5, 1.5)) and

    x[b, l] = Σ_n a[b, n] P[n, l] D[n, l] + σ ε,        x: (B, L, d)

`recovery(decoder_FLd, data)` is the usual check: for each atom, the best cosine between
its concatenated (masked) per-layer directions and any latent's concatenated decoder
vectors; an atom counts as recovered at cosine > 0.9.
`fit` trains any dictionary on them with core.train_step (the model files' own `python sae.py` demos
use core.demo, which needs nothing beyond core.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import core

TOY_D, TOY_L = 32, 4        # make_toy_data's default model dimension and number of layers


@dataclass
class ToyData:
    atoms_NLD: Tensor     # (N, L, d) unit directions (zero where the profile is 0)
    profile_NL: Tensor    # (N, L) 0/1
    density: float
    noise: float
    seed: int

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, L, d) activations."""
        N = self.atoms_NLD.shape[0]
        fire = torch.rand(batch, N, generator=generator) < self.density
        mag = 0.5 + torch.rand(batch, N, generator=generator)
        a_BN = fire * mag
        x = torch.einsum("bn,nld->bld", a_BN, self.atoms_NLD)
        return x + self.noise * torch.randn(x.shape, generator=generator)


def make_toy_data(d: int = TOY_D, n_layers: int = TOY_L, n_atoms: int = 256, shared: float = 0.5,
                  density: float = 0.02, noise: float = 0.01, seed: int = 0) -> ToyData:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, n_layers, d, generator=g)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    n_shared = int(round(shared * n_atoms))
    profile = torch.zeros(n_atoms, n_layers)
    profile[:n_shared] = 1.0
    local_layer = torch.randint(n_layers, (n_atoms - n_shared,), generator=g)
    profile[torch.arange(n_shared, n_atoms), local_layer] = 1.0
    return ToyData(atoms * profile[..., None], profile, density, noise, seed)


def recovery(decoder_FLD: Tensor, data: ToyData, threshold: float = 0.9) -> tuple[Tensor, float]:
    """Best cosine per atom (N,) and the fraction above `threshold`."""
    atoms = data.atoms_NLD.flatten(1)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    dec = decoder_FLD.detach().float().cpu().flatten(1)
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    best_N = (atoms @ dec.T).max(dim=-1).values
    return best_N, (best_N > threshold).float().mean().item()


def fit(model, data: ToyData, steps: int = 300, batch: int = 512, lr: float = 3e-3,
        single_layer: int | None = None, seed: int = 0) -> dict:
    """A minimal training loop (train.py has the full one) of core.train_step steps. With `single_layer`
    the model sees only x[:, single_layer] (SAEs, PolySAEs)."""
    g = torch.Generator().manual_seed(seed + 1)
    take = (lambda x: x[:, single_layer]) if single_layer is not None else (lambda x: x)
    model.init_b_dec(take(data.sample(2048, g)), "mean")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        core.train_step(model, opt, take(data.sample(batch, g)))
    model.eval()
    with torch.no_grad():
        x = take(data.sample(4096, g))
        out = model(x)
        fvu = ((x - out.recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        l0 = (out.latents > 0).float().sum(-1).mean().item()
    return {"fvu": fvu, "l0": l0}


# ========================================================================================
# Planted composition: pairwise and triple interactions next to mere co-occurrence (PolySAE)
# ========================================================================================
"""Single-site activations with known composition, for asking whether PolySAE's polynomial decoder (arXiv
2602.01322) models composition, and only composition, where the truth is known.

N base atoms with unit directions D_n ∈ R^d, and three disjoint sets of atoms in groups:
  P  interacting pairs (i, j): their co-presence adds s·a_i a_j E_ij
  T  interacting triples (i, j, k): their co-presence adds s3·a_i a_j a_k E_ijk
  Q  co-occurring pairs (i, j): they fire together exactly as often as a pair of P, and add nothing
Per token, every atom fires on its own with probability `density`, and every group of P, Q and T fires
as an event (all its atoms at once) with probability `rate`; a firing atom draws m_n ~ U(0.5, 1.5):

    fire_n = f_n ∨ ⋁_{groups g ∋ n} e_g,    f_n ~ Bern(density), e_g ~ Bern(rate)       fire: (B, N)
    a_n    = fire_n · m_n                                                            a: (B, N)
    x      = Σ_n a_n D_n + s Σ_{(i,j) ∈ P} a_i a_j E_ij + s3 Σ_{(i,j,k) ∈ T} a_i a_j a_k E_ijk + σ ε

x is a function of the code a alone: the interaction appears whenever its atoms are all present, by an
event or by chance. E[a_i a_j] = 1, so at s = 1 a compound's interaction part is as large as one atom.
Each E is a unit vector in one shared subspace span(B), B (d, r) orthonormal (`rank` r; None: r = d), and
exactly orthogonal to its own atoms' directions: E = B g / ‖B g‖ with g ~ N(0, I_r) projected off
span(Bᵀ D_i, Bᵀ D_j[, Bᵀ D_k]) (so r ≥ 4). It is therefore outside the span of its own atoms (with N > d the
other atoms span everything). Atom directions are Gaussian, normalised.

A linear dictionary can write a compound as its parts plus one latent for E_ij (whose activation s·a_i a_j
the encoder reads off x along E_ij), or as one monolithic latent along the compound direction
D_i + D_j + s E_ij (the mean code a = 1). PolySAE's quadratic term y2 = Σ_ij z_i z_j Θ2[i, j] can write
s a_i a_j E_ij from the atoms' own latents with no latent of its own. `latent_roles` says what each
decoder row matches; `pair_scores` reads ‖Θ2‖ (or anything (F, F)) at the latents matched to each pair;
`probe_set` draws labelled examples ("compound present", "part present"). experiments/ground_truth_poly.py
uses all of them.
"""


@dataclass
class CompositionData:
    atoms_ND: Tensor          # (N, d) unit atom directions D
    pairs_P2: Tensor          # (P, 2) long: interacting pairs
    pair_dirs_PD: Tensor      # (P, d) unit E_ij
    triples_T3: Tensor        # (T, 3) long: interacting triples
    triple_dirs_TD: Tensor    # (T, d) unit E_ijk
    cooc_Q2: Tensor           # (Q, 2) long: co-occurring pairs (no interaction)
    density: float            # P(an atom fires on its own)
    rate: float               # P(a group fires as an event), the same for P, Q and T
    strength: float           # s
    strength3: float          # s3
    noise: float              # σ
    rank: int                 # r, the dimension of span(B) that holds every E
    seed: int

    @property
    def d(self) -> int:
        return self.atoms_ND.shape[1]

    @property
    def n_atoms(self) -> int:
        return self.atoms_ND.shape[0]

    def groups(self) -> list[Tensor]:
        """Every group of P, Q and T as a (size,) index tensor (the events)."""
        return list(self.pairs_P2) + list(self.cooc_Q2) + list(self.triples_T3)

    def draw_fire(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, N) bool: each atom on its own with `density`, each group's atoms together with `rate`."""
        fire = torch.rand(batch, self.n_atoms, generator=generator) < self.density
        groups = self.groups()
        if groups:
            events = torch.rand(batch, len(groups), generator=generator) < self.rate
            for g, atoms in enumerate(groups):
                fire[:, atoms] |= events[:, g:g + 1]
        return fire

    def signal(self, a_BN: Tensor) -> Tensor:
        """(B, d) x without noise, from codes a (B, N)."""
        x = a_BN @ self.atoms_ND.to(a_BN)
        if len(self.pairs_P2):
            x = x + self.strength * (a_BN[:, self.pairs_P2].prod(-1) @ self.pair_dirs_PD.to(a_BN))
        if len(self.triples_T3):
            x = x + self.strength3 * (a_BN[:, self.triples_T3].prod(-1) @ self.triple_dirs_TD.to(a_BN))
        return x

    def sample(self, batch: int, generator: torch.Generator | None = None, fire: Tensor | None = None,
               codes: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, d), and the codes a (B, N) with `codes`; `fire` (B, N) bool overrides draw_fire."""
        fire = self.draw_fire(batch, generator) if fire is None else fire
        a_BN = fire * (0.5 + torch.rand(fire.shape, generator=generator))
        x = self.signal(a_BN) + self.noise * torch.randn(len(a_BN), self.d, generator=generator)
        return (x, a_BN) if codes else x


def make_composition_data(d: int = 64, n_atoms: int = 128, n_pairs: int = 8, n_cooc: int = 8, n_triples: int = 2,
                          density: float = 0.02, rate: float = 0.02, strength: float = 1.0, strength3: float = 1.0,
                          rank: int | None = None, noise: float = 0.01, seed: int = 0) -> CompositionData:
    """Atoms 0..2P−1 form the interacting pairs (2p, 2p+1), the next 2Q the co-occurring pairs, the next 3T the
    triples; the rest are independent atoms."""
    r = d if rank is None else rank
    used = 2 * n_pairs + 2 * n_cooc + 3 * n_triples
    if used > n_atoms:
        raise ValueError(f"n_atoms must hold the {used} atoms of the pairs and triples, got {n_atoms}")
    if not 4 <= r <= d:
        raise ValueError(f"rank must lie in [4, d={d}] (E must avoid its own atoms' directions), got {r}")
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    B_DR = torch.linalg.qr(torch.randn(d, r, generator=g)).Q                  # span(B): where every E lives

    def interaction_dir(members: Tensor) -> Tensor:
        own_MR = atoms[members] @ B_DR                                         # its atoms, seen in span(B)
        Q_RM = torch.linalg.qr(own_MR.T).Q
        v = torch.randn(r, generator=g)
        v = v - Q_RM @ (Q_RM.T @ v)
        e = B_DR @ v
        return e / e.norm()

    ar = torch.arange(n_atoms)
    pairs = ar[:2 * n_pairs].view(n_pairs, 2)
    cooc = ar[2 * n_pairs:2 * n_pairs + 2 * n_cooc].view(n_cooc, 2)
    triples = ar[2 * n_pairs + 2 * n_cooc:used].view(n_triples, 3)
    pair_dirs = torch.stack([interaction_dir(p) for p in pairs]) if n_pairs else torch.zeros(0, d)
    triple_dirs = torch.stack([interaction_dir(t) for t in triples]) if n_triples else torch.zeros(0, d)
    return CompositionData(atoms, pairs, pair_dirs, triples, triple_dirs, cooc, density, rate, strength, strength3,
                           noise, r, seed)


def compound_targets(data: CompositionData) -> dict[str, Tensor]:
    """Unit directions a latent can match, by role: the atoms, the interaction directions E, and the compound
    directions at the mean code a = 1 (D_i + D_j + s E_ij; D_i + D_j for a co-occurring pair)."""
    unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
    D = data.atoms_ND
    out = {"atom": D,
           "pair E": data.pair_dirs_PD,
           "triple E": data.triple_dirs_TD,
           "pair compound": unit(D[data.pairs_P2].sum(1) + data.strength * data.pair_dirs_PD),
           "triple compound": unit(D[data.triples_T3].sum(1) + data.strength3 * data.triple_dirs_TD),
           "cooc compound": unit(D[data.cooc_Q2].sum(1))}
    return {k: v for k, v in out.items() if len(v)}


def latent_roles(decoder_FD: Tensor, data: CompositionData, threshold: float = 0.9) -> dict:
    """What each latent's decoder row (F, d) matches: the role of its best cosine over compound_targets, or
    "none" below `threshold`. Returns {"counts": {role: latents}, "role_F": [role per latent],
    "best_F": (F,) cosines, "atom_recovery": fraction of atoms some latent matches above threshold}."""
    dec = decoder_FD.detach().float().cpu()
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    names, cos = [], []
    for name, T in compound_targets(data).items():
        c = dec @ T.T                                                          # (F, n_targets)
        names.append(name)
        cos.append(c.max(-1).values)
    cos_RF = torch.stack(cos)
    best_F, which_F = cos_RF.max(0)
    role_F = [names[w] if b > threshold else "none" for w, b in zip(which_F.tolist(), best_F.tolist())]
    counts = {n: role_F.count(n) for n in names + ["none"]}
    atom_best = (dec @ data.atoms_ND.T).max(0).values
    return {"counts": counts, "role_F": role_F, "best_F": best_F,
            "atom_recovery": (atom_best > threshold).float().mean().item()}


def match_atoms(decoder_FD: Tensor, data: CompositionData) -> tuple[Tensor, Tensor]:
    """(N,) the latent whose decoder row has the largest cosine with each atom, and that cosine."""
    dec = decoder_FD.detach().float().cpu()
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    best = (data.atoms_ND @ dec.T).max(-1)
    return best.indices, best.values


def pair_scores(score_FF: Tensor, data: CompositionData, latent_N: Tensor, ok_N: Tensor) -> dict[str, Tensor]:
    """score[m(i), m(j)] for the interacting pairs ("pair"), the co-occurring pairs ("cooc") and every other
    pair of distinct independent atoms ("other"), with m = latent_N the latent matched to each atom; a pair
    counts only when both atoms are matched (ok_N) to two different latents."""
    N = data.n_atoms
    grouped = torch.zeros(N, dtype=torch.bool)
    for grp in data.groups():
        grouped[grp] = True
    free = (~grouped).nonzero()[:, 0]
    others = torch.combinations(free, 2) if len(free) > 1 else torch.zeros(0, 2, dtype=torch.long)

    def read(pairs_K2: Tensor) -> Tensor:
        if not len(pairs_K2):
            return torch.zeros(0)
        i, j = pairs_K2[:, 0], pairs_K2[:, 1]
        keep = ok_N[i] & ok_N[j] & (latent_N[i] != latent_N[j])
        return score_FF[latent_N[i[keep]], latent_N[j[keep]]].detach().float().cpu()

    return {"pair": read(data.pairs_P2), "cooc": read(data.cooc_Q2), "other": read(others)}


def probe_set(data: CompositionData, pair: Tensor, task: str, n: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x (n, d), y (n,)) labelled by a pair (i, j) of atoms, every other atom drawn as in `sample`, n % 4 == 0.
      "compound": y = both present; negatives have exactly one of them (half i alone, half j alone).
      "part":     y = i present; each label half with j present, half without.
    A dictionary that writes the compound with one latent probes "compound" with that latent alone, and
    loses "part" wherever the compound latent fires in place of i's own latent (absorption)."""
    if task not in ("compound", "part") or n % 4:
        raise ValueError(f"probe_set: task must be compound or part and n a multiple of 4, got {task!r}, {n}")
    i, j = int(pair[0]), int(pair[1])
    fire = data.draw_fire(n, generator)
    q = n // 4
    on_i = [1, 1, 1, 0] if task == "compound" else [1, 1, 0, 0]
    on_j = [1, 1, 0, 1] if task == "compound" else [1, 0, 1, 0]
    for b in range(4):
        fire[b * q:(b + 1) * q, i] = bool(on_i[b])
        fire[b * q:(b + 1) * q, j] = bool(on_j[b])
    y = torch.tensor([1.0] * (2 * q) + [0.0] * (2 * q))
    return data.sample(n, generator, fire=fire), y


# ----------------------------------------------------------------------------------------
# Layered ground truth: features that span layers (the functional-coherence experiments)
# ----------------------------------------------------------------------------------------
#
# Each atom n has an onset layer s_n and a span m_n (it is present in layers s_n, ..., s_n + m_n − 1) and
# writes A[n, l] = g[n, l] u[n, l] there (g a gain, u a unit direction; A[n, l] = 0 outside the span).
# Every token draws independent codes a_n = Bernoulli(density) · Uniform(0.5, 1.5) and
#
#     x[b, l] = μ_l + Σ_n a[b, n] A[n, l] + σ ε,        x: (B, L, d), ε ~ N(0, I)
#
# (μ_l a constant offset, the residual stream's mean; 0 unless asked for). The generators differ in how
# u and g move along the span; each mixes multi-layer atoms (span ≥ 2) with layer-local ones (span 1):
#   (a) independent_layers  u[n, l] independent random directions, g = 1 (make_toy_data, with spans)
#   (b) persistent          a residual-stream feature: written at s_n, present in every later layer,
#                           m_n = L − s_n; u[n, l+1] = unit(u[n, l] + drift · v), v a random unit vector
#                           (drift 0: the same direction at every layer), g = 1
#   (c) write_erase         written at s_n, erased after s_n + m_n − 1; one direction (optional drift),
#                           a gain walk log g[n, l+1] = log g[n, l] + gain_walk · N(0, 1), mean g over the span 1
#   (d) collinear           (b) with a share `carried` of the multi-layer atoms written before the first
#                           layer read (onset 0, span L), a slow drift and gains growing with depth, so that
#                           adjacent layers are nearly the same vector (centred cosine ≈ 0.9, as SmolLM2's
#                           blocks 11-18), and an offset μ (SmolLM2's residual mean is large)
# Ground truth per atom: onset, span, the norm profile g[n, :] (its "true" FC = spread = Σ_l g / max_l g),
# and the directions. `Oracle` is the best linear readout of every code; `match` pairs atoms with latents.


@dataclass
class LayeredFeatures:
    """Planted features with onsets and spans (see the section comment above)."""
    atoms_NLD: Tensor     # (N, L, d) A[n, l] = g[n, l] u[n, l], zero outside the span
    onset_N: Tensor       # (N,) long, first layer
    span_N: Tensor        # (N,) long, number of layers (1: layer-local)
    offset_LD: Tensor     # (L, d) μ, added to every token
    density: float
    noise: float
    kind: str
    seed: int

    @property
    def n_layers(self) -> int:
        return self.atoms_NLD.shape[1]

    def norm_profile(self) -> Tensor:
        """(N, L) ‖A[n, l]‖ = g[n, l], the true per-layer norms."""
        return self.atoms_NLD.norm(dim=-1)

    def true_spread(self) -> Tensor:
        """(N,) Σ_l g / max_l g: the FC and the decoder-norm spread a latent reading the atom where it is would have."""
        g = self.norm_profile().double()
        return g.sum(-1) / g.max(-1).values

    def code_moments(self) -> tuple[float, float]:
        """(E a, Var a) of one atom's code: a = Bernoulli(p) · U(0.5, 1.5), E a = p, E a² = p (1 + 1/12)."""
        p = self.density
        return p, p * (1 + 1 / 12) - p * p

    def sample_codes(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x (B, L, d), codes a (B, N))."""
        N, L, d = self.atoms_NLD.shape
        fire = torch.rand(batch, N, generator=generator) < self.density
        a_BN = fire * (0.5 + torch.rand(batch, N, generator=generator))
        x = core.sparse_decode(a_BN, self.atoms_NLD.reshape(N, L * d)).view(batch, L, d)
        return x + self.offset_LD + self.noise * torch.randn(batch, L, d, generator=generator), a_BN

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, L, d) activations."""
        return self.sample_codes(batch, generator)[0]

    def mean(self) -> Tensor:
        """(L, d) E x = μ + E a Σ_n A[n]."""
        return self.offset_LD + self.code_moments()[0] * self.atoms_NLD.sum(0)

    def covariance(self) -> Tensor:
        """(L·d, L·d) Cov(x) = Var a · Σ_n A_n A_nᵀ + σ² I, A_n atom n's layers concatenated (float64)."""
        N, L, d = self.atoms_NLD.shape
        A = self.atoms_NLD.reshape(N, L * d).double()
        return self.code_moments()[1] * A.T @ A + self.noise ** 2 * torch.eye(L * d, dtype=torch.float64)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _layered(kind: str, g: torch.Generator, d: int, onset_N: Tensor, span_N: Tensor, L: int, drift: float | None,
             gain_NL: Tensor | None = None, offset: float = 0.0, density: float = 0.02, noise: float = 0.01,
             seed: int = 0) -> LayeredFeatures:
    """Atoms from onsets and spans: u at the onset random, then per later layer independent (drift None) or
    unit(u + drift · v); A = gain · u inside the span. `offset` sets ‖μ_l‖ / sqrt(E‖x_l − E x_l‖²) for every
    layer (μ_l random directions)."""
    N = len(onset_N)
    u = _unit(torch.randn(N, d, generator=g))
    dirs = [u]
    for _ in range(1, L):
        v = _unit(torch.randn(N, d, generator=g))
        dirs.append(v if drift is None else _unit(dirs[-1] + drift * v))
    u_NLD = torch.stack(dirs, 1)
    layer_L = torch.arange(L)
    inside_NL = (layer_L >= onset_N[:, None]) & (layer_L < (onset_N + span_N)[:, None])
    gain_NL = torch.ones(N, L) if gain_NL is None else gain_NL
    atoms = u_NLD * (gain_NL * inside_NL)[..., None]
    data = LayeredFeatures(atoms, onset_N.long(), span_N.long(), torch.zeros(L, d), density, noise, kind, seed)
    if offset:
        var_a = data.code_moments()[1]
        dev_L = (var_a * atoms.pow(2).sum((0, 2)) + noise ** 2 * d).sqrt()      # sqrt(E‖x_l − E x_l‖²)
        data.offset_LD = _unit(torch.randn(L, d, generator=g)) * offset * dev_L[:, None]
    return data


def _local_and_multi(g: torch.Generator, n_atoms: int, L: int, local: float) -> tuple[int, Tensor]:
    """(number of multi-layer atoms, the local atoms' layers): round(local · N) atoms of span 1, each at a
    uniformly random layer."""
    n_local = int(round(local * n_atoms))
    return n_atoms - n_local, torch.randint(L, (n_local,), generator=g)


def _spans_anywhere(g: torch.Generator, n: int, L: int) -> tuple[Tensor, Tensor]:
    """(onset, span) of n multi-layer atoms: span uniform in 2..L, onset uniform among those that fit."""
    span = torch.randint(2, L + 1, (n,), generator=g)
    onset = (torch.rand(n, generator=g) * (L - span + 1)).long()
    return onset, span


def independent_layers(d: int = 32, n_layers: int = 8, n_atoms: int = 256, local: float = 1 / 3,
                       density: float = 0.02, noise: float = 0.01, seed: int = 0) -> LayeredFeatures:
    """(a) An independent random unit direction at every layer of the span (gain 1)."""
    g = torch.Generator().manual_seed(seed)
    n_multi, local_L = _local_and_multi(g, n_atoms, n_layers, local)
    onset, span = _spans_anywhere(g, n_multi, n_layers)
    onset, span = torch.cat([onset, local_L]), torch.cat([span, torch.ones_like(local_L)])
    return _layered("independent", g, d, onset, span, n_layers, None, density=density, noise=noise, seed=seed)


def persistent(d: int = 32, n_layers: int = 8, n_atoms: int = 256, local: float = 1 / 3, drift: float = 0.0,
               density: float = 0.02, noise: float = 0.01, seed: int = 0) -> LayeredFeatures:
    """(b) Residual-stream features: written at a uniformly random onset s ∈ 0..L−2 and present at every
    later layer (span L − s), the direction drifting by `drift` per layer (gain 1)."""
    g = torch.Generator().manual_seed(seed)
    n_multi, local_L = _local_and_multi(g, n_atoms, n_layers, local)
    onset = torch.randint(n_layers - 1, (n_multi,), generator=g)
    onset, span = torch.cat([onset, local_L]), torch.cat([n_layers - onset, torch.ones_like(local_L)])
    return _layered("persistent", g, d, onset, span, n_layers, drift, density=density, noise=noise, seed=seed)


def write_erase(d: int = 32, n_layers: int = 8, n_atoms: int = 256, local: float = 1 / 3, gain_walk: float = 0.3,
                drift: float = 0.0, density: float = 0.02, noise: float = 0.01, seed: int = 0) -> LayeredFeatures:
    """(c) Written at the onset and erased after the span (span uniform in 2..L), with a per-layer gain walk
    log g[l+1] = log g[l] + gain_walk · N(0, 1), scaled so the mean gain over the span is 1."""
    g = torch.Generator().manual_seed(seed)
    n_multi, local_L = _local_and_multi(g, n_atoms, n_layers, local)
    onset, span = _spans_anywhere(g, n_multi, n_layers)
    onset, span = torch.cat([onset, local_L]), torch.cat([span, torch.ones_like(local_L)])
    log_g = torch.cat([torch.zeros(n_atoms, 1), gain_walk * torch.randn(n_atoms, n_layers - 1, generator=g)], 1)
    gain = log_g.cumsum(1).exp()
    inside = (torch.arange(n_layers) >= onset[:, None]) & (torch.arange(n_layers) < (onset + span)[:, None])
    gain = gain / ((gain * inside).sum(1, keepdim=True) / span[:, None])
    return _layered("write_erase", g, d, onset, span, n_layers, drift, gain, density=density, noise=noise, seed=seed)


def collinear(d: int = 32, n_layers: int = 8, n_atoms: int = 256, local: float = 1 / 3, carried: float = 0.9,
              drift: float = 0.1, growth: float = 1.05, offset: float = 1.0, density: float = 0.02, noise: float = 0.01,
              seed: int = 0) -> LayeredFeatures:
    """(d) Near-collinear adjacent layers: persistent features (b) of which a share `carried` was written
    before the first layer read (onset 0, span L), the rest at a random onset in 1..L−2; directions drift by
    `drift` per layer; every gain grows by `growth` per layer (the residual norm grows with depth); the
    local atoms' gain is the mean gain of their layer. `offset`: ‖μ_l‖ over the RMS deviation of x_l.
    `adjacent_cosine` measures what these give (the defaults, d 48, 384 atoms: 0.89-0.93; SmolLM2-135M's
    blocks 11-18 measure 0.93-0.95, and ‖μ_l‖ / RMS deviation 0.96-1.11)."""
    g = torch.Generator().manual_seed(seed)
    n_multi, local_L = _local_and_multi(g, n_atoms, n_layers, local)
    late = torch.rand(n_multi, generator=g) >= carried
    onset = torch.where(late, 1 + torch.randint(max(n_layers - 2, 1), (n_multi,), generator=g), 0)
    onset, span = torch.cat([onset, local_L]), torch.cat([n_layers - onset, torch.ones_like(local_L)])
    gain = (growth ** torch.arange(n_layers, dtype=torch.float32)).expand(n_atoms, n_layers).clone()
    return _layered("collinear", g, d, onset, span, n_layers, drift, gain, offset, density, noise, seed)


GENERATORS = {"a": independent_layers, "b": persistent, "c": write_erase, "d": collinear}


def adjacent_cosine(x_BLD: Tensor) -> Tensor:
    """(L − 1,) mean over tokens of cos(x_l − x̄_l, x_{l+1} − x̄_{l+1}), x̄ the mean over the batch."""
    c = x_BLD - x_BLD.mean(0)
    return torch.nn.functional.cosine_similarity(c[:, :-1], c[:, 1:], dim=-1).mean(0)


@dataclass
class OracleConfig:
    """What metrics.functional_coherence reads of a dictionary's config."""
    d_in: int
    n_layers: int
    n_latents: int
    sparsity: str = "jumprelu"
    k: int = 1


class Oracle(torch.nn.Module):
    """The best linear readout of every atom's code, from the generator's exact moments (the LMMSE estimator,
    the population limit of ridge regression of a_n on the concatenated centred layers):

        â_n = w_n · (x − E x) + E a,     w_n = Cov(x)⁻¹ Cov(x, a_n) = Var a · Cov(x)⁻¹ A_n      (L·d,)

    A_n atom n's layers concatenated. As a dictionary it reads pre = â (B, N) and "fires" where â > 0.25
    (a per-latent JumpReLU threshold: active codes are ≥ 0.5), so metrics.functional_coherence scores it
    exactly as it scores a crosscoder (layer l zeroed: the input is x_l = 0; ablated to its mean: x_l = E x_l).
    W_enc (L, d, N) is laid out as crosscoder.CrossCoder's; decoder_norms are the true norm profile."""

    def __init__(self, data: LayeredFeatures, threshold: float = 0.25):
        super().__init__()
        N, L, d = data.atoms_NLD.shape
        self.config = OracleConfig(d, L, N)
        mean_a, var_a = data.code_moments()
        A = data.atoms_NLD.reshape(N, L * d).double()
        W = torch.linalg.solve(data.covariance(), var_a * A.T)                  # (L·d, N)
        self.register_buffer("W_enc", W.float().view(L, d, N))
        self.register_buffer("b_dec", data.mean().float())                       # (L, d) the centring
        self.register_buffer("b_enc", torch.full((N,), float(mean_a)))
        self.register_buffer("threshold", torch.full((N,), float(threshold)))
        self.register_buffer("norms_NL", data.norm_profile())
        self.eval()

    def pre_acts(self, x_BLD: Tensor) -> Tensor:
        return torch.einsum("bld,ldn->bn", x_BLD - self.b_dec, self.W_enc) + self.b_enc

    def decoder_scale(self) -> None:
        return None

    def decoder_norms(self) -> Tensor:
        return self.norms_NL


def match(decoder_FLD: Tensor, data) -> tuple[Tensor, Tensor]:
    """For each atom (N,), the best cosine between its concatenated layers and any latent's concatenated
    decoder vectors, and that latent (`recovery` counts the atoms above a threshold)."""
    atoms = _unit(data.atoms_NLD.flatten(1).float())
    dec = decoder_FLD.detach().float().cpu().flatten(1)
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    best = (atoms @ dec.T).max(dim=-1)
    return best.values, best.indices

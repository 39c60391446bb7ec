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

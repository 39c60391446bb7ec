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

"""The TopK / BatchTopK sparse autoencoder: the per-layer baseline of both papers.

An SAE writes an activation x ∈ R^d as a sparse, non-negative combination of F learned directions
(Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093: its ReLU and TopK
autoencoders):

    pre = (x − b_dec) W_enc + b_enc        x: (B, d)   W_enc: (d, F)   pre: (B, F)
    z   = S(pre)                           S: TopK, BatchTopK or ReLU + L1 (core.sparsify)
    x̂   = z W_dec + b_dec                  W_dec: (F, d)   x̂: (B, d)

The loss is core.py's (MSE summed over d + AuxK). Decoder norms (`decoder_norm`):
  "unit" (default, as Gao et al.): rows of W_dec kept at norm 1: before each optimiser step the
         gradient component parallel to each row is removed, after it the rows are renormalised;
  "free" (SAELens; the official PolySAE code's SAE baseline, github.com/pakoromilas/PolySAE): rows trained freely
         from norm `decoder_init_norm` (0.1 there).
Init: W_enc = W_decᵀ (tied), b_dec from data (geometric median, mean, or zero). Inputs are normalised
per layer (E‖x‖² = d, activations.py); config.input_scale records the factor and `fold_input_scale`
folds it in, so the model reads raw activations.

Defaults. SAE(SAEConfig(d_in=d)) is a BatchTopK SAE (core.DictConfig: sparsity "batchtopk", F 2048, k 32,
AuxK with aux_k d/2 at 1/32, dead after 100,000 tokens) with unit-norm decoder rows: the sparsity train.py
trains by default. Gao et al.'s per-token TopK is sparsity="topk" (the demo and bench/bench_vs_saelens.py set
it). tests/test_defaults.py pins these values: train.py's runs depend on them.

Copy this file with core.py and `python sae.py` trains it on toy data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

import core
from core import DictConfig, opt


@dataclass
class SAEConfig(DictConfig):
    decoder_norm: str = opt("unit", "unit: decoder rows kept at norm 1 | free: trained freely (SAELens)")
    decoder_init_norm: float = opt(1.0, "decoder row norm at init, with --decoder-norm free (SAELens: 0.1)")

    def check(self, name=str) -> None:
        DictConfig.check(self, name)
        if self.decoder_norm not in ("unit", "free"):
            raise ValueError(f"{name('decoder_norm')} must be one of unit, free, got {self.decoder_norm!r}")
        if not (isinstance(self.decoder_init_norm, (int, float)) and 0 < self.decoder_init_norm < float("inf")):
            raise ValueError(f"{name('decoder_init_norm')} must be a finite number > 0, got {self.decoder_init_norm!r}")
        if self.decoder_norm == "unit" and self.decoder_init_norm != 1.0:
            raise ValueError(f"{name('decoder_init_norm')} {self.decoder_init_norm} needs {name('decoder_norm')} free "
                             f"(unit-norm rows are renormalised to 1 after every step)")


class SAE(nn.Module):
    """W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,); a core.Dictionary."""

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        d, n = config.d_in, config.n_latents
        W_dec = torch.randn(n, d)
        W_dec *= config.decoder_init_norm / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                     # (F, d), rows of norm decoder_init_norm
        self.W_enc = nn.Parameter(W_dec.T.clone())           # (d, F), tied: W_enc = W_decᵀ
        self.b_enc = nn.Parameter(torch.zeros(n))            # (F,)
        self.b_dec = nn.Parameter(torch.zeros(d))            # (d,)
        core.init_state(self, n)                             # dead counter, BatchTopK threshold

    def encoder_linear(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b) with pre = h Wᵀ + b: h = x − b_dec (B, d), W = W_encᵀ (F, d), b = b_enc."""
        return x_BD - self.b_dec, self.W_enc.T, self.b_enc

    def decoder_scale(self) -> None:
        """Select by pre itself (unit rows: activation × decoder norm; free rows: SAELens's TopK
        without rescale_acts_by_decoder_norm)."""
        return None

    def decode_nobias(self, z_BF) -> Tensor:
        return core.sparse_decode(z_BF, self.W_dec)

    def decoder_vectors(self) -> Tensor:
        return self.W_dec                                    # (F, d)

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=-1)                       # (F,)

    # -- what every dictionary computes the same way (core.py)
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return core.pre_acts(self, x_BD)

    def encode(self, x_BD: Tensor) -> Tensor:
        return core.encode(self, x_BD)

    def decode(self, z_BF) -> Tensor:
        return self.decode_nobias(z_BF) + self.b_dec

    def forward(self, x_BD: Tensor, target: Tensor | None = None) -> core.Output:
        """x (B, d); the reconstruction is scored against `target` (default x)."""
        core.check_input(self, x_BD)
        return core.forward_with_losses(self, x_BD, x_BD if target is None else target)

    # -- upkeep around the optimiser step
    def init_b_dec(self, x_BD: Tensor, method: str = "median") -> None:
        core.set_b_dec(self.b_dec, x_BD, method)

    @torch.no_grad()
    def before_step(self) -> None:
        """Unit rows: g −= (⟨g, W⟩ / ‖W‖²) W per row, so Adam does not spend steps growing the norm."""
        if self.W_dec.grad is not None and self.config.decoder_norm == "unit":
            W, g = self.W_dec, self.W_dec.grad
            g.addcmul_(((g * W).sum(-1) / W.norm(dim=-1).square()).neg_()[:, None], W)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.config.decoder_norm == "unit":
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """With x = s·x_raw: pre = (x_raw − b_dec/s)(s W_enc) + b_enc and x̂_raw = z (W_dec/s) + b_dec/s
        (the rows then have norm 1/s)."""
        (s,) = self.config.input_scale
        self.W_enc *= s
        self.W_dec /= s
        self.b_dec /= s
        self.config.input_scale = [1.0]


if __name__ == "__main__":
    core.demo(SAE(SAEConfig(d_in=32, n_latents=512, k=8, sparsity="topk", dead_tokens=50_000)))

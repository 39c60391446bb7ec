"""Acausal crosscoder over L layers, with optional stochastic layer masking.

One dictionary reads the residual stream at L layers at once and writes all of them
(Lindsey et al. 2024, transformer-circuits.pub/2024/crosscoders; the fmxcoders paper,
Demou et al. 2026, arXiv 2605.09438, uses it as its baseline):

    pre   = Σ_l (x_l − b_dec[l]) W_enc[l] + b_enc          pre: (B, F)    W_enc: (L, d, F)
    z     = S(pre)                                          z:   (B, F)
    x̂_l  = z W_dec[:, l] + b_dec[l]                        x̂:  (B, L, d)  W_dec: (F, L, d)

The encoder *sums* over layers, the decoder has one vector per latent and layer. The encoder
is one product of the L layers side by side, pre = [x_1 − b_dec[1], …, x_L − b_dec[L]] W + b_enc
with W = W_enc viewed as (L·d, F) (`encoder_linear`): its backward reads only the selected
latents (sae.SparseEncoderGrad), so the L per-layer weight gradients are sparse the same way.
S is a sparsifier from sae.py (TopK, BatchTopK, or ReLU + L1). Latents are selected by
their score  z_f · Σ_l ‖W_dec[f, l]‖  (activation times the sum over layers of the decoder
norms, Minder et al. 2025 / the crosscoder L1 weighting) but the unscaled z_f is decoded.

Loss (per batch of B tokens):

    mse  = mean_b Σ_l Σ_d (x_l − x̂_l)²       sum over layers and d, mean over tokens
    l1   = mean_b Σ_f z_f Σ_l ‖W_dec[f, l]‖    (in the loss only for sparsity="relu")
    loss = mse + aux_coeff · auxk + l1_coeff · l1

AuxK, the dead-latent counter and the BatchTopK inference threshold work exactly as in
sae.SAE. With L = 1 the crosscoder *is* that SAE (tests/test_crosscoder.py checks it).

Stochastic layer masking (the fmxcoders paper, arXiv 2605.09438, p. 5): in training, every token's input
at every layer is zeroed independently with probability `mask_prob`, and the loss still
reconstructs the *clean* activations of all L layers: a denoising autoencoder along the
layer axis. No 1/(1−p) rescaling; off in eval mode; an all-masked token is not resampled.
With mask_prob = 0 (the default here) this is the plain crosscoder; mask_prob = 0.05 is
the "crosscoder + masking" ablation.

Decoder norms are not constrained (the fmxcoders paper uses no decoder-norm
normalisation), so `before_step` is a no-op; `after_step` only refreshes the cached score
scale when `norm_every` > 1 (the fmxcoder's default, see decoder_scale). Init: per-layer decoder
vectors random with norm 1/√L (concatenated norm 1 per latent), W_enc = W_dec transposed,
b_dec from data (`init_b_dec`, per-layer geometric median or mean).

fmxcoder.FMXCoder subclasses CrossCoder and only replaces the weight tensors by
low-rank factors: everything else here (losses, masking, upkeep) is shared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sae import (HostMirror, Output, check_common, forward_with_losses, geometric_median, read_int, read_max,
                 sparse_decode, sparsify)


@dataclass
class CrossCoderConfig:
    d_in: int                     # model dimension d
    n_latents: int                # dictionary size F
    k: int = 32                   # active latents per token (TopK / BatchTopK)
    sparsity: str = "topk"        # "topk" | "batchtopk" | "relu" (ReLU + L1)
    n_layers: int = 2             # number of layers L read and written
    mask_prob: float = 0.0        # stochastic layer masking probability p (training only)
    l1_coeff: float = 0.0         # only used by sparsity="relu"
    aux_k: int | None = None      # AuxK's k (Gao et al.'s k_aux); None → d_in // 2
    aux_coeff: float = 1 / 32     # AuxK weight; 0 disables it
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    input_scale: list[float] | None = None  # L floats, x_model[l] = x_raw[l] · s_l; None → ones
    norm_every: int = 1           # training: refresh the selection score's decoder norms every n steps

    def __post_init__(self):
        check_common(self)
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"n_layers must be a positive integer, got {self.n_layers!r}")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {self.mask_prob!r}")
        if not isinstance(self.norm_every, int) or self.norm_every < 1:
            raise ValueError(f"norm_every must be a positive integer, got {self.norm_every!r}")
        if self.input_scale is None:
            self.input_scale = [1.0] * self.n_layers
        self.input_scale = [float(s) for s in self.input_scale]
        if len(self.input_scale) != self.n_layers:
            raise ValueError(f"input_scale must hold n_layers={self.n_layers} floats, "
                             f"got {len(self.input_scale)}")


def mask_layers(x_BLD: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero each (token, layer) input independently with probability p (no rescaling)."""
    if p == 0:
        return x_BLD
    B, L, _ = x_BLD.shape
    keep_BL1 = torch.rand(B, L, 1, device=x_BLD.device, generator=generator) >= p
    return x_BLD * keep_BL1


class CrossCoder(nn.Module):
    """The dense crosscoder: W_enc (L, d, F), b_enc (F,), W_dec (F, L, d), b_dec (L, d). A `sae.Dictionary`."""
    config_class = CrossCoderConfig

    def __init__(self, config: CrossCoderConfig):
        super().__init__()
        self.config = config
        L, d, n = config.n_layers, config.d_in, config.n_latents
        self.init_weights()
        self.b_enc = nn.Parameter(torch.zeros(n))                    # (F,)
        self.b_dec = nn.Parameter(torch.zeros(L, d))                 # (L, d)
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.dead_bound = HostMirror(read_max, self.tokens_since_fired, 0)  # ≥ max(tokens_since_fired)
        self.register_buffer("threshold", torch.tensor(-1.0))        # BatchTopK inference θ
        # Per-layer factor on the decoder norms in the selection score: 1, or s_l after
        # fold_input_scale, so that folding does not change which latents are selected.
        self.register_buffer("norm_scale", torch.ones(L))            # (L,)
        # With norm_every = n > 1, training selects with the score scale of the last refresh
        # (after optimiser steps 1, n + 1, ...; exact before the first step): saved, so a
        # resumed run selects the same.
        self.register_buffer("steps_done", torch.tensor(0))
        self.steps_host = HostMirror(read_int, self.steps_done, 0)   # steps_done, read on the host
        self.register_buffer("score_scale", self.exact_decoder_scale().detach())  # (F,)

    # -- the weight-specific part (fmxcoder.FMXCoder overrides these) --------------------
    def init_weights(self) -> None:
        c = self.config
        W_dec = torch.randn(c.n_latents, c.n_layers, c.d_in)
        W_dec /= W_dec.norm(dim=-1, keepdim=True) * c.n_layers ** 0.5   # ‖W_dec[f, l]‖ = 1/√L
        self.W_dec = nn.Parameter(W_dec)                              # (F, L, d)
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).clone())     # (L, d, F), stored as (F, L, d)

    def encoder_linear(self, x_BLD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b) with pre = h Wᵀ + b = Σ_l (x_l − b_dec[l]) W_enc[l] + b_enc: h (B, L·d) the
        layers side by side, W (F, L·d) (a view of W_enc), b = b_enc (F,)."""
        B, L, d = x_BLD.shape
        return (x_BLD - self.b_dec).reshape(B, L * d), self.W_enc.reshape(L * d, -1).T, self.b_enc

    def pre_acts(self, x_BLD: Tensor) -> Tensor:
        """(B, F) dense pre-activations, before ReLU and the sparsifier."""
        return F.linear(*self.encoder_linear(x_BLD))

    def decode_nobias(self, z_BF: Tensor) -> Tensor:
        F_, L, d = self.W_dec.shape
        return sparse_decode(z_BF, self.W_dec.view(F_, L * d)).view(-1, L, d)  # = einsum("bf,fld->bld")

    def decoder_vectors(self) -> Tensor:
        """(F, L, d) each latent's decoder vector at each layer."""
        return self.W_dec

    def decoder_norms(self) -> Tensor:
        """(F, L) ‖W_dec[f, l]‖."""
        return self.W_dec.norm(dim=-1)

    def full_weights(self) -> tuple[Tensor, Tensor]:
        """(W_enc (L, d, F), W_dec (F, L, d)) as dense tensors (for analysis)."""
        return self.W_enc, self.W_dec

    @torch.no_grad()
    def scale_layers_(self, enc_L: Tensor, dec_L: Tensor) -> None:
        """In place: W_enc[l] *= enc_L[l], W_dec[:, l] *= dec_L[l]."""
        self.W_enc *= enc_L[:, None, None]
        self.W_dec *= dec_L[None, :, None]

    # -- the maps --------------------------------------------------------------------------
    def exact_decoder_scale(self) -> Tensor:
        """(F,) Σ_l ‖W_dec[f, l]‖ · norm_scale[l], computed from the weights now."""
        return (self.decoder_norms() * self.norm_scale).sum(-1)

    def decoder_scale(self) -> Tensor:
        """(F,) per-latent score scale for the sparsifier. Exact, except in training with
        config.norm_every > 1 (not for ReLU + L1, whose penalty needs its gradient): then the
        value of the last refresh. The exact norms of a factorised decoder cost
        F·L·d·R (CP) or F·L·d·R1R2 (TR) MACs per step whatever the batch size: more than the
        forward pass at small batches (bench/bench_train.py); stale by < n steps, they pick
        the same latents up to near-ties."""
        c = self.config
        if self.training and c.norm_every > 1 and c.sparsity != "relu" and self.steps_host.get(self.steps_done) > 0:
            return self.score_scale
        return self.exact_decoder_scale()

    def encode(self, x_BLD: Tensor) -> Tensor:
        c = self.config
        with torch.no_grad():
            scale_F = self.decoder_scale()
        return sparsify(self.pre_acts(x_BLD), c.sparsity, c.k, self.training, self.threshold, scale_F)

    def decode(self, z_BF: Tensor) -> Tensor:
        return self.decode_nobias(z_BF) + self.b_dec

    # -- forward with the losses -----------------------------------------------------------
    def forward(self, x_BLD: Tensor, target: Tensor | None = None) -> Output:
        """x: (B, L, d). In training the encoder sees x with layers masked (mask_prob);
        the reconstruction is always scored against the clean `target` (default x)."""
        self._check_input(x_BLD)
        x_in = mask_layers(x_BLD, self.config.mask_prob) if self.training else x_BLD
        return forward_with_losses(self, x_in, x_BLD if target is None else target)

    def loss(self, x_BLD: Tensor) -> Tensor:
        return self(x_BLD).loss

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        if x.ndim != 3 or tuple(x.shape[1:]) != (c.n_layers, c.d_in):
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {c.n_layers}, {c.d_in}), "
                             f"got {tuple(x.shape)}")

    # -- upkeep ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_b_dec(self, x_BLD: Tensor, method: str = "median") -> None:
        """Set b_dec[l] from a data sample (B, L, d): "median" (geometric, per layer),
        "mean", or "zero" (keeps 0)."""
        self._check_input(x_BLD)
        if method == "median":
            self.b_dec.copy_(torch.stack([geometric_median(x_BLD[:, l].float())
                                          for l in range(x_BLD.shape[1])]))
        elif method == "mean":
            self.b_dec.copy_(x_BLD.float().mean(0))
        elif method != "zero":
            raise ValueError(f"b_dec init must be 'median', 'mean' or 'zero', got {method!r}")

    def before_step(self) -> None:
        """No decoder-norm constraint (fmxcoders uses none): nothing to do."""

    @torch.no_grad()
    def after_step(self) -> None:
        """No decoder-norm constraint; every norm_every steps, refresh the selection scale.
        The step count is mirrored on the host (steps_host), so that this is no host–device sync."""
        steps = self.steps_host.get(self.steps_done) + 1
        self.steps_done += 1
        self.steps_host.set(self.steps_done, steps)
        if self.config.norm_every > 1 and (steps - 1) % self.config.norm_every == 0:
            self.score_scale.copy_(self.exact_decoder_scale())   # after steps 1, n + 1, 2n + 1, ...

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Make the model take raw activations. With x_l = s_l · x_raw_l:
        pre = Σ_l (x_raw_l − b_dec[l]/s_l)(s_l W_enc[l]) + b_enc,
        x̂_raw_l = z (W_dec[:, l]/s_l) + b_dec[l]/s_l.
        The selection score keeps using model-unit decoder norms (norm_scale *= s), so the
        same latents fire; outputs are the old ones divided by s_l."""
        s_L = torch.tensor(self.config.input_scale, dtype=self.b_dec.dtype, device=self.b_dec.device)
        self.scale_layers_(s_L, 1.0 / s_L)
        self.b_dec /= s_L[:, None]
        self.norm_scale *= s_L
        self.config.input_scale = [1.0] * self.config.n_layers
        self.score_scale.copy_(self.exact_decoder_scale())

    def dead_fraction(self) -> float:
        return (self.tokens_since_fired >= self.config.dead_tokens).float().mean().item()


def demo_model(d_in: int, n_layers: int) -> CrossCoder:
    """The model `python crosscoder.py` trains on toy data (synthetic.demo)."""
    return CrossCoder(CrossCoderConfig(d_in=d_in, n_latents=512, k=8, n_layers=n_layers,
                                       dead_tokens=50_000))


if __name__ == "__main__":
    from sae import train_step
    from synthetic import demo   # toy data with known atoms

    demo(demo_model, train_step)

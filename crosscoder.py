"""The acausal crosscoder over L layers, with optional stochastic layer masking.

One dictionary reads the residual stream at L layers at once and writes all of them (Lindsey et al. 2024,
transformer-circuits.pub/2024/crosscoders, "Crosscoder basics"; the baseline of the fmxcoders paper,
Demou et al. 2026, arXiv 2605.09438, pp. 4-5 as a third-party reading of the paper gives them, not checked
against the PDF):

    pre  = Σ_l (x_l − b_dec[l]) W_enc[l] + b_enc       x: (B, L, d)   W_enc: (L, d, F)   pre: (B, F)
    z    = S(pre)                                      core.sparsify, selected by score z_f Σ_l ‖W_dec[f, l]‖
    x̂_l  = z W_dec[:, l] + b_dec[l]                    W_dec: (F, L, d)   x̂: (B, L, d)

The encoder sums over layers, the decoder has one vector per latent and layer. `encoder_linear` writes the
encoder as one product of the L layers side by side, h = [x_1 − b_dec[1], …, x_L − b_dec[L]] (B, L·d) and
W = W_enc viewed as (F, L·d), so the sparse backward (core.SparseEncoderGrad) covers all L at once. The
score weights each latent by what it writes (Minder et al. 2025; the crosscoder L1 weighting) and the
unscaled z_f is decoded. Loss (core.py): mse = mean_b Σ_l Σ_d (x_l − x̂_l)², plus AuxK. With L = 1 the
crosscoder is sae.SAE with free decoder rows (tests/test_crosscoder.py checks it).

Stochastic layer masking (arXiv 2605.09438, p. 5 as read by a third-party reading, not checked against the
PDF; the no-rescaling and clean-target details are our reading): in training each token's input at each layer is zeroed
with probability `mask_prob` and the loss still reconstructs the clean activations of all L layers (a
denoising autoencoder along the layer axis); no 1/(1−p) rescaling, off in eval mode. mask_prob 0 is the
plain crosscoder, 0.05 the paper's value and the "crosscoder + masking" ablation.

No decoder-norm constraint (the paper uses none). Init: W_dec[f, l] random of norm 1/√L (norm 1 over the
concatenated layers), W_enc = W_decᵀ, b_dec[l] from data.
fmxcoder.FMXCoder is this class with the weights given by tensor factors (`weights` in __init__).

Defaults. CrossCoder(CrossCoderConfig(d_in=d)): L 2, mask_prob 0 (the plain crosscoder), and core.DictConfig's
BatchTopK, F 2048, k 32, AuxK (pinned by tests/test_defaults.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

import core
from core import DictConfig, opt


@dataclass
class CrossCoderConfig(DictConfig):
    n_layers: int = 2                                                # L (from --layers, not a flag)
    mask_prob: float = opt(0.0, "stochastic layer masking probability p in training (paper: 0.05)")

    def check(self, name=str) -> None:
        DictConfig.check(self, name)
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"{name('n_layers')} must be a positive integer, got {self.n_layers!r}")
        if not (isinstance(self.mask_prob, (int, float)) and 0.0 <= self.mask_prob < 1.0):
            raise ValueError(f"{name('mask_prob')} must be in [0, 1), got {self.mask_prob!r}")


def dense_weights(c: CrossCoderConfig) -> dict[str, Tensor]:
    """The dense crosscoder's weights at init: W_dec (F, L, d) with ‖W_dec[f, l]‖ = 1/√L, W_enc = W_decᵀ."""
    W_dec = torch.randn(c.n_latents, c.n_layers, c.d_in)
    W_dec /= W_dec.norm(dim=-1, keepdim=True) * c.n_layers ** 0.5
    return {"W_dec": W_dec, "W_enc": W_dec.permute(1, 2, 0).clone()}   # W_enc (L, d, F), a copy


def mask_layers(x_BLD: Tensor, p: float) -> Tensor:
    """Zero each (token, layer) input independently with probability p (no rescaling): the masking of
    arXiv 2605.09438 (p. 5 as a third-party reading gives it, not checked against the PDF)."""
    if p == 0:
        return x_BLD
    B, L, _ = x_BLD.shape
    return x_BLD * (torch.rand(B, L, 1, device=x_BLD.device) >= p)


class CrossCoder(nn.Module):
    """W_enc (L, d, F), b_enc (F,), W_dec (F, L, d), b_dec (L, d); a core.Dictionary. `weights` (name →
    initial tensor) replaces W_enc and W_dec: fmxcoder.FMXCoder passes its factors, and overrides the
    methods that read them (encoder_linear, decode_nobias, decoder_norms, decoder_vectors, scale_layers_)."""

    def __init__(self, config: CrossCoderConfig, weights: dict[str, Tensor] | None = None):
        super().__init__()
        self.config = config
        L, d, n = config.n_layers, config.d_in, config.n_latents
        for name, t in (weights or dense_weights(config)).items():
            setattr(self, name, nn.Parameter(t))
        self.b_enc = nn.Parameter(torch.zeros(n))                    # (F,)
        self.b_dec = nn.Parameter(torch.zeros(L, d))                 # (L, d)
        core.init_state(self, n)                                     # dead counter, BatchTopK threshold
        # the decoder norms' factor per layer in the score: 1, or s_l after fold_input_scale (same selection)
        self.register_buffer("norm_scale", torch.ones(L))

    def encoder_linear(self, x_BLD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b), pre = h Wᵀ + b: h (B, L·d) the layers side by side, W (F, L·d) a view of W_enc."""
        B, L, d = x_BLD.shape
        return (x_BLD - self.b_dec).reshape(B, L * d), self.W_enc.reshape(L * d, -1).T, self.b_enc

    def decode_nobias(self, z_BF) -> Tensor:
        F_, L, d = self.W_dec.shape
        return core.sparse_decode(z_BF, self.W_dec.view(F_, L * d)).view(-1, L, d)   # einsum("bf,fld->bld")

    def decoder_vectors(self) -> Tensor:
        return self.W_dec                                            # (F, L, d)

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=-1)                               # (F, L)

    def full_weights(self) -> tuple[Tensor, Tensor]:
        """(W_enc (L, d, F), W_dec (F, L, d)) as dense tensors (analysis)."""
        return self.W_enc, self.W_dec

    @torch.no_grad()
    def scale_layers_(self, enc_L: Tensor, dec_L: Tensor) -> None:
        """In place: W_enc[l] *= enc_L[l], W_dec[:, l] *= dec_L[l]."""
        self.W_enc *= enc_L[:, None, None]
        self.W_dec *= dec_L[None, :, None]

    def decoder_scale(self) -> Tensor:
        """(F,) the selection score's scale Σ_l ‖W_dec[f, l]‖ · norm_scale[l]."""
        return (self.decoder_norms() * self.norm_scale).sum(-1)

    # -- what every dictionary computes the same way (core.py)
    def pre_acts(self, x_BLD: Tensor) -> Tensor:
        return core.pre_acts(self, x_BLD)

    def encode(self, x_BLD: Tensor) -> Tensor:
        return core.encode(self, x_BLD)

    def decode(self, z_BF) -> Tensor:
        return self.decode_nobias(z_BF) + self.b_dec

    def forward(self, x_BLD: Tensor, target: Tensor | None = None) -> core.Output:
        """x (B, L, d). In training the encoder sees x with layers masked; the reconstruction is scored
        against the clean `target` (default x)."""
        core.check_input(self, x_BLD)
        x_in = mask_layers(x_BLD, self.config.mask_prob) if self.training else x_BLD
        return core.forward_with_losses(self, x_in, x_BLD if target is None else target)

    # -- upkeep
    @torch.no_grad()
    def init_b_dec(self, x_BLD: Tensor, method: str = "median") -> None:
        """b_dec[l] from a data sample (B, L, d), layer by layer."""
        core.check_input(self, x_BLD)
        if method == "median":
            self.b_dec.copy_(torch.stack([core.geometric_median(x_BLD[:, l].float()) for l in range(x_BLD.shape[1])]))
        else:                                                        # the mean over tokens, or zero
            core.set_b_dec(self.b_dec, x_BLD, method)

    def before_step(self) -> None:
        """No decoder-norm constraint: nothing to do."""

    def after_step(self) -> None:
        """No decoder-norm constraint: nothing to do."""

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """With x_l = s_l x_raw_l: W_enc[l] ← s_l W_enc[l], W_dec[:, l] ← W_dec[:, l]/s_l, b_dec[l] ← b_dec[l]/s_l,
        and norm_scale ← s_l norm_scale, so the same latents fire; outputs are the old ones / s_l."""
        s_L = torch.tensor(self.config.input_scale, dtype=self.b_dec.dtype, device=self.b_dec.device)
        self.scale_layers_(s_L, 1.0 / s_L)
        self.b_dec /= s_L[:, None]
        self.norm_scale *= s_L
        self.config.input_scale = [1.0] * self.config.n_layers


if __name__ == "__main__":
    core.demo(CrossCoder(CrossCoderConfig(d_in=32, n_latents=512, k=8, n_layers=4, sparsity="topk", dead_tokens=50_000)))

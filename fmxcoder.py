"""fmxcoder: a crosscoder whose encoder and decoder weight tensors are low-rank tensor
factorisations, trained with stochastic layer masking (Demou et al. 2026, arXiv 2605.09438;
what each rank allows and costs: docs/fmxcoder-ranks.md, our derivations).

A crosscoder (crosscoder.py) has two weight tensors W ∈ R^{d × F × L} (d = model width,
F = latents, L = layers). The fmxcoder factorises each one over all three modes, encoder
and decoder independently, so every latent draws its per-layer weights from a shared
cross-layer basis:

  CP, rank R (papers' appendix):     W[d, f, l] = Σ_r A[d, r] B[f, r] C[l, r]
      A: (d, R)   B: (F, R)   C: (L, R)
      Latent f writes x̂_l ∋ A (B[f] ⊙ C[l]): the rows of C are layer patterns shared by
      all latents; each latent owns only the R numbers B[f].

  Tensor Ring, ranks (R1, R2, R3) (the paper's main model):
                                     W[d, f, l] = Tr(G1[:, d, :] G2[:, f, :] G3[:, l, :])
      G1: (R1, d, R2)   G2: (R2, F, R3)   G3: (R3, L, R1)
      `rank` is one int (R1 = R2 = R3) or three ints [R1, R2, R3]; G3 is the layer core
      shared by all latents.

What the rank means, and what is rejected (ValueError):
  * CP with R < d cannot reconstruct: every x̂_l − b_dec[l] lies in span(A), an
    R-dimensional subspace of R^d (and the encoder only sees x through Aᵀx). R ≥ d is
    required; R = d·L already gives each latent as many numbers as the dense crosscoder.
    R above min(dF, dL, FL), the largest CP rank any d × F × L tensor has, is rejected.
  * TR: x̂_l − b_dec[l] lies in the span of the R1·R2 columns of G1 reshaped to
    (d, R1·R2), so R1·R2 ≥ d is required. A rank above
    max(min(d, FL), min(dF, L)) is rejected: at those ranks the ring already represents
    every d × F × L tensor exactly (a tensor train with R1 = 1 does).

Forward, never materialising d × F × L (x here is x − b_dec; MACs per token):
  CP   encoder  u_l = Aᵀ x_l (L·d·R),  v = Σ_l C[l] ⊙ u_l (L·R),  pre = B v (F·R)
       decoder  s = Bᵀ z (k·R: only the active rows, sae.sparse_decode),  x̂_l = A (C[l] ⊙ s) (L·R + L·R·d)
  TR   encoder  M_l = Σ_d x_l[d] G1[:, d, :] (L·d·R1R2),  N = Σ_l G3[:, l, :] M_l (L·R1R2R3),
                pre_f = Tr(G2[:, f, :] N) (F·R2R3)
       decoder  P = Σ_f z_f G2[:, f, :] (k·R2R3, active latents only),  Q_l = P G3[:, l, :]
                (L·R1R2R3),  x̂_l[d] = Tr(G1[:, d, :] Q_l) (L·d·R1R2)
  The dense crosscoder costs L·d·F per token for each of encoder and decoder. The
  selection score (crosscoder.py) needs the per-latent, per-layer decoder norms once per
  batch; they are computed one layer at a time (a (F, d) slice, never the whole tensor):
  F·L·d·R (CP) or F·L·(R1R2R3 + d·R1R2) (TR) MACs per batch. `costs(config)` and
  `cost_report()` give all these numbers against the dense crosscoder.
  Backward of the last encoder contraction (pre = v Bᵀ, pre = N G2ᵀ): its gradient is non-zero
  only at the selected latents, so the gradients of the latent factor (B, G2) and of v / N read
  those k entries per token (sae.SparseEncoderGrad, where sae.SPARSE_BACKWARD is on): k·R (CP)
  or k·R2R3 (TR) MACs each instead of F·R or F·R2R3. The contractions before it stay dense.

Init: the materialised decoder has the dense crosscoder's per-entry variance 1/(L·d).
The latent factor gets a unit-scale code per latent, the two others share the rest:
CP B ~ N(0, 1/R), A and C ~ N(0, (L·d)^-1/2); TR G2 ~ N(0, 1/(R2·R3)), G1 and G3 ~
N(0, (R1·L·d)^-1/2). (On the toy data of synthetic.py this learned much faster under Adam
than giving all three factors the same scale or A ~ N(0, 1/d), C ~ N(0, 1/L).) Then each
latent's slice of B / G2 is rescaled so its concatenated decoder norm is exactly 1, like
the crosscoder's. The encoder factors start as copies of the decoder factors, so
W_enc = W_dec transposed at init, as in the dense crosscoder.

Everything else (sparsifiers, losses, AuxK, masking with default p = 0.05, b_dec,
fold_input_scale, save/load) is crosscoder.CrossCoder's. One default differs: the decoder
norms of the selection score are refreshed every `norm_every = 10` training steps instead of
every step (CrossCoder.decoder_scale), since for the factorised decoder they are the most
expensive part of a step at small batch sizes; evaluation always uses exact norms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from crosscoder import CrossCoder, CrossCoderConfig
from sae import sparse_decode

FACTORIZATIONS = ("cp", "tr")


@dataclass
class FMXCoderConfig(CrossCoderConfig):
    mask_prob: float = 0.05            # the paper's default layer-masking probability
    norm_every: int = 10               # refresh the selection's decoder norms every 10 steps (costly here)
    rank: int | list[int] = 32         # CP: R; TR: R or [R1, R2, R3]
    factorization: str = "tr"          # "cp" | "tr"

    def __post_init__(self):
        super().__post_init__()
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {self.factorization!r}")
        if isinstance(self.rank, (list, tuple)):
            self.rank = [int(r) for r in self.rank]   # JSON turns tuples into lists
            if len(self.rank) == 1:
                self.rank = self.rank[0]
        check_ranks(self.factorization, ranks(self), self.d_in, self.n_latents, self.n_layers)


def ranks(cfg: FMXCoderConfig) -> tuple[int, ...]:
    """CP: (R,); TR: (R1, R2, R3)."""
    r = cfg.rank
    if cfg.factorization == "cp":
        if not isinstance(r, int):
            raise ValueError(f"CP takes one rank R, got rank={r!r}")
        return (r,)
    if isinstance(r, int):
        return (r, r, r)
    if len(r) != 3:
        raise ValueError(f"tensor ring takes one rank or three [R1, R2, R3], got rank={r!r}")
    return tuple(r)


def check_ranks(factorization: str, rs: tuple[int, ...], d: int, F: int, L: int) -> None:
    if any(not isinstance(r, int) or r < 1 for r in rs):
        raise ValueError(f"ranks must be positive integers, got {list(rs)}")
    if factorization == "cp":
        (R,) = rs
        if R < d:
            raise ValueError(f"CP rank R={R} < d_in={d}: every reconstruction would lie in an "
                             f"R-dimensional subspace of R^d; use R >= {d}")
        max_R = min(d * F, d * L, F * L)
        if R > max_R:
            raise ValueError(f"CP rank R={R} exceeds min(dF, dL, FL)={max_R}, the largest CP rank "
                             f"of any {d}x{F}x{L} tensor")
    else:
        R1, R2, R3 = rs
        if R1 * R2 < d:
            raise ValueError(f"tensor-ring ranks R1*R2={R1 * R2} < d_in={d}: every reconstruction "
                             f"would lie in an R1*R2-dimensional subspace of R^d; need R1*R2 >= {d}")
        bound = max(min(d, F * L), min(d * F, L))
        if max(rs) > bound:
            raise ValueError(f"tensor-ring ranks {list(rs)} exceed {bound}, the rank at which a ring "
                             f"already represents every {d}x{F}x{L} tensor exactly")


# ----------------------------------------------------------------------------------------
# Contractions: pure functions of the factors (x is x − b_dec)
# ----------------------------------------------------------------------------------------


def cp_encode(x_BLD: Tensor, A_DR: Tensor, B_FR: Tensor, C_LR: Tensor) -> tuple[Tensor, Tensor]:
    """(v, B): the encoder up to its last contraction, pre = v Bᵀ (the latent factor B is the
    "W" of sae.SparseEncoderGrad: its gradient Gᵀv and v's, G B, read only the selected entries)."""
    u_BLR = torch.einsum("bld,dr->blr", x_BLD, A_DR)
    v_BR = (u_BLR * C_LR).sum(1)      # Σ_l C[l] ⊙ u_l (einsum "blr,lr->br" ran as R tiny copies + bmm's)
    return v_BR, B_FR


def cp_decode(z_BF: Tensor, A_DR: Tensor, B_FR: Tensor, C_LR: Tensor) -> Tensor:
    s_BR = sparse_decode(z_BF, B_FR)                       # Bᵀz from the k active rows
    return torch.einsum("blr,dr->bld", s_BR[:, None, :] * C_LR, A_DR)


def cp_layer(l: int, A_DR: Tensor, B_FR: Tensor, C_LR: Tensor) -> Tensor:
    """(F, d) the weights of layer l."""
    return (B_FR * C_LR[l]) @ A_DR.T


def tr_encode(x_BLD: Tensor, G1: Tensor, G2: Tensor, G3: Tensor) -> tuple[Tensor, Tensor]:
    """(N, W): the encoder up to its last contraction, pre = N Wᵀ with N (B, R2·R3) and
    W[f] = G2[:, f, :] flattened (F, R2·R3), the latent core (sparse backward as for CP)."""
    (R1, d, R2), (_, F, R3), L = G1.shape, G2.shape, x_BLD.shape[1]
    B = x_BLD.shape[0]
    # M[n, l, a, b] = Σ_d x[n, l, d] G1[a, d, b]
    M = x_BLD.reshape(B * L, d) @ G1.permute(1, 0, 2).reshape(d, R1 * R2)
    # N[n, b, c] = Σ_{l, a} M[n, l, a, b] G3[c, l, a]
    M = M.view(B, L * R1, R2).transpose(1, 2).reshape(B * R2, L * R1)
    N = M @ G3.reshape(R3, L * R1).T
    # pre[n, f] = Σ_{b, c} N[n, b, c] G2[b, f, c] = Tr(G2[:, f, :] N)
    return N.view(B, R2 * R3), G2.permute(1, 0, 2).reshape(F, R2 * R3)


def tr_decode(z_BF: Tensor, G1: Tensor, G2: Tensor, G3: Tensor) -> Tensor:
    (R1, d, R2), (_, F, R3), L = G1.shape, G2.shape, G3.shape[1]
    B = z_BF.shape[0]
    # P[n, b, c] = Σ_f z[n, f] G2[b, f, c]
    P = sparse_decode(z_BF, G2.permute(1, 0, 2).reshape(F, R2 * R3))  # the k active slices
    # Q[n, b, l, a] = Σ_c P[n, b, c] G3[c, l, a]
    Q = P.view(B * R2, R3) @ G3.reshape(R3, L * R1)
    # x̂[n, l, d] = Σ_{a, b} Q[n, b, l, a] G1[a, d, b] = Tr(G1[:, d, :] Q_l)
    Q = Q.view(B, R2, L, R1).permute(0, 2, 3, 1).reshape(B * L, R1 * R2)
    return (Q @ G1.permute(0, 2, 1).reshape(R1 * R2, d)).view(B, L, d)


def tr_layer(l: int, G1: Tensor, G2: Tensor, G3: Tensor) -> Tensor:
    """(F, d) the weights of layer l."""
    M = torch.einsum("bfc,ca->fab", G2, G3[:, l])          # (F, R1, R2)
    return torch.einsum("fab,adb->fd", M, G1)


def param_count(cfg: FMXCoderConfig) -> int:
    """Trainable parameters of FMXCoder(cfg), counted without building it (as polysae.param_count)."""
    d, F, L = cfg.d_in, cfg.n_latents, cfg.n_layers
    return costs(cfg)["params"] + F + L * d            # the factors, b_enc, b_dec


def costs(cfg: FMXCoderConfig) -> dict:
    """Parameters (weights only, biases excluded) and MACs per token, factorised vs dense.
    `dec_macs` counts a dense z; `*_sparse`, what the code runs: only the k active latents
    are read (sae.sparse_decode), for the fmxcoder and the dense crosscoder alike."""
    d, F, L, k = cfg.d_in, cfg.n_latents, cfg.n_layers, cfg.k
    if cfg.factorization == "cp":
        (R,) = ranks(cfg)
        per_tensor = R * (d + F + L)
        enc = L * d * R + L * R + F * R
        dec_tail = L * R + L * R * d
        dec, dec_sparse = F * R + dec_tail, k * R + dec_tail
        norms = F * L * d * R
    else:
        R1, R2, R3 = ranks(cfg)
        per_tensor = R1 * R2 * d + R2 * R3 * F + R3 * R1 * L
        enc = L * d * R1 * R2 + L * R1 * R2 * R3 + F * R2 * R3
        dec_tail = L * R1 * R2 * R3 + L * d * R1 * R2
        dec, dec_sparse = F * R2 * R3 + dec_tail, k * R2 * R3 + dec_tail
        norms = F * L * (R1 * R2 * R3 + d * R1 * R2)
    dense = d * F * L
    return {"params": 2 * per_tensor, "dense_params": 2 * dense,
            "enc_macs": enc, "dec_macs": dec, "dec_macs_sparse": dec_sparse,
            "dense_enc_macs": dense, "dense_dec_macs": dense, "dense_dec_macs_sparse": k * L * d,
            "norm_macs_per_batch": norms, "dense_norm_macs_per_batch": dense}


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class FMXCoder(CrossCoder):
    """The factorised crosscoder: the CrossCoder with W_enc and W_dec built from CP/TR factors
    (the crosscoder's forward, masking and upkeep, reused as they are). A `sae.Dictionary`."""
    config_class = FMXCoderConfig

    def init_weights(self) -> None:
        c = self.config
        d, n, L = c.d_in, c.n_latents, c.n_layers
        if c.factorization == "cp":
            (R,) = ranks(c)
            shapes = {"A": (d, R), "B": (n, R), "C": (L, R)}
            std = {"A": (L * d) ** -0.25, "B": R ** -0.5, "C": (L * d) ** -0.25}
        else:
            R1, R2, R3 = ranks(c)
            shapes = {"G1": (R1, d, R2), "G2": (R2, n, R3), "G3": (R3, L, R1)}
            std = {"G1": (R1 * L * d) ** -0.25, "G2": (R2 * R3) ** -0.5, "G3": (R1 * L * d) ** -0.25}
        dec = {name: torch.randn(shape) * std[name] for name, shape in shapes.items()}
        # rescale each latent's slice of B / G2 so its concatenated decoder norm is 1
        self.names = list(shapes)
        norm_F = self._layer_weights(list(dec.values()), all_layers=True).flatten(1).norm(dim=-1)
        latent = "B" if c.factorization == "cp" else "G2"
        dec[latent] /= (norm_F[:, None] if latent == "B" else norm_F[None, :, None])
        for name, t in dec.items():
            setattr(self, f"{name}_dec", nn.Parameter(t))
            setattr(self, f"{name}_enc", nn.Parameter(t.clone()))   # W_enc = W_dec^T at init

    def factors(self, which: str) -> list[Tensor]:
        """The factors of "enc" or "dec": CP [A, B, C], TR [G1, G2, G3]."""
        return [getattr(self, f"{name}_{which}") for name in self.names]

    def _layer_weights(self, fs: list[Tensor], all_layers: bool = False, l: int = 0) -> Tensor:
        """(F, d) weights of layer l, or (F, L, d) all layers, from factors fs."""
        layer = cp_layer if self.config.factorization == "cp" else tr_layer
        if all_layers:
            return torch.stack([layer(i, *fs) for i in range(self.config.n_layers)], dim=1)
        return layer(l, *fs)

    def encoder_linear(self, x_BLD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b) with pre = h Wᵀ + b: the factorised encoder up to its last contraction (CP:
        h = v (B, R), W = B_enc (F, R); TR: h = N (B, R2·R3), W = G2_enc (F, R2·R3)), b = b_enc."""
        enc = cp_encode if self.config.factorization == "cp" else tr_encode
        return *enc(x_BLD - self.b_dec, *self.factors("enc")), self.b_enc

    def decode_nobias(self, z_BF: Tensor) -> Tensor:
        dec = cp_decode if self.config.factorization == "cp" else tr_decode
        return dec(z_BF, *self.factors("dec"))

    def decoder_norms(self) -> Tensor:
        """(F, L), one layer's (F, d) slice at a time."""
        fs = self.factors("dec")
        return torch.stack([self._layer_weights(fs, l=l).norm(dim=-1)
                            for l in range(self.config.n_layers)], dim=1)

    def full_weights(self) -> tuple[Tensor, Tensor]:
        """Materialise (W_enc (L, d, F), W_dec (F, L, d)): analysis only, d·F·L memory."""
        W_enc_FLD = self._layer_weights(self.factors("enc"), all_layers=True)
        return W_enc_FLD.permute(1, 2, 0), self._layer_weights(self.factors("dec"), all_layers=True)

    def decoder_vectors(self) -> Tensor:
        return self._layer_weights(self.factors("dec"), all_layers=True)

    @torch.no_grad()
    def scale_layers_(self, enc_L: Tensor, dec_L: Tensor) -> None:
        """W_enc[l] *= enc_L[l], W_dec[:, l] *= dec_L[l]: only the layer factor changes."""
        if self.config.factorization == "cp":
            self.C_enc *= enc_L[:, None]
            self.C_dec *= dec_L[:, None]
        else:
            self.G3_enc *= enc_L[None, :, None]
            self.G3_dec *= dec_L[None, :, None]

    def cost_report(self) -> str:
        c, r = self.config, costs(self.config)
        rank = "x".join(map(str, ranks(c)))
        return (f"fmxcoder {c.factorization.upper()} rank {rank}: {r['params']:,} weight parameters vs "
                f"{r['dense_params']:,} dense ({r['dense_params'] / r['params']:.1f}x fewer); "
                f"MACs/token encoder {r['enc_macs']:,} vs {r['dense_enc_macs']:,}, decoder "
                f"{r['dec_macs']:,} vs {r['dense_dec_macs']:,} (with sparse z {r['dec_macs_sparse']:,} vs "
                f"{r['dense_dec_macs_sparse']:,}); decoder norms {r['norm_macs_per_batch']:,} MACs per batch")


def demo_model(d_in: int, n_layers: int) -> FMXCoder:
    """The model `python fmxcoder.py` trains on toy data (synthetic.demo)."""
    return FMXCoder(FMXCoderConfig(d_in=d_in, n_latents=512, k=8, n_layers=n_layers, dead_tokens=50_000,
                                   factorization="tr", rank=[8, 16, 16], norm_every=1))  # toy size: exact norms are cheap


if __name__ == "__main__":
    from sae import train_step
    from synthetic import demo   # toy data with known atoms

    demo(demo_model, train_step)

"""fmxcoder: a crosscoder whose encoder and decoder tensors are low-rank tensor factorisations, trained
with stochastic layer masking (Demou et al. 2026, arXiv 2605.09438, v1). The page numbers below come from a
third-party reading of the paper and were not checked against its PDF (nor were section or equation numbers
available to us); the Tensor Ring's core order (which rank sits between which modes, G1 (R1, d, R2),
G2 (R2, F, R3), G3 (R3, L, R1)) is our choice, not taken from the paper. What each rank allows and costs,
our derivations: docs/fmxcoder-ranks.md.

A crosscoder (crosscoder.py) has two weight tensors W ∈ R^{d × F × L}. The fmxcoder factorises each over
all three modes, encoder and decoder independently, so every latent draws its per-layer weights from a
shared cross-layer basis:

  Tensor Ring, ranks (R1, R2, R3) (the paper's main model, p. 5 as read by the third party; the core order
  ours; `rank` R or [R1, R2, R3]):
      W[d, f, l] = Tr(G1[:, d, :] G2[:, f, :] G3[:, l, :])     G1 (R1, d, R2)  G2 (R2, F, R3)  G3 (R3, L, R1)
      G3 is the layer core shared by all latents.
  CP, rank R (the paper's appendix, p. 15 as read by the third party):
      W[d, f, l] = Σ_r A[d, r] B[f, r] C[l, r]                 A (d, R)  B (F, R)  C (L, R)
      latent f writes x̂_l ∋ A (B[f] ⊙ C[l]): the rows of C are layer patterns shared by all latents.

Ranks that are refused (ValueError): CP R < d (every x̂_l − b_dec[l] would lie in span(A), R dimensions
of R^d) or R > min(dF, dL, FL) (no d × F × L tensor has a larger CP rank); TR R1·R2 < d (x̂_l lies in the
span of G1's R1·R2 columns) or a rank above max(min(d, FL), min(dF, L)) (the ring is already exact).

Forward without ever materialising d × F × L (x is x − b_dec; MACs per token):
  TR  encoder M_l = Σ_d x_l[d] G1[:, d, :] (L·d·R1R2), N = Σ_l G3[:, l, :] M_l (L·R1R2R3),
              pre_f = Tr(G2[:, f, :] N) (F·R2R3);  decoder P = Σ_f z_f G2[:, f, :] (k·R2R3, active latents),
              Q_l = P G3[:, l, :] (L·R1R2R3), x̂_l[d] = Tr(G1[:, d, :] Q_l) (L·d·R1R2)
  CP  encoder u_l = Aᵀ x_l (L·d·R), v = Σ_l C[l] ⊙ u_l (L·R), pre = B v (F·R);
      decoder s = Bᵀ z (k·R, active rows), x̂_l = A (C[l] ⊙ s) (L·R + L·R·d)
The dense crosscoder costs L·d·F per token each way. The last encoder contraction (pre = N G2ᵀ, pre = v Bᵀ)
is `encoder_linear`'s (h, W): its backward reads only the selected latents (core.SparseEncoderGrad). The
selection score needs the per-latent, per-layer decoder norms: F·L·(R1R2R3 + d·R1R2) (TR) or F·L·d·R (CP)
MACs per batch, one (F, d) layer slice at a time, hence `norm_every` = 10 by default: training selects with
the norms of the last refresh (after steps 1, n + 1, 2n + 1, ...), stale by < n steps (our speed option,
not the paper's; norm_every 1 is the exact score, and evaluation is always exact).
`costs(config)` and `cost_report` give these numbers against the dense crosscoder.

Init: the materialised decoder has the dense crosscoder's per-entry variance 1/(L·d): the latent factor a
unit-scale code per latent (G2 ~ N(0, 1/(R2·R3)), B ~ N(0, 1/R)), the two others the rest (G1, G3 ~
N(0, (R1·L·d)^-1/2); A, C ~ N(0, (L·d)^-1/2)); then each latent's slice of G2 / B is rescaled so its
concatenated decoder norm is 1, like the crosscoder's, and the encoder factors start as copies (W_enc =
W_decᵀ): our choice, matching the dense crosscoder's init. Masking (p. 5 as read by the third party, default
p = 0.05), b_dec and the losses are crosscoder.CrossCoder's.

Defaults. FMXCoder(FMXCoderConfig(d_in=d)): Tensor Ring, rank 32 (R1 = R2 = R3 = 32), mask_prob 0.05,
norm_every 10, L 2, and core.DictConfig's BatchTopK, F 2048, k 32, AuxK (pinned by tests/test_defaults.py).
Copy this file with crosscoder.py and core.py; `python fmxcoder.py` trains one on toy data.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

import core
from core import opt
from crosscoder import CrossCoder, CrossCoderConfig

FACTORIZATIONS = ("tr", "cp")


@dataclass
class FMXCoderConfig(CrossCoderConfig):
    mask_prob: float = opt(0.05, "stochastic layer masking probability p in training (paper: 0.05)")
    norm_every: int = opt(10, "training: refresh the selection score's decoder norms every N steps")
    rank: int | list[int] = opt(32, "TR: R or R1,R2,R3 (R1·R2 >= d); CP: R (>= d)")
    factorization: str = opt("tr", "tr (tensor ring) | cp")

    def __post_init__(self):
        if isinstance(self.rank, (list, tuple)):                       # JSON turns tuples into lists
            self.rank = [int(r) for r in self.rank] if len(self.rank) != 1 else int(self.rank[0])
        super().__post_init__()

    def check(self, name=str) -> None:
        CrossCoderConfig.check(self, name)
        if not isinstance(self.norm_every, int) or self.norm_every < 1:
            raise ValueError(f"{name('norm_every')} must be a positive integer, got {self.norm_every!r}")
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"{name('factorization')} must be one of {', '.join(FACTORIZATIONS)}, "
                             f"got {self.factorization!r}")
        check_ranks(self.factorization, ranks(self, name), self.d_in, self.n_latents, self.n_layers)


class FMXCoder(CrossCoder):
    """The crosscoder with W_enc and W_dec built from TR cores G1, G2, G3 or CP factors A, B, C (each as
    <name>_enc and <name>_dec); the forward pass, masking and b_dec are CrossCoder's. A core.Dictionary."""

    def __init__(self, config: FMXCoderConfig):
        super().__init__(config, weights=init_factors(config))
        # norm_every > 1: training selects with the score of the last refresh, saved with the model (a resumed
        # run selects the same); the step count is mirrored on the host (core.HostMirror: no device read)
        self.register_buffer("steps_done", torch.tensor(0))
        self.steps_host = core.HostMirror(int, self.steps_done, 0)
        self.register_buffer("score_scale", self.exact_decoder_scale().detach())   # (F,)

    def factors(self, which: str) -> list[Tensor]:
        """The factors of "enc" or "dec": TR [G1, G2, G3], CP [A, B, C]."""
        return [getattr(self, f"{name}_{which}") for name in factor_names(self.config)]

    def encoder_linear(self, x_BLD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b), pre = h Wᵀ + b: the encoder up to its last contraction (TR: h = N (B, R2·R3),
        W = G2_enc (F, R2·R3); CP: h = v (B, R), W = B_enc (F, R)), b = b_enc."""
        enc = tr_encode if self.config.factorization == "tr" else cp_encode
        return *enc(x_BLD - self.b_dec, *self.factors("enc")), self.b_enc

    def decode_nobias(self, z_BF) -> Tensor:
        dec = tr_decode if self.config.factorization == "tr" else cp_decode
        return dec(z_BF, *self.factors("dec"))

    def decoder_norms(self) -> Tensor:
        """(F, L), one layer's (F, d) slice at a time."""
        fs = self.factors("dec")
        return torch.stack([layer_weights(self.config, fs, l).norm(dim=-1) for l in range(self.config.n_layers)], 1)

    def decoder_vectors(self) -> Tensor:
        """(F, L, d), materialised (analysis only: F·L·d memory)."""
        return all_layer_weights(self.config, self.factors("dec"))

    def full_weights(self) -> tuple[Tensor, Tensor]:
        """(W_enc (L, d, F), W_dec (F, L, d)), materialised (analysis only)."""
        return all_layer_weights(self.config, self.factors("enc")).permute(1, 2, 0), self.decoder_vectors()

    @torch.no_grad()
    def scale_layers_(self, enc_L: Tensor, dec_L: Tensor) -> None:
        """W_enc[l] *= enc_L[l], W_dec[:, l] *= dec_L[l]: only the layer factor changes."""
        if self.config.factorization == "tr":
            self.G3_enc *= enc_L[None, :, None]
            self.G3_dec *= dec_L[None, :, None]
        else:
            self.C_enc *= enc_L[:, None]
            self.C_dec *= dec_L[:, None]

    # -- the selection score, refreshed every norm_every steps in training
    def exact_decoder_scale(self) -> Tensor:
        """(F,) Σ_l ‖W_dec[f, l]‖ · norm_scale[l] from the factors now (CrossCoder's decoder_scale)."""
        return CrossCoder.decoder_scale(self)

    def decoder_scale(self) -> Tensor:
        """Exact, except in training with norm_every > 1 (not for ReLU + L1, whose penalty needs the
        gradient) after the first step: the last refresh's, stale by < n steps."""
        c = self.config
        if self.training and c.norm_every > 1 and c.sparsity != "relu" and self.steps_host.get(self.steps_done) > 0:
            return self.score_scale
        return self.exact_decoder_scale()

    @torch.no_grad()
    def after_step(self) -> None:
        """Count the step (on the host too) and, every norm_every steps, refresh the selection scale."""
        steps = self.steps_host.get(self.steps_done) + 1
        self.steps_done += 1
        self.steps_host.set(self.steps_done, steps)
        if self.config.norm_every > 1 and (steps - 1) % self.config.norm_every == 0:
            self.score_scale.copy_(self.exact_decoder_scale())      # after steps 1, n + 1, 2n + 1, ...

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """CrossCoder's (the layer factor and b_dec), then the selection scale from the folded weights."""
        super().fold_input_scale()
        self.score_scale.copy_(self.exact_decoder_scale())

    def cost_report(self) -> str:
        c, r = self.config, costs(self.config)
        ratio = r["dense_params"] / r["params"]
        size = f"{ratio:.1f}x fewer" if ratio >= 1 else f"{1 / ratio:.1f}x more"
        return (f"fmxcoder {c.factorization.upper()} rank {'x'.join(map(str, ranks(c)))}: {r['params']:,} weight "
                f"parameters vs {r['dense_params']:,} dense ({size}); MACs/token encoder {r['enc_macs']:,} vs "
                f"{r['dense_enc_macs']:,}, decoder {r['dec_macs']:,} vs {r['dense_dec_macs']:,} (with sparse z "
                f"{r['dec_macs_sparse']:,} vs {r['dense_dec_macs_sparse']:,}); decoder norms "
                f"{r['norm_macs_per_batch']:,} MACs per batch")


# ----------------------------------------------------------------------------------------
# Ranks and init
# ----------------------------------------------------------------------------------------


def ranks(c, name=str) -> tuple[int, ...]:
    """TR: (R1, R2, R3); CP: (R,)."""
    r = c.rank
    if c.factorization == "cp":
        if not isinstance(r, int):
            raise ValueError(f"CP takes one rank R, got {name('rank')}={r!r}")
        return (r,)
    if isinstance(r, int):
        return (r, r, r)
    if len(r) != 3:
        raise ValueError(f"tensor ring takes one rank or three R1,R2,R3, got {name('rank')}={r!r}")
    return tuple(r)


def per_latent_capacity(factorization: str, rs: tuple[int, ...]) -> int:
    """How many numbers shape one latent's d × L weights: TR R2·R3 (its slice G2[:, f, :]), CP R (its row of
    B). Every latent's d × L weight matrix lies in one subspace of that dimension, shared by all latents;
    below L·d it cannot take every d × L matrix."""
    return rs[1] * rs[2] if factorization == "tr" else rs[0]


def check_ranks(factorization: str, rs: tuple[int, ...], d: int, F: int, L: int) -> None:
    """ValueError for ranks that cannot reconstruct (see the module docstring); a warning, with the numbers,
    when the per-latent capacity is below L·d: on planted features (experiments/ground_truth.py) that cap,
    not the shared basis as such, is what lowers reconstruction and raises functional coherence."""
    if any(not isinstance(r, int) or r < 1 for r in rs):
        raise ValueError(f"ranks must be positive integers, got {list(rs)}")
    if factorization == "cp":
        (R,) = rs
        if R < d:
            raise ValueError(f"CP rank R={R} < d_in={d}: every reconstruction would lie in an R-dimensional "
                             f"subspace of R^d; use R >= {d}")
        if R > min(d * F, d * L, F * L):
            raise ValueError(f"CP rank R={R} exceeds min(dF, dL, FL)={min(d * F, d * L, F * L)}, the largest CP "
                             f"rank of any {d}x{F}x{L} tensor")
    else:
        R1, R2, _ = rs
        if R1 * R2 < d:
            raise ValueError(f"tensor-ring ranks R1*R2={R1 * R2} < d_in={d}: every reconstruction would lie in an "
                             f"R1*R2-dimensional subspace of R^d; need R1*R2 >= {d}")
        bound = max(min(d, F * L), min(d * F, L))
        if max(rs) > bound:
            raise ValueError(f"tensor-ring ranks {list(rs)} exceed {bound}, the rank at which a ring already "
                             f"represents every {d}x{F}x{L} tensor exactly")
    cap = per_latent_capacity(factorization, rs)
    if cap < L * d:
        what = "R2*R3" if factorization == "tr" else "R"
        warnings.warn(f"fmxcoder {factorization.upper()} ranks {list(rs)}: per-latent capacity {what}={cap} < L*d="
                      f"{L * d} ({cap / (L * d):.2f} of it): every latent's {d}x{L} weights lie in one shared "
                      f"{cap}-dimensional subspace, which caps reconstruction and raises functional coherence by "
                      f"itself; {what} >= {L * d} removes the cap", stacklevel=2)


def factor_names(c: FMXCoderConfig) -> list[str]:
    return ["G1", "G2", "G3"] if c.factorization == "tr" else ["A", "B", "C"]


def init_factors(c: FMXCoderConfig) -> dict[str, Tensor]:
    """{<name>_dec, <name>_enc: tensor} at init (see the module docstring)."""
    d, n, L = c.d_in, c.n_latents, c.n_layers
    if c.factorization == "tr":
        R1, R2, R3 = ranks(c)
        shapes = {"G1": (R1, d, R2), "G2": (R2, n, R3), "G3": (R3, L, R1)}
        std = {"G1": (R1 * L * d) ** -0.25, "G2": (R2 * R3) ** -0.5, "G3": (R1 * L * d) ** -0.25}
    else:
        (R,) = ranks(c)
        shapes = {"A": (d, R), "B": (n, R), "C": (L, R)}
        std = {"A": (L * d) ** -0.25, "B": R ** -0.5, "C": (L * d) ** -0.25}
    dec = {name: torch.randn(shape) * std[name] for name, shape in shapes.items()}
    norm_F = all_layer_weights(c, list(dec.values())).flatten(1).norm(dim=-1)   # concatenated decoder norms
    if c.factorization == "tr":
        dec["G2"] /= norm_F[None, :, None]
    else:
        dec["B"] /= norm_F[:, None]
    return {f"{name}_{which}": t if which == "dec" else t.clone() for name, t in dec.items() for which in ("dec", "enc")}


# ----------------------------------------------------------------------------------------
# Contractions: pure functions of the factors (x is x − b_dec)
# ----------------------------------------------------------------------------------------


def tr_encode(x_BLD: Tensor, G1: Tensor, G2: Tensor, G3: Tensor) -> tuple[Tensor, Tensor]:
    """(N (B, R2·R3), W (F, R2·R3)) with pre = N Wᵀ, W[f] = G2[:, f, :] flattened (the latent core). The
    Tensor Ring of arXiv 2605.09438 (p. 5 as a third-party reading gives it, unchecked); core order ours."""
    (R1, d, R2), (_, F, R3), (B, L) = G1.shape, G2.shape, x_BLD.shape[:2]
    M = x_BLD.reshape(B * L, d) @ G1.permute(1, 0, 2).reshape(d, R1 * R2)      # M[n, l, a, b] = Σ_d x G1[a, d, b]
    M = M.view(B, L * R1, R2).transpose(1, 2).reshape(B * R2, L * R1)
    N = M @ G3.reshape(R3, L * R1).T                                           # N[n, b, c] = Σ_{l,a} M G3[c, l, a]
    return N.view(B, R2 * R3), G2.permute(1, 0, 2).reshape(F, R2 * R3)         # pre_f = Tr(G2[:, f, :] N)


def tr_decode(z_BF, G1: Tensor, G2: Tensor, G3: Tensor) -> Tensor:
    (R1, d, R2), (_, F, R3), L = G1.shape, G2.shape, G3.shape[1]
    P = core.sparse_decode(z_BF, G2.permute(1, 0, 2).reshape(F, R2 * R3))    # P = Σ_f z_f G2[:, f, :], k slices
    B = P.shape[0]
    Q = P.view(B * R2, R3) @ G3.reshape(R3, L * R1)                            # Q[n, b, l, a] = Σ_c P G3[c, l, a]
    Q = Q.view(B, R2, L, R1).permute(0, 2, 3, 1).reshape(B * L, R1 * R2)
    return (Q @ G1.permute(0, 2, 1).reshape(R1 * R2, d)).view(B, L, d)        # x̂_l[d] = Tr(G1[:, d, :] Q_l)


def cp_encode(x_BLD: Tensor, A_DR: Tensor, B_FR: Tensor, C_LR: Tensor) -> tuple[Tensor, Tensor]:
    """(v (B, R), B (F, R)) with pre = v Bᵀ. The CP form of arXiv 2605.09438 (appendix, p. 15 as a
    third-party reading gives it, unchecked)."""
    u_BLR = torch.einsum("bld,dr->blr", x_BLD, A_DR)
    return (u_BLR * C_LR).sum(1), B_FR        # v = Σ_l C[l] ⊙ u_l (an einsum here ran as R copies + bmm's)


def cp_decode(z_BF, A_DR: Tensor, B_FR: Tensor, C_LR: Tensor) -> Tensor:
    s_BR = core.sparse_decode(z_BF, B_FR)                                      # Bᵀz from the k active rows
    return torch.einsum("blr,dr->bld", s_BR[:, None, :] * C_LR, A_DR)


def layer_weights(c: FMXCoderConfig, fs: list[Tensor], l: int) -> Tensor:
    """(F, d): the weights of layer l from factors fs."""
    if c.factorization == "tr":
        G1, G2, G3 = fs
        return torch.einsum("fab,adb->fd", torch.einsum("bfc,ca->fab", G2, G3[:, l]), G1)
    A, B, C = fs
    return (B * C[l]) @ A.T


def all_layer_weights(c: FMXCoderConfig, fs: list[Tensor]) -> Tensor:
    """(F, L, d), materialised."""
    return torch.stack([layer_weights(c, fs, l) for l in range(c.n_layers)], dim=1)


def param_count(c: FMXCoderConfig) -> int:
    """Trainable parameters of FMXCoder(c), counted without building it: the factors, b_enc, b_dec."""
    return costs(c)["params"] + c.n_latents + c.n_layers * c.d_in


def costs(c: FMXCoderConfig) -> dict:
    """Weight parameters (biases excluded) and MACs per token, factorised vs dense; `dec_macs` for a dense
    z, `*_sparse` what runs (only the k active latents are read, here and in the dense crosscoder)."""
    d, F, L, k = c.d_in, c.n_latents, c.n_layers, c.k
    if c.factorization == "tr":
        R1, R2, R3 = ranks(c)
        per_tensor = R1 * R2 * d + R2 * R3 * F + R3 * R1 * L
        enc = L * d * R1 * R2 + L * R1 * R2 * R3 + F * R2 * R3
        dec_tail = L * R1 * R2 * R3 + L * d * R1 * R2
        dec, dec_sparse, norms = F * R2 * R3 + dec_tail, k * R2 * R3 + dec_tail, F * L * (R1 * R2 * R3 + d * R1 * R2)
    else:
        (R,) = ranks(c)
        per_tensor = R * (d + F + L)
        enc, dec_tail = L * d * R + L * R + F * R, L * R + L * R * d
        dec, dec_sparse, norms = F * R + dec_tail, k * R + dec_tail, F * L * d * R
    dense = d * F * L
    return {"params": 2 * per_tensor, "dense_params": 2 * dense, "enc_macs": enc, "dec_macs": dec,
            "dec_macs_sparse": dec_sparse, "dense_enc_macs": dense, "dense_dec_macs": dense,
            "dense_dec_macs_sparse": k * L * d, "norm_macs_per_batch": norms, "dense_norm_macs_per_batch": dense}


if __name__ == "__main__":
    core.demo(FMXCoder(FMXCoderConfig(d_in=32, n_latents=512, k=8, n_layers=4, sparsity="topk", dead_tokens=50_000,
                                      rank=[8, 16, 16], norm_every=1)))    # toy size: exact norms are cheap

"""PolySAE: a sparse autoencoder with a polynomial (third-order) decoder.

Koromilas, Demou, Oldfield, Panagakis, Nicolaou, "PolySAE: Modeling Feature Interactions in Sparse
Autoencoders via Polynomial Decoding", arXiv 2602.01322 (ICML 2026). Implemented as the official code does
it (github.com/pakoromilas/PolySAE, sae_lens/saes/polysae.py, the `--shared_u` mode that every command of
its README uses). The section and equation numbers of the PDF were not available to us, so each line names
that file's function instead:

    pre = (x − b_dec) W_enc + b_enc,   z = S(pre)         the linear encoder, as sae.py (SAELens `encode`)
    a   = z U                                            U (F, R1), UᵀU = I          a (B, R1)
    y1  = a C1ᵀ                                          C1 (d, R1)
    y2  = (a[:, :R2] ⊙ a[:, :R2]) C2ᵀ                    C2 (d, R2)
    y3  = (a[:, :R3] ⊙ a[:, :R3] ⊙ a[:, :R3]) C3ᵀ        C3 (d, R3)
    x̂   = b_dec + y1 + λ2 y2 + λ3 y3                     `_poly_decode`; λ2, λ3 learnable scalars

with nested ranks R1 ≥ R2 ≥ R3 (the paper's GPT-2 setting 768/64/64; default here (d, 64, 64) clipped to R1);
`order` 1 keeps y1 only, 2 adds y2, 3 adds y3. Written out, a symmetric CP form with U tied across orders:
    y1 = Σ_i z_i D1[i],  D1 = U C1ᵀ (F, d);   y2 = Σ_ij z_i z_j Θ2[i,j],  Θ2[i,j,:] = Σ_{r≤R2} U_ir U_jr C2[:, r]
(diagonal included). ‖Θ2[i,j]‖ is the interaction weight of latents i, j (`interaction_matrix`, without
building Θ2); D1's rows are what SAEBench sees as decoder directions (`decoder_vectors`).

Choices, each as the official code makes them:
  * init: U orthogonal, C1..C3 Kaiming-uniform, λ2 = −0.5, λ3 = +0.5 (`_init_poly_decoder_weights`). The
    official encoder is SAELens's W_enc = W_decᵀ of a placeholder W_dec (rows at norm 0.1) that the
    polynomial never uses, so encoder and decoder start untied (`untied_init`); by default here W_enc = D1ᵀ
    with unit-norm columns, the SAE's tied init applied to the decoder actually used.
  * after every optimiser step U is re-orthonormalised (`orthogonalize_U`): reduced QR with diag(R) > 0,
    skipped if ‖U‖_F < 1e-6, with 1e-6 jitter if ‖U‖_F < 1e-4. No decoder-norm constraint otherwise.
  * AuxK decodes the dead latents through the polynomial without b_dec (core.auxk_loss).
  * `decoder_norms()` = ‖decode_nobias(e_i)‖, what latent i writes alone (`compute_poly_decoder_norms`).
Parameters beyond a TopK SAE of the same width: C1 + C2 + C3 + λ2 + λ3 − W_dec + U = d(R1 + R2 + R3) + 2
(U replaces W_dec): 688,130 (2.7 %) for GPT-2 small, d 768, F 16384, ranks 768/64/64 (`param_count`).
Defaults. PolySAE(PolySAEConfig(d_in=d)): ranks (d, 64, 64), order 3, λ2 −0.5, λ3 0.5, tied init, and
core.DictConfig's BatchTopK, F 2048, k 32, AuxK (pinned by tests/test_defaults.py).
Copy this file with core.py; `python polysae.py` trains one on toy data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

import core
from core import DictConfig, opt


@dataclass
class PolySAEConfig(DictConfig):
    ranks: tuple[int, int, int] | list[int] | None = opt(None, "R1,R2,R3 with R1 >= R2 >= R3 (default d,64,64)")
    order: int = opt(3, "polynomial order: 1 linear, 2 + quadratic, 3 + cubic")
    lambda2_init: float = opt(-0.5, "initial λ2 (official: -0.5)")
    lambda3_init: float = opt(0.5, "initial λ3 (official: 0.5)")
    untied_init: bool = opt(False, "W_enc initialised as the official code does (untied from the decoder)")

    def __post_init__(self):
        super().__post_init__()
        self.ranks = resolve_ranks(self.ranks, self.d_in)

    def check(self, name=str) -> None:
        DictConfig.check(self, name)
        r1, r2, r3 = resolve_ranks(self.ranks, self.d_in, name)
        if not r1 >= r2 >= r3 >= 1:
            raise ValueError(f"{name('ranks')} must satisfy R1 >= R2 >= R3 >= 1, got {(r1, r2, r3)}")
        if r1 > self.n_latents:
            raise ValueError(f"{name('ranks')}: R1 must be <= {name('n_latents')} (U has orthonormal columns), got "
                             f"R1={r1} > {self.n_latents}" + ("" if self.ranks else f"; pass {name('ranks')} "
                                                              f"{self.n_latents},64,64 or more latents"))
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(f"{name('order')} must be 1, 2 or 3, got {self.order!r}")


def resolve_ranks(ranks, d_in: int, name=str) -> tuple[int, int, int]:
    """(R1, R2, R3) from a tuple or list (JSON), or None → (d, 64, 64) clipped to R1."""
    if ranks is None:
        return (d_in, min(64, d_in), min(64, d_in))
    if not (isinstance(ranks, (tuple, list)) and len(ranks) == 3
            and all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
        raise ValueError(f"{name('ranks')} must be three integers R1,R2,R3, got {ranks!r}")
    return tuple(ranks)


class PolySAE(nn.Module):
    """The SAE's linear encoder (W_enc, b_enc, b_dec) and a polynomial decoder (U, C1, C2, C3, λ2, λ3);
    a core.Dictionary."""

    def __init__(self, config: PolySAEConfig):
        super().__init__()
        self.config = config
        d, n = config.d_in, config.n_latents
        r1, r2, r3 = config.ranks
        self.W_enc = nn.Parameter(torch.empty(d, n))                           # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(n))                              # (F,)
        self.b_dec = nn.Parameter(torch.zeros(d))                              # (d,)
        self.U = nn.Parameter(nn.init.orthogonal_(torch.empty(n, r1)))        # (F, R1), UᵀU = I
        self.C1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, r1)))   # (d, R1)
        if config.order >= 2:
            self.C2 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, r2)))   # (d, R2)
            self.lambda2 = nn.Parameter(torch.tensor(float(config.lambda2_init)))
        if config.order >= 3:
            self.C3 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, r3)))   # (d, R3)
            self.lambda3 = nn.Parameter(torch.tensor(float(config.lambda3_init)))
        core.init_state(self, n)                                               # dead counter, BatchTopK θ
        with torch.no_grad():
            if config.untied_init:    # official: W_enc = W_decᵀ of an unused Kaiming-uniform W_dec, rows at 0.1
                W_FD = nn.init.kaiming_uniform_(torch.empty(n, d))
                self.W_enc.copy_((0.1 * W_FD / W_FD.norm(dim=-1, keepdim=True)).T)
            else:                     # tied: W_enc = D1ᵀ with unit-norm columns
                D1_FD = self.U @ self.C1.T
                self.W_enc.copy_((D1_FD / D1_FD.norm(dim=-1, keepdim=True).clamp_min(1e-8)).T)

    def encoder_linear(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b) = (x − b_dec, W_encᵀ, b_enc), as sae.SAE."""
        return x_BD - self.b_dec, self.W_enc.T, self.b_enc

    def decoder_scale(self) -> None:
        """Select by pre itself (the paper's runs pass --no_rescale_by_decoder_norm)."""
        return None

    def polynomial(self, a_BR: Tensor) -> Tensor:
        """y1 + λ2 y2 + λ3 y3 (B, d) from the projections a = z U (B, R1)."""
        c = self.config
        _, r2, r3 = c.ranks
        y_BD = a_BR @ self.C1.T
        if c.order >= 2:
            y_BD = y_BD + self.lambda2 * (a_BR[:, :r2].pow(2) @ self.C2.T)
        if c.order >= 3:
            y_BD = y_BD + self.lambda3 * (a_BR[:, :r3].pow(3) @ self.C3.T)
        return y_BD

    def decode_nobias(self, z_BF) -> Tensor:
        return self.polynomial(core.sparse_decode(z_BF, self.U))   # a = z U from the active rows of U

    def decoder_vectors(self) -> Tensor:
        """(F, d) the linear term D1 = U C1ᵀ."""
        return self.U @ self.C1.T

    def decoder_norms(self) -> Tensor:
        """(F,) ‖D1[i] + λ2 (U[i,:R2]²) C2ᵀ + λ3 (U[i,:R3]³) C3ᵀ‖ (a one-hot z = e_i has a = U[i])."""
        return self.polynomial(self.U).norm(dim=-1)

    @torch.no_grad()
    def interaction_matrix(self, idx) -> Tensor:
        """(n, n) ‖Θ2[i, j, :]‖ for latents idx (n,), through the Gram matrix G = C2ᵀC2:
        ‖Θ2[i,j]‖² = Σ_rs U_ir U_jr U_is U_js G_rs (cost n²R2², memory nR2², no n²d tensor)."""
        if self.config.order < 2:
            raise ValueError(f"interaction weights need order >= 2, got order={self.config.order}")
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.U.device)
        V_NR = self.U[idx, :self.config.ranks[1]]
        outer_NRR = V_NR[:, :, None] * V_NR[:, None, :]
        sq_NN = (outer_NRR * (self.C2.T @ self.C2)).flatten(1) @ outer_NRR.flatten(1).T
        return sq_NN.clamp_min(0).sqrt()

    # -- what every dictionary computes the same way (core.py)
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return core.pre_acts(self, x_BD)

    def encode(self, x_BD: Tensor) -> Tensor:
        return core.encode(self, x_BD)

    def decode(self, z_BF) -> Tensor:
        return self.decode_nobias(z_BF) + self.b_dec

    def forward(self, x_BD: Tensor, target: Tensor | None = None) -> core.Output:
        core.check_input(self, x_BD)
        return core.forward_with_losses(self, x_BD, x_BD if target is None else target)

    # -- upkeep
    def init_b_dec(self, x_BD: Tensor, method: str = "median") -> None:
        core.set_b_dec(self.b_dec, x_BD, method)

    def before_step(self) -> None:
        """Nothing: there is no W_dec to keep at unit norm (U is retracted after the step)."""

    @torch.no_grad()
    def after_step(self) -> None:
        self.U.copy_(orthonormal_retraction(self.U))

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """With x = s·x_raw: W_enc ← s W_enc, and since every y_n is linear in C_n, C_n ← C_n/s and
        b_dec ← b_dec/s give x̂_raw = x̂/s."""
        (s,) = self.config.input_scale
        self.W_enc *= s
        self.b_dec /= s
        for name in ("C1", "C2", "C3"):
            if hasattr(self, name):
                getattr(self, name).div_(s)
        self.config.input_scale = [1.0]


@torch.no_grad()
def orthonormal_retraction(U: Tensor, eps_norm: float = 1e-6, eps_jitter: float = 1e-4,
                           jitter_std: float = 1e-6) -> Tensor:
    """Q of the reduced QR of U (F, R) with diag(R) > 0 (`_qr_pos`); U unchanged if ‖U‖_F < eps_norm, jitter
    first if ‖U‖_F < eps_jitter (`_robust_qr_update`). The guards are tensor operations (no host reads);
    the jitter is drawn every call."""
    W = U if U.dtype in (torch.float32, torch.float64) else U.float()       # QR needs fp32/fp64
    fro = torch.linalg.matrix_norm(W)
    noise = torch.randn_like(W).mul_((fro < eps_jitter) * jitter_std)      # 0 unless ‖U‖_F < eps_jitter
    Q, R = torch.linalg.qr(noise.add_(W), mode="reduced")
    sign = torch.sign(torch.diagonal(R))
    Q = Q.mul_(torch.where(sign == 0, 1.0, sign)).to(U.dtype).contiguous()  # QR's Q is column-major
    return torch.where(fro < eps_norm, U, Q)


def param_count(c: PolySAEConfig) -> int:
    """Trainable parameters of PolySAE(c), counted without building it."""
    d, n = c.d_in, c.n_latents
    r1, r2, r3 = c.ranks
    return d * n + n + d + n * r1 + d * r1 + (d * r2 + 1 if c.order >= 2 else 0) + (d * r3 + 1 if c.order >= 3 else 0)


if __name__ == "__main__":
    core.demo(PolySAE(PolySAEConfig(d_in=32, n_latents=512, k=8, sparsity="topk", dead_tokens=50_000)))

"""PolySAE: a sparse autoencoder with a polynomial (third-order) decoder.

Koromilas, Demou, Oldfield, Panagakis, Nicolaou, "PolySAE: Modeling Feature Interactions in
Sparse Autoencoders via Polynomial Decoding", arXiv 2602.01322 (ICML 2026); official code
github.com/pakoromilas/PolySAE, file sae_lens/saes/polysae.py (the `--shared_u` mode that
every command in its README uses, and the one implemented here).

The encoder is the SAE's, kept linear (sae.py):

    pre = (x − b_dec) W_enc + b_enc,   z = S(pre)           x: (B, d)   z, pre: (B, F)

The decoder is a polynomial in z with a shared, orthonormal projection U:

    a  = z U                                                 a: (B, R1)   U: (F, R1), UᵀU = I
    y1 = a C1ᵀ                                               C1: (d, R1)
    y2 = (a[:, :R2] ⊙ a[:, :R2]) C2ᵀ                         C2: (d, R2)
    y3 = (a[:, :R3] ⊙ a[:, :R3] ⊙ a[:, :R3]) C3ᵀ             C3: (d, R3)
    x̂  = b_dec + y1 + λ2·y2 + λ3·y3                          λ2, λ3 learnable scalars

with nested ranks R1 ≥ R2 ≥ R3 (paper, GPT-2: 768/64/64; default here R1 = d, R2 = R3 = 64
clipped to R1). `order` 1 keeps only y1 (a factorised linear SAE), 2 adds y2, 3 adds y3.
Written out, the decoder is a symmetric CP form with the factor U tied across orders:

    y1 = Σ_i z_i D1[i],          D1 = U C1ᵀ                                     (F, d)
    y2 = Σ_ij z_i z_j Θ2[i,j],   Θ2[i,j,:] = Σ_{r≤R2} U_ir U_jr C2[:, r]        (F, F, d)
    y3 = Σ_ijk z_i z_j z_k Θ3[i,j,k],  Θ3[i,j,k,:] = Σ_{r≤R3} U_ir U_jr U_kr C3[:, r]

(the diagonal i = j is included). ‖Θ2[i,j]‖ is the "interaction weight" of latents i, j;
`interaction_matrix` computes it for a set of latents without building Θ2. D1's rows are
the decoder directions SAEBench sees (`decoder_vectors`).

Choices, each checked against the official code:
  * init: U orthogonal (nn.init.orthogonal_), C1, C2, C3 Kaiming-uniform, λ2 = −0.5,
    λ3 = +0.5. The official encoder is SAELens's: W_enc = W_decᵀ of a *placeholder*
    Kaiming-uniform W_dec (rows rescaled to norm 0.1) that the polynomial decoder never
    uses, so encoder and decoder start untied (`untied_init=True`, train.py --untied-init).
    By default W_enc = D1ᵀ with unit-norm columns, the SAE's tied init (sae.py), applied to
    the decoder actually used.
  * after every optimiser step U is re-orthonormalised: a reduced QR with the signs fixed
    so diag(R) > 0 (continuous across steps), skipped if ‖U‖_F < 1e-6, with 1e-6 jitter
    added if ‖U‖_F < 1e-4 (`orthonormalize_U`, the official `orthogonalize_U`). There is
    no W_dec and no decoder-norm constraint; the scale of each term lives in C1, C2, C3.
  * AuxK decodes the dead latents through the polynomial decoder without b_dec
    (sae.auxk_loss with `decode_nobias`; SAELens's `self.decode` also adds b_dec there).
  * `decoder_norms()` = ‖decode_nobias(e_i)‖, the full polynomial written by latent i
    alone at unit activation (official `compute_poly_decoder_norms`); it weights the L1
    of sparsity="relu". `fold_input_scale` divides C1, C2, C3 and b_dec by s.

Parameters vs a TopK SAE of the same width: U replaces W_dec, so the overhead is
C1 + C2 + C3 + λ2 + λ3 = d(R1 + R2 + R3) + 2, e.g. 688,130 (2.7 %) for GPT-2 small
(d 768, F 16384, ranks 768/64/64); see `param_count`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from sae import SAE, HostMirror, check_common, read_max, sparse_decode


@dataclass
class PolySAEConfig:
    d_in: int                     # model dimension d
    n_latents: int                # dictionary size F
    k: int = 32                   # active latents per token
    sparsity: str = "topk"        # "topk" | "batchtopk" | "relu" (sae.py)
    l1_coeff: float = 0.0         # only used by sparsity="relu"
    aux_k: int | None = None      # AuxK's k (Gao et al.'s k_aux); None → d_in // 2
    aux_coeff: float = 1 / 32     # AuxK weight; 0 disables it (the official code: 1.0)
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    input_scale: list[float] = field(default_factory=lambda: [1.0])  # x_model = x_raw · s
    ranks: tuple[int, int, int] | list[int] | None = None  # (R1, R2, R3); None → (d_in, 64, 64) clipped
    order: int = 3                 # 1 linear, 2 + quadratic, 3 + cubic
    lambda2_init: float = -0.5
    lambda3_init: float = 0.5
    untied_init: bool = False      # W_enc as the official code starts it (see the module docstring)

    def __post_init__(self):
        check_common(self)
        self.ranks = check_ranks(self.ranks, self.d_in, self.n_latents)
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")


def check_ranks(ranks, d_in: int, n_latents: int) -> tuple[int, int, int]:
    """Resolve and validate (R1, R2, R3): tuple or list (JSON), R1 ≥ R2 ≥ R3 ≥ 1, R1 ≤ F."""
    if ranks is None:
        r1 = d_in
        ranks = (r1, min(64, r1), min(64, r1))
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 3:
        raise ValueError(f"ranks must be three integers (R1, R2, R3), got {ranks!r}")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {ranks!r}")
    r1, r2, r3 = ranks
    if not r1 >= r2 >= r3:
        raise ValueError(f"ranks must satisfy R1 >= R2 >= R3, got {tuple(ranks)}")
    if r1 > n_latents:
        raise ValueError(f"R1 must be <= n_latents (U has orthonormal columns), got R1={r1} > {n_latents}")
    return (r1, r2, r3)


def param_count(config: PolySAEConfig) -> int:
    """Number of trainable parameters of PolySAE(config), counted without building it."""
    d, n = config.d_in, config.n_latents
    r1, r2, r3 = config.ranks
    count = d * n + n + d           # W_enc, b_enc, b_dec
    count += n * r1 + d * r1        # U, C1
    if config.order >= 2:
        count += d * r2 + 1         # C2, λ2
    if config.order >= 3:
        count += d * r3 + 1         # C3, λ3
    return count


def sae_param_count(d_in: int, n_latents: int) -> int:
    """Trainable parameters of the TopK SAE of the same width: W_enc, W_dec, b_enc, b_dec."""
    return 2 * d_in * n_latents + n_latents + d_in


@torch.no_grad()
def orthonormal_retraction(U: Tensor, eps_norm: float = 1e-6, eps_jitter: float = 1e-4,
                           jitter_std: float = 1e-6) -> Tensor:
    """Q of the reduced QR of U (F, R) with diag(R) > 0, i.e. U = Q R, QᵀQ = I.
    Returns U unchanged if ‖U‖_F < eps_norm; adds jitter first if ‖U‖_F < eps_jitter.
    The guards are tensor operations (a 0/1 factor on the jitter, torch.where for the skip), not
    Python ifs on ‖U‖_F, so the host never reads the device; the jitter is drawn every call."""
    W = U if U.dtype in (torch.float32, torch.float64) else U.float()  # QR needs fp32/fp64
    fro = torch.linalg.matrix_norm(W)
    noise = torch.randn_like(W).mul_((fro < eps_jitter) * jitter_std)   # 0 unless ‖U‖_F < eps_jitter
    Q, R = torch.linalg.qr(noise.add_(W), mode="reduced")
    sign = torch.sign(torch.diagonal(R))
    Q = Q.mul_(torch.where(sign == 0, 1.0, sign)).to(U.dtype).contiguous()  # QR's Q is column-major
    return torch.where(fro < eps_norm, U, Q)


class PolySAE(nn.Module):
    """The PolySAE: the SAE's linear encoder and a polynomial decoder (U, C1, C2, C3, λ2, λ3).
    A `sae.Dictionary`."""
    config_class = PolySAEConfig

    def __init__(self, config: PolySAEConfig):
        super().__init__()
        self.config = config
        d, n = config.d_in, config.n_latents
        r1, r2, r3 = config.ranks
        # the linear encoder (sae.py's)
        self.W_enc = nn.Parameter(torch.empty(d, n))                          # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(n))                             # (F,)
        self.b_dec = nn.Parameter(torch.zeros(d))                             # (d,)
        # the polynomial decoder
        self.U = nn.Parameter(nn.init.orthogonal_(torch.empty(n, r1)))       # (F, R1), UᵀU = I
        self.C1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, r1)))  # (d, R1)
        if config.order >= 2:
            self.C2 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, r2)))  # (d, R2)
            self.lambda2 = nn.Parameter(torch.tensor(float(config.lambda2_init)))
        if config.order >= 3:
            self.C3 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, r3)))  # (d, R3)
            self.lambda3 = nn.Parameter(torch.tensor(float(config.lambda3_init)))
        # state, as the SAE's: the dead-latent counter (and its host-side bound), BatchTopK's θ
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.dead_bound = HostMirror(read_max, self.tokens_since_fired, 0)
        self.register_buffer("threshold", torch.tensor(-1.0))
        with torch.no_grad():
            if config.untied_init:    # official: W_enc = W_decᵀ of an unused Kaiming-uniform W_dec, rows at 0.1
                W_FD = nn.init.kaiming_uniform_(torch.empty(n, d))
                self.W_enc.copy_((0.1 * W_FD / W_FD.norm(dim=-1, keepdim=True)).T)
            else:                     # tied: W_enc = D1ᵀ with unit-norm columns
                D1_FD = self.U @ self.C1.T
                self.W_enc.copy_((D1_FD / D1_FD.norm(dim=-1, keepdim=True).clamp_min(1e-8)).T)

    # -- the encoder, the forward pass and b_dec's init are the SAE's (sae.py), used as they are
    encoder_linear = SAE.encoder_linear
    pre_acts = SAE.pre_acts
    decoder_scale = SAE.decoder_scale
    encode = SAE.encode
    decode = SAE.decode
    forward = SAE.forward
    loss = SAE.loss
    _check_input = SAE._check_input
    init_b_dec = SAE.init_b_dec
    dead_fraction = SAE.dead_fraction

    # -- the polynomial decoder ------------------------------------------------------------
    def polynomial(self, a_BR: Tensor) -> Tensor:
        """The decoder on projections a = z U (B, R1) → y1 + λ2·y2 + λ3·y3 (B, d)."""
        c = self.config
        _, r2, r3 = c.ranks
        y_BD = a_BR @ self.C1.T
        if c.order >= 2:
            y_BD = y_BD + self.lambda2 * (a_BR[:, :r2].pow(2) @ self.C2.T)
        if c.order >= 3:
            y_BD = y_BD + self.lambda3 * (a_BR[:, :r3].pow(3) @ self.C3.T)
        return y_BD

    def decode_nobias(self, z_BF: Tensor) -> Tensor:
        """y1 + λ2·y2 + λ3·y3 (no b_dec); z: (B, F) → (B, d)."""
        return self.polynomial(sparse_decode(z_BF, self.U))  # a = z U, reading only active rows

    def decoder_vectors(self) -> Tensor:
        """(F, d) the linear term D1 = U C1ᵀ: latent i's direction (SAEBench normalises it)."""
        return self.U @ self.C1.T

    def decoder_norms(self) -> Tensor:
        """(F,) ‖decode_nobias(e_i)‖ = ‖D1[i] + λ2 (U[i,:R2]²) C2ᵀ + λ3 (U[i,:R3]³) C3ᵀ‖
        (a one-hot z_i = 1 has projection a = U[i])."""
        return self.polynomial(self.U).norm(dim=-1)

    # -- interactions ----------------------------------------------------------------------
    def _check_quadratic(self) -> None:
        if self.config.order < 2:
            raise ValueError(f"interaction weights need order >= 2, got order={self.config.order}")

    @torch.no_grad()
    def interaction_weight(self, i: int, j: int) -> float:
        """‖Θ2[i, j, :]‖ = ‖Σ_{r≤R2} U_ir U_jr C2[:, r]‖ (the i, j term of y2 is 2λ2 z_i z_j Θ2[i,j])."""
        self._check_quadratic()
        r2 = self.config.ranks[1]
        return ((self.U[i, :r2] * self.U[j, :r2]) @ self.C2.T).norm().item()

    @torch.no_grad()
    def interaction_matrix(self, idx: Tensor | list[int]) -> Tensor:
        """(n, n) matrix of ‖Θ2[i, j, :]‖ for latents idx (n,), via the Gram matrix G = C2ᵀC2:
        ‖Θ2[i,j]‖² = Σ_rs U_ir U_jr U_is U_js G_rs; cost n²R2², memory nR2² (no n²d tensor)."""
        self._check_quadratic()
        r2 = self.config.ranks[1]
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.U.device)
        V_NR = self.U[idx, :r2]
        G_RR = self.C2.T @ self.C2
        outer_NRR = V_NR[:, :, None] * V_NR[:, None, :]
        sq_NN = (outer_NRR * G_RR).flatten(1) @ outer_NRR.flatten(1).T
        return sq_NN.clamp_min(0).sqrt()

    # -- upkeep around the optimiser step --------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Nothing to do: there is no unit-norm W_dec (U is retracted after the step)."""

    @torch.no_grad()
    def orthonormalize_U(self) -> None:
        """Project U back onto UᵀU = I (QR with positive diag(R), with the official guards)."""
        self.U.copy_(orthonormal_retraction(self.U))

    @torch.no_grad()
    def after_step(self) -> None:
        self.orthonormalize_U()

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Take raw activations: with x = s·x_raw, W_enc ← s W_enc, and since every y_n is
        linear in C_n, C_n ← C_n / s and b_dec ← b_dec / s give x̂_raw = x̂ / s."""
        (s,) = self.config.input_scale
        self.W_enc *= s
        self.b_dec /= s
        for name in ("C1", "C2", "C3"):
            if hasattr(self, name):
                getattr(self, name).div_(s)
        self.config.input_scale = [1.0]


def demo_model(d_in: int, n_layers: int = 1) -> PolySAE:
    """The model `python polysae.py` trains on toy data (synthetic.demo)."""
    return PolySAE(PolySAEConfig(d_in=d_in, n_latents=512, k=8, dead_tokens=50_000))


if __name__ == "__main__":
    from sae import train_step
    from synthetic import demo   # toy data with known atoms

    demo(demo_model, train_step)

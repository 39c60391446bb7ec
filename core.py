"""What every dictionary shares, in the order a reader needs it: the base config, the interface the four
dictionaries provide, the loss and the training step, the sparsifiers, dead latents and AuxK, decoding and
b_dec. Then one labelled section, "Speed and scale", holds what makes it fast or run on several GPUs
without changing the maths (the sparse encoder backward, host-side mirrors of device counters, torchrun
reductions), and last the toy-data demo that `python sae.py` runs.

A dictionary encodes x (B, d), or (B, L, d) for the crosscoders, into sparse latents z (B, F):

    pre = h Wᵀ + b            the encoder's last linear map, `encoder_linear(x) → (h, W, b)`
    z   = S(pre)              S a sparsifier, z (B, F) with k non-zeros per row on average
    x̂   = decode_nobias(z) + b_dec

S is one of (`sparsify`, one path for training and inference):
  topk       ReLU, then the k largest entries of each row (Gao et al. 2024, arXiv 2406.04093).
  batchtopk  ReLU, then the B·k largest of the whole batch (Bussmann et al. 2024, arXiv 2412.06410);
             at inference z = pre · 1[pre > θ], θ an EMA of the smallest kept score in training
             (per-row TopK while θ is uncalibrated, θ < 0). When the input is corrupted (crosscoder layer
             masking: x_in ≠ target), θ is the smallest score the selection would keep on the batch's
             clean rows alone, so that inference on clean inputs fires k latents per token on average.
  relu       ReLU, with the L1 penalty λ Σ_f z_f ‖d_f‖ in the loss (the classic SAE).
  jumprelu   inference only (SAEs imported from SAELens, support/saelens.py): z = ReLU(pre) · 1[pre > θ_f]
             with a per-latent threshold θ (F,), strict >, as SAELens's JumpReLUSAE. Never trained here.
Entries are chosen by score = pre · decoder_scale() (crosscoders: Σ_l ‖W_dec[f, l]‖; None for 1) and
the unscaled ReLU(pre) is decoded. TopK and training-time BatchTopK give a `Selection`: N = B·k
flat indices and values, a fixed size, so a training step never waits for the device.

Loss (AuxK: Gao et al. 2024, arXiv 2406.04093, its dead-latent auxiliary loss), per batch of B tokens, e = (x − x̂).detach():
    mse  = mean_b Σ (x − x̂)²                      summed over d (and layers), mean over tokens
    auxk = min(n_dead / aux_k, 1) · mean_b Σ (e − ê)²,  ê decodes (without b_dec) the aux_k largest
           pre-activations among the dead latents (not fired for `dead_tokens` tokens)
    loss = mse + aux_coeff · auxk  (+ l1_coeff · L1 for relu)

The interface (`Dictionary`, below) is what forward_with_losses, train_step and the entry points use of
a model; sae.SAE, crosscoder.CrossCoder, fmxcoder.FMXCoder and polysae.PolySAE provide it. This file
imports only torch, so a model file works copied with it alone; `python sae.py` runs `demo`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

SPARSITIES = ("topk", "batchtopk", "relu")
INFERENCE_ONLY = ("jumprelu",)        # loaded (support/saelens.py), evaluated, saved; refused in training


def opt(default, help: str):
    """A dataclass field with its --help text (entry points derive their flags from the fields)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DictConfig:
    """The fields every dictionary shares. `check(name)` names each field through `name`, so the
    command line reports --n-latents where a library caller sees n_latents."""
    d_in: int                                                   # model width d (from the data, not a flag)
    n_latents: int = opt(2048, "dictionary size F (paper: 16384)")
    k: int = opt(32, "active latents per token (TopK / BatchTopK; paper: 64)")
    sparsity: str = opt("batchtopk", "topk | batchtopk | relu (ReLU + L1)")
    l1_coeff: float = opt(0.0, "L1 weight, for --sparsity relu")
    aux_k: int | None = opt(None, "latents AuxK selects per token (default d/2)")
    aux_coeff: float = opt(1 / 32, "AuxK weight (OpenAI: 1/32; 0 disables it)")
    dead_tokens: int = opt(100_000, "tokens without firing before a latent counts as dead (OpenAI: 10M)")
    input_scale: list[float] | None = None                      # per layer, x_model = s · x_raw; None → ones

    def __post_init__(self):
        self.check()
        n = getattr(self, "n_layers", 1)
        self.input_scale = [float(s) for s in (self.input_scale or [1.0] * n)]
        if len(self.input_scale) != n:
            raise ValueError(f"input_scale must hold {n} floats (one per layer), got {len(self.input_scale)}")
        if self.aux_k is None:
            self.aux_k = max(1, self.d_in // 2)

    def check(self, name=str) -> None:
        """ValueError for a bad field (self may be any object with the fields: the CLI checks its flags)."""
        for f in ("d_in", "n_latents", "k", "dead_tokens") + (("aux_k",) if self.aux_k is not None else ()):
            v, least = getattr(self, f), 0 if f == "dead_tokens" else 1    # dead_tokens 0: every latent is dead
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"{name(f)} must be {'an integer >= 0' if least == 0 else 'a positive integer'}, "
                                 f"got {v!r}")
        if self.k >= self.n_latents:
            raise ValueError(f"{name('k')} must be smaller than {name('n_latents')}, got k={self.k} >= "
                             f"n_latents={self.n_latents}")
        if self.sparsity not in SPARSITIES + INFERENCE_ONLY:
            raise ValueError(f"{name('sparsity')} must be one of {', '.join(SPARSITIES)}, got {self.sparsity!r}")
        for f in ("l1_coeff", "aux_coeff"):
            if not (isinstance(getattr(self, f), (int, float)) and 0 <= getattr(self, f) < math.inf):
                raise ValueError(f"{name(f)} must be a finite number >= 0, got {getattr(self, f)}")


def inference_only(sparsity: str) -> str:
    """The one-line refusal of training an inference-only sparsity."""
    return f"{sparsity} is inference only: SAEs imported from SAELens (support/saelens.py) are never trained here"


# ----------------------------------------------------------------------------------------
# The interface and the loss: what train_step runs, for every dictionary
# ----------------------------------------------------------------------------------------


class Output(NamedTuple):
    """What every dictionary's forward returns."""
    recon: Tensor      # x̂, same shape as x
    latents: Tensor    # z (B, F), sparse
    pre_acts: Tensor   # (B, F), before ReLU and the sparsifier
    loss: Tensor       # mse + aux_coeff·auxk (+ l1_coeff·l1)
    mse: Tensor        # mean over tokens of Σ (x − x̂)² over d (and layers)
    auxk: Tensor       # AuxK loss (0 when off, in eval mode, or when nothing is dead)
    l1: Tensor         # Σ_f z_f, decoder-norm-weighted for sparsity="relu", per token, mean


@runtime_checkable
class Dictionary(Protocol):
    """What a dictionary provides (x (B, d), or (B, L, d) for crosscoders; z and pre (B, F))."""
    config: Any                 # a DictConfig (+ n_layers for crosscoders)
    training: bool              # nn.Module's: AuxK, the dead counter and θ update only in training
    b_dec: Tensor               # (d,) or (L, d)
    tokens_since_fired: Tensor  # buffer (F,), threshold: buffer () or (F,) (jumprelu), dead (init_state)
    threshold: Tensor
    dead: DeadLatents

    def encoder_linear(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]: """(h, W, b), pre = h Wᵀ + b."""
    def decoder_scale(self) -> Tensor | None: """(F,) selection score scale, None for 1."""
    def decode_nobias(self, z: Selection | Tensor) -> Tensor: """x̂ − b_dec."""
    def decoder_vectors(self) -> Tensor: """(F, d) or (F, L, d): what each latent writes."""
    def decoder_norms(self) -> Tensor: """(F,) or (F, L): its norm at unit activation."""
    def init_b_dec(self, x: Tensor, method: str = "median") -> None: """b_dec from data."""
    def before_step(self) -> None: """After backward, before the optimiser step."""
    def after_step(self) -> None: """After the optimiser step (renormalise, re-orthonormalise)."""
    def fold_input_scale(self) -> None: """Fold config.input_scale into the weights (raw inputs)."""


def forward_with_losses(model, x_in: Tensor, target: Tensor) -> Output:
    """Encode x_in, decode, score against `target` (crosscoders: the clean layers while x_in may be
    masked); in training also AuxK, the dead counter and θ. The two speed decisions are named where they
    are taken, each with its plain equivalent ("Speed and scale" below)."""
    c = model.config
    if model.training and c.sparsity in INFERENCE_ONLY:
        raise ValueError(inference_only(c.sparsity) + " (call model.eval() to use it)")
    enc = model.encoder_linear(x_in)                      # (h, W, b): pre = h Wᵀ + b
    with torch.no_grad():
        scale_F = model.decoder_scale()                   # selection only: no gradient through it
    fixed = c.sparsity == "topk" or (c.sparsity == "batchtopk" and model.training)    # z is a Selection
    # speed: the backward reaches (h, W, b) through SparseEncoderGrad (N·D multiply-adds, not B·F·D);
    # plain equivalent: pre_BF = F.linear(*enc) under autograd, what runs wherever sparse_bw is False
    sparse_bw = fixed and use_sparse_backward(enc[0].device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse_bw):
        pre_BF = F.linear(*enc)
    z = sparsify(pre_BF, c.sparsity, c.k, model.training, model.threshold, scale_F, enc, sparse_bw)
    z_BF = dense(z)
    if fixed:
        l1 = z.vals.sum() / z_BF.shape[0]
    elif c.sparsity == "relu":
        w_F = model.decoder_scale()
        l1 = (z_BF * (model.decoder_norms() if w_F is None else w_F)).sum(-1).mean()
    else:
        l1 = z_BF.sum(-1).mean()
    recon = model.decode_nobias(z) + model.b_dec
    mse = F.mse_loss(recon, target, reduction="sum") / recon.shape[0]
    auxk = mse.new_zeros(())
    if model.training:
        counter_F = model.tokens_since_fired
        # speed: a host-side bound on max(counter_F) (DeadLatents), so no step reads the device; plain
        # equivalent: bound, n_aux = int(counter_F.max()), c.aux_k (one host read per step)
        bound, n_aux = model.dead.aux_size(counter_F, c.aux_k)
        if c.aux_coeff > 0 and c.sparsity != "relu" and bound >= c.dead_tokens and n_aux > 0:
            dead_F = counter_F >= c.dead_tokens
            idx_A, keep_A = auxk_indices(pre_BF.detach(), dead_F, n_aux)
            z_aux = Selection(idx_A, selected_values(enc, pre_BF, idx_A, keep_A, sparse_bw), tuple(pre_BF.shape))
            auxk = auxk_loss(z_aux, dead_F, target - recon, model.decode_nobias, c.aux_k)
        update_dead_counter(counter_F, z)
        model.dead.advance(counter_F, bound, z_BF.shape[0])
        if c.sparsity == "batchtopk":
            if x_in is target:
                update_threshold(model.threshold, z, scale_F)
            else:      # masked inputs: θ serves clean inputs, so it is measured on the rows that are clean
                clean_B = (x_in == target).flatten(1).all(-1)
                ema_threshold_(model.threshold, clean_rows_threshold(scores(pre_BF.detach(), scale_F), clean_B, c.k))
    loss = mse + c.aux_coeff * auxk + (c.l1_coeff * l1 if c.sparsity == "relu" else 0.0)
    return Output(recon, z_BF, pre_BF, loss, mse, auxk, l1)


def train_step(model, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float = 1.0, forward=None,
               autocast=None) -> Output:
    """Forward with the losses (through `forward`, e.g. a DDP wrapper, under `autocast`), backward,
    model.before_step, clipping, the optimiser step, model.after_step. Reads nothing from the device."""
    with autocast if autocast is not None else contextlib.nullcontext():
        out = (forward or model)(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    model.before_step()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    model.after_step()
    return out


def pre_acts(model, x: Tensor) -> Tensor:
    return F.linear(*model.encoder_linear(x))


def encode(model, x: Tensor) -> Tensor:
    """Dense z (B, F) as inference computes it."""
    return latents_of(model, pre_acts(model, x))


def latents_of(model, pre_BF: Tensor) -> Tensor:
    """Dense z (B, F) = S(pre) for given pre-activations (B, F)."""
    c = model.config
    with torch.no_grad():
        scale_F = model.decoder_scale()
    return dense(sparsify(pre_BF, c.sparsity, c.k, model.training, model.threshold, scale_F))


# ----------------------------------------------------------------------------------------
# Sparsifiers: Selection (fixed size, no host reads) and the dense forms
# ----------------------------------------------------------------------------------------


class Selection(NamedTuple):
    """z (B, F) as N selected entries: z[b, f] = vals[n] at idx[n] = b·F + f (ascending), 0 elsewhere."""
    idx: Tensor                  # (N,) int64
    vals: Tensor                 # (N,) differentiable; a selected entry may hold 0
    shape: tuple[int, int]       # (B, F)

    def dense(self) -> Tensor:
        B, F_ = self.shape
        return self.vals.new_zeros(B * F_).scatter_(0, self.idx, self.vals).view(B, F_)

    def offsets(self) -> Tensor:
        """(B,) where each token's entries start in idx (for F.embedding_bag)."""
        B, F_ = self.shape
        return torch.searchsorted(self.idx, torch.arange(B, device=self.idx.device) * F_)


def dense(z: Selection | Tensor) -> Tensor:
    return z.dense() if isinstance(z, Selection) else z


def scores(pre_BF: Tensor, scale_F: Tensor | None = None) -> Tensor:
    """pre × the per-latent scale. Selecting on pre rather than ReLU(pre) picks the same positive entries."""
    return pre_BF if scale_F is None else pre_BF * scale_F


@torch.no_grad()
def topk_indices(score_BF: Tensor, k: int) -> Tensor:
    """(B·k,) sorted flat indices of the k largest scores of each row."""
    B, F_ = score_BF.shape
    idx_BK = score_BF.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return (idx_BK + F_ * torch.arange(B, device=idx_BK.device)[:, None]).flatten()


@torch.no_grad()
def batch_topk_indices(score_BF: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """Sorted flat indices of the B·k largest scores of the batch, and a keep mask (None in one process).
    Under torch.distributed the batch is the global one: each rank offers its local top-(world·B·k), an
    entry is kept when it reaches the (world·B·k)-th largest of all offers (a fixed size again)."""
    n_keep = min(k * score_BF.shape[0], score_BF.numel())
    flat = score_BF.flatten()
    if world_size() > 1:
        local = flat.topk(min(n_keep * world_size(), flat.numel()))
        gathered = [torch.empty_like(local.values) for _ in range(world_size())]
        torch.distributed.all_gather(gathered, local.values)
        kth = torch.cat(gathered).topk(n_keep * world_size()).values.min()
        idx, order = local.indices.sort()
        return idx, local.values[order] >= kth
    return flat.topk(n_keep, sorted=False).indices.sort().values, None


def select(pre_BF: Tensor, sparsity: str, k: int, scale_F: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The fixed-size selection of "topk" or "batchtopk" (training): (sorted flat indices, keep or None)."""
    score_BF = scores(pre_BF.detach(), scale_F)
    return (topk_indices(score_BF, k), None) if sparsity == "topk" else batch_topk_indices(score_BF, k)


def selected_values(enc, pre_BF: Tensor, idx_N: Tensor, keep_N: Tensor | None, sparse_backward: bool = False) -> Tensor:
    """ReLU(pre) at the selected entries (× keep); the gradient reaches enc = (h, W, b) through
    SparseEncoderGrad if `sparse_backward` (pre then carries no graph), else through pre's own graph."""
    raw_N = SparseEncoderGrad.apply(*enc, pre_BF, idx_N) if sparse_backward else pre_BF.reshape(-1).gather(0, idx_N)
    vals_N = F.relu(raw_N)
    return vals_N if keep_N is None else vals_N * keep_N


def sparsify(pre_BF: Tensor, sparsity: str, k: int, training: bool, threshold: Tensor,
             scale_F: Tensor | None = None, enc=None, sparse_backward: bool = False) -> Selection | Tensor:
    """z = S(pre): a Selection for TopK and training-time BatchTopK, a dense (B, F) tensor otherwise.
    BatchTopK at inference computes both TopK and the θ cut and picks with torch.where (θ < 0: not
    calibrated yet), so encoding never reads θ on the host."""
    if sparsity == "topk" or (sparsity == "batchtopk" and training):
        idx_N, keep_N = select(pre_BF, sparsity, k, scale_F)
        return Selection(idx_N, selected_values(enc, pre_BF, idx_N, keep_N, sparse_backward), tuple(pre_BF.shape))
    if sparsity == "jumprelu":          # threshold (F,); the same rule in training and eval (never trained)
        return F.relu(pre_BF) * (pre_BF > threshold)
    if sparsity == "batchtopk":
        acts_BF = F.relu(pre_BF)
        jump_BF = acts_BF * (scores(acts_BF, scale_F) > threshold)
        return torch.where(threshold < 0, sparsify(pre_BF, "topk", k, False, threshold, scale_F).dense(), jump_BF)
    return F.relu(pre_BF)


@torch.no_grad()
def update_threshold(threshold: Tensor, z: Selection | Tensor, scale_F: Tensor | None = None,
                     momentum: float = 0.01) -> None:
    """EMA (in place) of the smallest kept score of a BatchTopK batch; the first batch sets it, a batch
    that keeps nothing leaves it. No host reads."""
    cols, vals = (z.idx % z.shape[1], z.vals) if isinstance(z, Selection) else (
        torch.arange(z.shape[1], device=z.device).expand_as(z), z)
    score = vals if scale_F is None else vals * scale_F[cols]
    ema_threshold_(threshold, torch.where(vals > 0, score, torch.inf).amin(), momentum)


@torch.no_grad()
def ema_threshold_(threshold: Tensor, smallest: Tensor, momentum: float = 0.01) -> None:
    """θ ← EMA of `smallest` (min over ranks; the first finite value sets θ, an infinite one leaves it)."""
    smallest = all_reduce(smallest.to(threshold.dtype), "min")
    new = torch.where(threshold < 0, smallest, torch.lerp(threshold, smallest, momentum))
    threshold.copy_(torch.where(torch.isfinite(smallest), new, threshold))


@torch.no_grad()
def clean_rows_threshold(score_BF: Tensor, clean_B: Tensor, k: int) -> Tensor:
    """The smallest positive score BatchTopK would keep on the clean rows of a batch alone: among the rows
    where clean_B (B,) holds, the (n_clean·k)-th largest score (or the smallest positive one above it); inf
    when no row is clean. Fixed sizes (a top-B·k over all rows, the masked ones at −inf), no host reads."""
    B = score_BF.shape[0]
    top = torch.where(clean_B[:, None], score_BF, -torch.inf).flatten().topk(min(k * B, score_BF.numel())).values
    n = clean_B.sum() * k
    kept = (torch.arange(len(top), device=top.device) < n) & (top > 0)
    return torch.where(kept, top, torch.inf).amin()


# ----------------------------------------------------------------------------------------
# Dead latents and AuxK
# ----------------------------------------------------------------------------------------


def init_state(model, n_latents: int) -> None:
    """The state every dictionary keeps besides its weights: the dead counter (with its host side) and
    BatchTopK's inference threshold θ (< 0: not calibrated), or for "jumprelu" the per-latent θ (F,)."""
    model.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
    per_latent = getattr(model.config, "sparsity", None) in INFERENCE_ONLY
    model.register_buffer("threshold", torch.zeros(n_latents) if per_latent else torch.tensor(-1.0))
    model.dead = DeadLatents(model.tokens_since_fired)


@torch.no_grad()
def update_dead_counter(tokens_since_fired_F: Tensor, z: Selection | Tensor) -> None:
    """Add the batch's tokens to every counter; reset those of latents that fired anywhere (on any rank)."""
    if isinstance(z, Selection):
        fired_F = torch.zeros_like(tokens_since_fired_F, dtype=torch.int32).scatter_reduce_(
            0, z.idx % z.shape[1], (z.vals > 0).to(torch.int32), "amax")
    else:
        fired_F = (z > 0).any(dim=0).to(torch.int32)
    all_reduce(fired_F, "max")
    tokens_since_fired_F += z.shape[0] * world_size()
    tokens_since_fired_F.masked_fill_(fired_F.bool(), 0)


@torch.no_grad()
def auxk_indices(pre_BF: Tensor, dead_F: Tensor, aux_k: int) -> tuple[Tensor, Tensor]:
    """Per token the min(aux_k, F) largest pre-activations among dead latents, and keep = "is dead"."""
    idx_N = topk_indices(torch.where(dead_F, pre_BF, -torch.inf), min(aux_k, pre_BF.shape[1]))
    return idx_N, dead_F[idx_N % pre_BF.shape[1]]


def auxk_loss(z_aux: Selection, dead_F: Tensor, residual: Tensor, decode_fn, aux_k: int) -> Tensor:
    """min(n_dead/aux_k, 1) · mean_b Σ (residual − decode_fn(z_aux))²; decode_fn decodes without b_dec."""
    err = residual.detach() - decode_fn(z_aux)
    return (dead_F.sum() / aux_k).clamp(max=1.0) * err.pow(2).flatten(1).sum(-1).mean()


# ----------------------------------------------------------------------------------------
# Decoding, b_dec and small shared functions
# ----------------------------------------------------------------------------------------


def sparse_decode(z: Selection | Tensor, W_FX: Tensor) -> Tensor:
    """z @ W reading only the active rows of W (F.embedding_bag): k·X instead of F·X per token. A dense z
    is scanned with nonzero() (a host sync: evaluation only); beyond 1/8 active, the dense product."""
    if isinstance(z, Selection):
        B, F_ = z.shape
        if len(z.idx) > B * F_ // 8:
            return z.dense().to(W_FX.dtype) @ W_FX
        return F.embedding_bag(z.idx % F_, W_FX, z.offsets(), mode="sum", per_sample_weights=z.vals.to(W_FX.dtype))
    rows, cols = z.nonzero(as_tuple=True)
    if len(rows) > z.numel() // 8:
        return z.to(W_FX.dtype) @ W_FX
    counts = torch.bincount(rows, minlength=z.shape[0])
    return F.embedding_bag(cols, W_FX, torch.cumsum(counts, 0) - counts, mode="sum",
                           per_sample_weights=z[rows, cols].to(W_FX.dtype))


@torch.no_grad()
def geometric_median(x_ND: Tensor, iters: int = 100, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm for argmin_m Σ_n ‖x_n − m‖, from the mean."""
    m_D = x_ND.mean(0)
    for _ in range(iters):
        w_N = 1.0 / (x_ND - m_D).norm(dim=-1).clamp_min(eps)
        m_new = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
        if (m_new - m_D).norm() <= 1e-6 * m_D.norm().clamp_min(eps):
            return m_new
        m_D = m_new
    return m_D


@torch.no_grad()
def set_b_dec(b_dec: Tensor, x_ND: Tensor, method: str = "median") -> None:
    """b_dec from a data sample (N, d): "median" (geometric), "mean", or "zero" (keep 0, as SAELens)."""
    if method not in ("median", "mean", "zero"):
        raise ValueError(f"b_dec init must be 'median', 'mean' or 'zero', got {method!r}")
    if method != "zero":
        b_dec.copy_(geometric_median(x_ND.float()) if method == "median" else x_ND.float().mean(0))


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean_batch(x)‖² on one batch (metrics.py accumulates over many)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def dead_fraction(model) -> float:
    """The fraction of latents that have not fired for config.dead_tokens tokens (one host read)."""
    return (model.tokens_since_fired >= model.config.dead_tokens).float().mean().item()


def is_multilayer(model) -> bool:
    """Crosscoders and fmxcoders read (B, L, d) (their config has n_layers); SAEs and PolySAEs (B, d)."""
    return hasattr(model.config, "n_layers")


def check_input(model, x: Tensor) -> None:
    c = model.config
    want = (c.n_layers, c.d_in) if is_multilayer(model) else (c.d_in,)
    if tuple(x.shape[1:]) != want or x.ndim != len(want) + 1:
        raise ValueError(f"{type(model).__name__} expects x of shape (B, {', '.join(map(str, want))}), "
                         f"got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------
# Speed and scale: none of this changes what is computed; each piece has a plain equivalent,
# named where forward_with_losses uses it, and a test that compares the two
# (tests/test_sparse_backward.py, tests/test_distributed.py)
# ----------------------------------------------------------------------------------------


# Sparse backward. The loss reads pre only at the N selected entries, so G = ∂L/∂pre has N non-zeros g_n
# at (b_n, f_n), and  ∂L/∂h[b] = Σ_{n: b_n=b} g_n W[f_n],  ∂L/∂W[f] = Σ_{n: f_n=f} g_n h[b_n],
# ∂L/∂b[f] = Σ_{n: f_n=f} g_n:  N·D multiply-adds instead of B·F·D (`SparseEncoderGrad`; the selection is
# piecewise constant, so its own derivative is 0). The (h, W, b) triple of `encoder_linear` exists so that
# this one backward covers every encoder: the SAE's, the crosscoder's layers side by side, and the last
# contraction of a factorised one. The dense autograd path is the reference.
#
# Does a TopK/BatchTopK step use SparseEncoderGrad ("<type>+autocast" under torch.autocast)? The faster
# path measured by bench/bench_train.py: CPU sparse (1.3-2x), H200 float32 sparse (1.24-1.55x), H200 under
# bfloat16 autocast dense (the sparse path 0.74-0.97x). Set e.g. core.SPARSE_BACKWARD["cuda"] = False.
SPARSE_BACKWARD = {"cpu": True, "cuda": True, "cuda+autocast": False}


def use_sparse_backward(device: torch.device) -> bool:
    """Whether a fixed-size selection's backward goes through SparseEncoderGrad here (SPARSE_BACKWARD)."""
    key = device.type + ("+autocast" if torch.is_autocast_enabled(device.type) else "")
    return torch.is_grad_enabled() and SPARSE_BACKWARD.get(key, SPARSE_BACKWARD.get(device.type, False))


class SparseEncoderGrad(torch.autograd.Function):
    """v = pre.flatten()[idx] for pre = h Wᵀ + b computed without autograd, with the sparse backward of the
    module docstring. h (B, D), W (F, D), b (F,), idx (N,) sorted (repeats add up). Gradients are computed
    in W's dtype (float32 under bfloat16 autocast) and returned in each input's dtype."""

    @staticmethod
    def forward(ctx, h_BD: Tensor, W_FD: Tensor, b_F: Tensor, pre_BF: Tensor, idx_N: Tensor) -> Tensor:
        ctx.save_for_backward(h_BD, W_FD, idx_N)
        ctx.shape, ctx.b_dtype = tuple(pre_BF.shape), b_F.dtype
        return pre_BF.reshape(-1).gather(0, idx_N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_N: Tensor):
        h_BD, W_FD, idx_N = ctx.saved_tensors
        (B, F_), dev = ctx.shape, idx_N.device
        W_rows, h_rows = W_FD.contiguous(), h_BD.to(W_FD.dtype).contiguous()  # row gathers need contiguous rows
        g_N = g_N.to(W_FD.dtype)
        rows_N, cols_N = idx_N // F_, idx_N % F_
        grad_h = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:        # ∂L/∂h[b] = Σ_{n: b_n=b} g_n W[f_n] (each token's entries contiguous)
            starts_B = torch.searchsorted(idx_N, torch.arange(B, device=dev) * F_)
            grad_h = F.embedding_bag(cols_N, W_rows, starts_B, mode="sum", per_sample_weights=g_N).to(h_BD.dtype)
        if ctx.needs_input_grad[1]:        # ∂L/∂W[f] = Σ_{n: f_n=f} g_n h[b_n] (entries grouped by latent)
            by_latent_N, order_N = cols_N.sort()
            starts_F = torch.searchsorted(by_latent_N, torch.arange(F_, device=dev))
            grad_W = F.embedding_bag(rows_N[order_N], h_rows, starts_F, mode="sum", per_sample_weights=g_N[order_N])
        if ctx.needs_input_grad[2]:        # ∂L/∂b[f] = Σ_{n: f_n=f} g_n
            grad_b = torch.zeros(F_, dtype=ctx.b_dtype, device=dev).index_add_(0, cols_N, g_N.to(ctx.b_dtype))
        return grad_h, grad_W, grad_b, None, None


class HostMirror:
    """An integer the host keeps about a buffer, so that a step can branch on it without reading the
    device: trusted while the buffer is the tensor it was recorded with (same storage and version, which
    every in-place write such as load_state_dict bumps), else recomputed once with `read`."""

    def __init__(self, read, buf: Tensor, value: int):
        self.read = read
        self.set(buf, value)

    def set(self, buf: Tensor, value: int) -> None:
        self.key, self.value = (buf.data_ptr(), buf._version), value

    def get(self, buf: Tensor) -> int:
        if self.key != (buf.data_ptr(), buf._version):
            self.set(buf, self.read(buf))
        return self.value


class DeadLatents:
    """What the host knows of a dictionary's dead counter `tokens_since_fired` (F,): `bound` ≥ its max
    (advanced by every step without a read), and `aux_limit` = (n, until): after a `refresh`, at most n
    latents can be dead while the bound stays below `until`, so AuxK selects min(aux_k, n) entries per
    token instead of aux_k (the others would be masked out). train.py's checkpoints keep aux_limit
    (support/runs.py, checkpoint_state). The plain equivalent: read int(counter_F.max()) every step."""

    def __init__(self, counter_F: Tensor):
        self.bound, self.aux_limit = HostMirror(lambda t: int(t.max()), counter_F, 0), None

    def refresh(self, counter_F: Tensor, dead_tokens: int, horizon_tokens: int) -> None:
        """One host read, where the host waits anyway (train.py's --log-every readings)."""
        top = int(counter_F.max())
        self.bound.set(counter_F, top)
        self.aux_limit = (int((counter_F >= dead_tokens - horizon_tokens).sum()), top + horizon_tokens)

    def aux_size(self, counter_F: Tensor, aux_k: int) -> tuple[int, int]:
        """(bound ≥ max(counter_F), the entries per token AuxK needs select), without a device read."""
        bound = self.bound.get(counter_F)
        return bound, self.n_aux(aux_k, bound)

    def advance(self, counter_F: Tensor, bound: int, tokens: int) -> None:
        """After update_dead_counter added this step's tokens (on every rank) to counter_F."""
        self.bound.set(counter_F, bound + tokens * world_size())

    def n_aux(self, aux_k: int, bound: int) -> int:
        n, until = self.aux_limit if self.aux_limit is not None else (aux_k, math.inf)
        return min(aux_k, n) if bound < until else aux_k


# torchrun: BatchTopK's batch, the dead counter and θ are the global batch's; in one process these are no-ops.


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: Tensor, op: str) -> Tensor:
    """In place across data-parallel ranks ("min" | "max" | "sum"); a no-op in one process."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, getattr(torch.distributed.ReduceOp, op.upper()))
    return t


# ----------------------------------------------------------------------------------------
# The demo: `python <model file>.py`
# ----------------------------------------------------------------------------------------


def demo(model, steps: int = 400, batch: int = 512, lr: float = 3e-3, seed: int = 0) -> dict:
    """What `python <model file>.py` runs: train `model` on toy activations of L layers (the model's, or 4
    of which a single-layer model reads the first) made of 256 known unit atoms (128 present in every
    layer, 128 in one random layer; each fires with probability 0.02, magnitude U(0.5, 1.5), plus noise
    0.01), and print the held-out FVU, L0 and the fraction of the atoms the model sees that some latent's
    decoder vector matches (cosine > 0.9)."""
    g, c, multi = torch.Generator().manual_seed(seed), model.config, is_multilayer(model)
    L = c.n_layers if multi else 4
    profile_NL = torch.ones(256, L)
    profile_NL[128:] = F.one_hot(torch.randint(L, (128,), generator=g), L).float()
    atoms_NLD = torch.randn(256, L, c.d_in, generator=g)
    atoms_NLD = atoms_NLD / atoms_NLD.norm(dim=-1, keepdim=True) * profile_NL[..., None]
    seen_NX = atoms_NLD.flatten(1) if multi else atoms_NLD[profile_NL[:, 0] > 0, 0]   # what the model can see

    def sample(n: int) -> Tensor:
        codes_BN = (torch.rand(n, 256, generator=g) < 0.02) * (0.5 + torch.rand(n, 256, generator=g))
        x_BLD = torch.einsum("bn,nld->bld", codes_BN, atoms_NLD) + 0.01 * torch.randn(n, L, c.d_in, generator=g)
        return x_BLD if multi else x_BLD[:, 0]

    t0 = time.time()
    model.init_b_dec(sample(2048), "mean")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        train_step(model, opt, sample(batch))
    model.eval()
    with torch.no_grad():
        x = sample(4096)
        out = model(x)
    unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # noqa: E731
    cos_NF = unit(seen_NX) @ unit(model.decoder_vectors().detach().reshape(c.n_latents, -1)).T
    res = {"fvu": fvu(x.flatten(1), out.recon.flatten(1)).item(), "l0": (out.latents > 0).float().sum(-1).mean().item(),
           "recovered": (cos_NF.max(-1).values > 0.9).float().mean().item()}
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps in "
          f"{time.time() - t0:.1f}s | FVU {res['fvu']:.3f}  L0 {res['l0']:.1f}  atoms recovered (cos > 0.9) "
          f"{res['recovered']:.2f}")
    return res

"""TopK sparse autoencoder (the per-layer baseline) and the pieces every dictionary shares.

A sparse autoencoder (SAE) writes an activation x ∈ R^d as a sparse, non-negative
combination of F learned directions (the rows of W_dec):

    pre = (x − b_dec) W_enc + b_enc            pre: (B, F)   W_enc: (d, F)
    z   = S(pre)                                z:   (B, F)   k non-zeros per row
    x̂  = z W_dec + b_dec                       x̂:  (B, d)   W_dec: (F, d)

S is one of the *sparsifiers* below, all small pure functions that the crosscoder,
fmxcoder and PolySAE import from here:

  topk        ReLU, then keep the k largest entries of each row (Gao et al. 2024,
              arXiv 2406.04093). Exactly k non-zeros per row (fewer only if a row has
              fewer than k positive pre-activations).
  batchtopk   ReLU, then keep the B·k largest entries of the whole batch (Bussmann et
              al. 2024, arXiv 2412.06410): the mean L0 over the batch is k, but single
              tokens may use more or fewer latents. At inference a threshold θ, an EMA of
              the smallest kept activation during training, replaces the batch selection
              so one token is encoded without a batch: z = pre · 1[pre > θ].
  relu        ReLU plus an L1 penalty λ Σ_i z_i ‖W_dec[i]‖ (the classic SAE).

TopK and BatchTopK (in training) select a fixed number of entries, N = B·k: the selection is a
`Selection` (their flat indices and values), decoded by reading only the N active decoder rows
(`sparse_decode`), with no data-dependent shapes, so a training step never waits for the GPU.

Scores. Crosscoders select by activation × decoder norm (a latent that writes more counts
more) but decode the unscaled activation; the sparsifiers therefore take an optional
per-latent `scale_F`. For an SAE with unit-norm decoder rows the scale is 1.

Loss (per batch of B tokens)

    mse   = mean_b Σ_d (x − x̂)²                     sum over the model dimension, mean over tokens
    auxk  = min(n_dead/aux_k, 1) · mean_b Σ_d (e − ê)² (Gao et al. §A.2)
            e = (x − x̂).detach() is the residual, ê decodes the aux_k = d/2 largest
            pre-activations among *dead* latents (no b_dec: the residual has no offset)
    loss  = mse + aux_coeff · auxk (+ l1_coeff · L1 for sparsity="relu")

A latent is dead when it has not fired for `dead_tokens` tokens; the counter is a buffer,
so it is saved and resumed with the model.

Sparse backward (TopK / BatchTopK). Every dictionary's encoder ends in one linear map,
`encoder_linear(x) → (h, W, b)` with

    pre = h Wᵀ + b           h: (B, D)   W: (F, D)   b: (F,)

(SAE, PolySAE: h = x − b_dec, W = W_encᵀ, D = d; crosscoder: h = the L layers' x_l − b_dec[l]
side by side, D = L·d; fmxcoder: h and W are the last contraction of the factorised encoder).
The loss reads pre only at the N selected entries v_n = pre[b_n, f_n] (the k per token, plus the
aux_k AuxK entries while latents may be dead); ReLU and the masks act on v elementwise. With
g_n = ∂L/∂v_n, the gradient G = ∂L/∂pre = Σ_n g_n e_{b_n} e_{f_n}ᵀ has at most N non-zeros, so

    ∂L/∂h[b] = (G W)[b]  = Σ_{n: b_n = b} g_n W[f_n]      N·D multiply-adds instead of B·F·D
    ∂L/∂W[f] = (Gᵀ h)[f] = Σ_{n: f_n = f} g_n h[b_n]      N·D instead of B·F·D
    ∂L/∂b[f] =             Σ_{n: f_n = f} g_n

and autograd carries ∂L/∂h on to x and b_dec (∂L/∂b_dec = −Σ_b ∂L/∂h[b]: b_dec is trained through
the encoder as well as the decoder) or into the factorised encoder. The selection itself is
piecewise constant in pre (its derivative is 0 almost everywhere), and a selected entry that
ReLU zeroes gets g_n = 0 from ReLU's backward, as in the dense path. `SparseEncoderGrad` computes
the three sums with F.embedding_bag (per-sample weights g) and index_add_; the forward stays one
dense product. Whether a device uses it is `SPARSE_BACKWARD[device type]` (the dense autograd
path is the reference; tests check both give the same gradients).

Decoder-norm policy (`decoder_norm`): "unit" (default) keeps the rows of W_dec at unit norm:
before each optimiser step the gradient component parallel to each row is removed
(`before_step`), after it the rows are renormalised (`after_step`). "free" trains them freely
from norm `decoder_init_norm` (SAELens's convention, which the official PolySAE code uses for
its SAE baseline with 0.1). At init W_enc = W_dec.T; b_dec is set from data by `init_b_dec`
(geometric median, Weiszfeld, or mean; "zero" keeps 0, as SAELens does).

Inputs are assumed already normalised (E‖x‖² ≈ d, see activations.py); `config.input_scale`
records the factor so that `fold_input_scale()` can export a model that takes raw
activations.

The interface: `Dictionary` (a typing.Protocol, below the loss) lists, one line per member, what
forward_with_losses, train_step, train.py and metrics.py use of a model; SAE, PolySAE, CrossCoder
and FMXCoder each provide exactly these (tests/test_sae.py checks all four).

Save/load: `save(model, dir)` writes config.json + model.safetensors; `load(dir)` rebuilds
any dictionary in this project (sae, crosscoder, fmxcoder, polysae) from config.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SPARSITIES = ("topk", "batchtopk", "relu")

# Per device type ("<type>+autocast" under torch.autocast, falling back to "<type>"): does a
# TopK/BatchTopK training step use the sparse encoder backward (SparseEncoderGrad) rather than
# dense autograd? Each default is the path bench/bench_train.py measured faster (README, Benchmarks):
#   cpu             sparse: about 3x fewer FLOPs, 1.3-2x the tokens/s
#   cuda            sparse: on an H200 in float32 at the papers' width, 1.24-1.55x the tokens/s
#   cuda+autocast   dense: under bfloat16 autocast cuBLAS wins (the sparse path 0.74-0.97x)
# Switch at run time, e.g. sae.SPARSE_BACKWARD["cuda"] = False; unlisted device types use dense.
SPARSE_BACKWARD = {"cpu": True, "cuda": True, "cuda+autocast": False}


def sparse_backward_on(device: torch.device) -> bool:
    key = device.type + ("+autocast" if torch.is_autocast_enabled(device.type) else "")
    return SPARSE_BACKWARD.get(key, SPARSE_BACKWARD.get(device.type, False))


# ----------------------------------------------------------------------------------------
# Data parallelism (train.py under torchrun): the few statistics that are not gradients
# ----------------------------------------------------------------------------------------


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: Tensor, op: str) -> Tensor:
    """In-place all-reduce ("min" | "max" | "sum") across data-parallel ranks; no-op alone."""
    if world_size() > 1:
        ops = {"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX,
               "sum": torch.distributed.ReduceOp.SUM}
        torch.distributed.all_reduce(t, ops[op])
    return t


# ----------------------------------------------------------------------------------------
# Selections: fixed-size sparse latents
# ----------------------------------------------------------------------------------------


class Selection(NamedTuple):
    """Sparse latents z (B, F) given by N selected entries: z[b, f] = vals[n] at idx[n] = b·F + f,
    0 elsewhere. idx is sorted, so each token's entries are contiguous. A selected entry may hold
    0 (ReLU'd, or masked out by `keep`). N is fixed by the sparsifier (B·k), never by the data."""
    idx: Tensor                  # (N,) int64, flat indices into B·F, ascending
    vals: Tensor                 # (N,) values, differentiable
    shape: tuple[int, int]       # (B, F)

    def dense(self) -> Tensor:
        """(B, F) z with zeros elsewhere (differentiable in vals)."""
        B, F_ = self.shape
        return self.vals.new_zeros(B * F_).scatter_(0, self.idx, self.vals).view(B, F_)

    def offsets(self) -> Tensor:
        """(B,) where each token's entries start in idx (for F.embedding_bag)."""
        B, F_ = self.shape
        return torch.searchsorted(self.idx, torch.arange(B, device=self.idx.device) * F_)


def scores(pre_BF: Tensor, scale_F: Tensor | None = None) -> Tensor:
    """The selection score: pre, times the positive per-latent scale if given. Selecting on pre
    rather than ReLU(pre) picks the same positive entries (only which of the entries that ReLU
    zeroes fill a row with fewer than k positives differs, and those decode as 0) and saves a
    pass over (B, F)."""
    return pre_BF if scale_F is None else pre_BF * scale_F


@torch.no_grad()
def topk_indices(score_BF: Tensor, k: int) -> Tensor:
    """(B·k,) sorted flat indices of the k largest scores of each row."""
    B, F_ = score_BF.shape
    idx_BK = score_BF.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return (idx_BK + F_ * torch.arange(B, device=idx_BK.device)[:, None]).flatten()


@torch.no_grad()
def batch_topk_indices(score_BF: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """Sorted flat indices of the B·k largest scores of the whole batch, and a keep mask (or None).

    Under torch.distributed (data-parallel training) the batch is the *global* batch: each rank
    sends its local top-(world·B·k) scores (one rank may hold all of the global winners), and an
    entry is kept when its score reaches the (world·B·k)-th largest of them, so every rank selects
    exactly as one process would. The candidates are returned, with keep = score ≥ that value
    (a fixed size, world·B·k; the ones not kept decode as 0)."""
    n_keep = min(k * score_BF.shape[0], score_BF.numel())
    flat = score_BF.flatten()
    if world_size() > 1:  # --- distributed: a global threshold from every rank's candidates
        local = flat.topk(min(n_keep * world_size(), flat.numel()))
        gathered = [torch.empty_like(local.values) for _ in range(world_size())]
        torch.distributed.all_gather(gathered, local.values)
        kth = torch.cat(gathered).topk(n_keep * world_size()).values.min()
        idx, order = local.indices.sort()
        return idx, local.values[order] >= kth
    return flat.topk(n_keep, sorted=False).indices.sort().values, None


def select(pre_BF: Tensor, sparsity: str, k: int, scale_F: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Training selection of "topk" or "batchtopk": (sorted flat indices, keep mask or None)."""
    score_BF = scores(pre_BF.detach(), scale_F)
    if sparsity == "topk":
        return topk_indices(score_BF, k), None
    return batch_topk_indices(score_BF, k)


class SparseEncoderGrad(torch.autograd.Function):
    """v = pre.flatten()[idx] for pre = h Wᵀ + b, computed elsewhere (without autograd), with the
    sparse backward derived in the module docstring:

        ∂L/∂h = G W,   ∂L/∂W = Gᵀ h,   ∂L/∂b = Σ_b G[b]      G = ∂L/∂pre, non-zero only at idx

    h: (B, D), W: (F, D), b: (F,), pre: (B, F), idx: (N,) sorted flat indices (duplicates allowed).
    Gradients are computed in W's dtype (float32 under bfloat16 autocast) and returned in each
    input's dtype."""

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
        # contiguous rows: embedding_bag's row gathers from a strided tensor are slow (CP's v is one)
        W_rows, h_rows = W_FD.contiguous(), h_BD.to(W_FD.dtype).contiguous()
        g_N = g_N.to(W_FD.dtype)
        rows_N, cols_N = idx_N // F_, idx_N % F_
        grad_h = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # ∂L/∂h[b] = Σ_{n: b_n = b} g_n W[f_n]: each token's entries are contiguous
            starts_B = torch.searchsorted(idx_N, torch.arange(B, device=dev) * F_)
            grad_h = F.embedding_bag(cols_N, W_rows, starts_B, mode="sum", per_sample_weights=g_N).to(h_BD.dtype)
        if ctx.needs_input_grad[1]:  # ∂L/∂W[f] = Σ_{n: f_n = f} g_n h[b_n]: group the entries by latent
            by_latent_N, order_N = cols_N.sort()
            starts_F = torch.searchsorted(by_latent_N, torch.arange(F_, device=dev))
            grad_W = F.embedding_bag(rows_N[order_N], h_rows, starts_F, mode="sum", per_sample_weights=g_N[order_N])
        if ctx.needs_input_grad[2]:  # ∂L/∂b[f] = Σ_{n: f_n = f} g_n
            grad_b = torch.zeros(F_, dtype=ctx.b_dtype, device=dev).index_add_(0, cols_N, g_N.to(ctx.b_dtype))
        return grad_h, grad_W, grad_b, None, None


def selected_values(enc: tuple[Tensor, Tensor, Tensor] | None, pre_BF: Tensor, idx_N: Tensor,
                    keep_N: Tensor | None, sparse_backward: bool = False) -> Tensor:
    """ReLU(pre) at the selected entries (times keep). The gradient reaches the encoder
    enc = (h, W, b) through SparseEncoderGrad if `sparse_backward` (then pre carries no graph), else
    through pre's own dense autograd graph (the reference)."""
    if sparse_backward:
        raw_N = SparseEncoderGrad.apply(*enc, pre_BF, idx_N)
    else:
        raw_N = pre_BF.reshape(-1).gather(0, idx_N)
    vals_N = F.relu(raw_N)
    return vals_N if keep_N is None else vals_N * keep_N


# ----------------------------------------------------------------------------------------
# Sparsifiers on dense pre-activations (B, F) → dense z (B, F)
# ----------------------------------------------------------------------------------------


def _dense(pre_BF: Tensor, idx_N: Tensor, keep_N: Tensor | None) -> Tensor:
    return Selection(idx_N, selected_values(None, pre_BF, idx_N, keep_N), tuple(pre_BF.shape)).dense()


def topk(pre_BF: Tensor, k: int, scale_F: Tensor | None = None) -> Tensor:
    """ReLU, then keep the k largest (score = act · scale) entries per row."""
    return _dense(pre_BF, topk_indices(scores(pre_BF.detach(), scale_F), k), None)


def batch_topk(pre_BF: Tensor, k: int, scale_F: Tensor | None = None) -> Tensor:
    """ReLU, then keep the B·k largest (score = act · scale) entries of the whole (global) batch."""
    return _dense(pre_BF, *batch_topk_indices(scores(pre_BF.detach(), scale_F), k))


def jump(pre_BF: Tensor, threshold: Tensor | float, scale_F: Tensor | None = None) -> Tensor:
    """Threshold activation used by BatchTopK at inference: keep acts whose score > θ."""
    acts_BF = F.relu(pre_BF)
    score_BF = acts_BF if scale_F is None else acts_BF * scale_F
    return acts_BF * (score_BF > threshold)


def sparsify(pre_BF: Tensor, sparsity: str, k: int, training: bool,
             threshold: Tensor, scale_F: Tensor | None = None) -> Tensor:
    """Apply the configured sparsifier. `threshold` is the BatchTopK inference threshold
    (a 0-dim buffer, < 0 while uncalibrated: then per-row TopK is used at inference; both are
    computed and torch.where picks one, so encoding never reads the threshold on the host)."""
    if sparsity == "topk":
        return topk(pre_BF, k, scale_F)
    if sparsity == "batchtopk":
        if training:
            return batch_topk(pre_BF, k, scale_F)
        return torch.where(threshold < 0, topk(pre_BF, k, scale_F), jump(pre_BF, threshold, scale_F))
    if sparsity == "relu":
        return F.relu(pre_BF)
    raise ValueError(f"sparsity must be one of {SPARSITIES}, got {sparsity!r}")


def entries(z: Tensor | Selection) -> tuple[Tensor, Tensor]:
    """(latent index, value) of z's entries: the selected ones of a Selection, all of a dense z."""
    if isinstance(z, Selection):
        return z.idx % z.shape[1], z.vals
    return torch.arange(z.shape[1], device=z.device).expand_as(z), z


@torch.no_grad()
def update_threshold(threshold: Tensor, z: Tensor | Selection, scale_F: Tensor | None = None,
                     momentum: float = 0.01) -> None:
    """EMA (in place) of the smallest kept score of a BatchTopK batch (z dense or a Selection);
    the first batch sets it (θ < 0 means uncalibrated); a batch that keeps nothing leaves it.
    No host reads."""
    cols, vals = entries(z)
    score = vals if scale_F is None else vals * scale_F[cols]
    smallest = torch.where(vals > 0, score, torch.inf).amin().to(threshold.dtype)
    all_reduce(smallest, "min")  # distributed: the smallest over the global batch
    new = torch.where(threshold < 0, smallest, torch.lerp(threshold, smallest, momentum))
    threshold.copy_(torch.where(torch.isfinite(smallest), new, threshold))


# ----------------------------------------------------------------------------------------
# Dead latents and AuxK
# ----------------------------------------------------------------------------------------


class HostMirror:
    """An integer the host keeps about a buffer, so that a training step can branch on it without
    reading the device (a host–device sync on a GPU): the step that changes the buffer also
    updates the mirror (`set`). It is trusted while the buffer is the tensor it was recorded with
    (same storage and version counter, which every in-place write bumps: load_state_dict, a
    manual fill_); otherwise `read(buffer)` recomputes it, once (one sync, e.g. after loading a
    checkpoint or moving the model to another device)."""

    def __init__(self, read, buf: Tensor, value: int):
        self.read = read
        self.set(buf, value)

    def set(self, buf: Tensor, value: int) -> None:
        self.key, self.value = (buf.data_ptr(), buf._version), value

    def get(self, buf: Tensor) -> int:
        if self.key != (buf.data_ptr(), buf._version):
            self.set(buf, self.read(buf))
        return self.value


def read_max(t: Tensor) -> int:
    return int(t.max())


@torch.no_grad()
def refresh_dead_mirror(model: nn.Module, horizon_tokens: int) -> None:
    """One host read of the dead counter, for a place where the host waits for the device anyway
    (train.py calls it at every --log-every reading): the exact max of tokens_since_fired, and how
    many latents can be dead before `horizon_tokens` more tokens are trained on. Until then AuxK
    selects min(aux_k, that many) entries per token instead of aux_k: the extra ones would be
    masked out anyway, so the loss and the gradients differ only by the
    order in which the backward adds zeros and rows (float rounding). The limit is host state that
    checkpoints keep (runs.checkpoint_state), so a resumed run selects what the first run did."""
    counter_F = model.tokens_since_fired
    top = read_max(counter_F)
    model.dead_bound.set(counter_F, top)
    can_die = int((counter_F >= model.config.dead_tokens - horizon_tokens).sum())
    model.aux_limit = (can_die, top + horizon_tokens)      # (count, valid while the bound is below this)


def read_int(t: Tensor) -> int:
    return int(t)


@torch.no_grad()
def update_dead_counter(tokens_since_fired_F: Tensor, z: Tensor | Selection) -> None:
    """Add the batch's tokens to every counter, reset those of latents that fired (z > 0
    somewhere; z dense (B, F) or a Selection)."""
    if isinstance(z, Selection):
        fired_F = torch.zeros_like(tokens_since_fired_F, dtype=torch.int32).scatter_reduce_(
            0, z.idx % z.shape[1], (z.vals > 0).to(torch.int32), "amax")
    else:
        fired_F = (z > 0).any(dim=0).to(torch.int32)
    all_reduce(fired_F, "max")  # distributed: fired on any rank
    tokens_since_fired_F += z.shape[0] * world_size()
    tokens_since_fired_F.masked_fill_(fired_F.bool(), 0)


@torch.no_grad()
def auxk_indices(pre_BF: Tensor, dead_F: Tensor, aux_k: int) -> tuple[Tensor, Tensor]:
    """The AuxK selection: per token the min(aux_k, F) largest pre-activations among dead latents,
    as sorted flat indices and keep = "the latent is dead" (a fixed size: with fewer dead latents
    than aux_k the rest are masked out, so they decode as 0 and get no gradient)."""
    masked_BF = torch.where(dead_F, pre_BF, -torch.inf)
    idx_N = topk_indices(masked_BF, min(aux_k, pre_BF.shape[1]))
    return idx_N, dead_F[idx_N % pre_BF.shape[1]]


def auxk_loss(z_aux: Selection, dead_F: Tensor, residual: Tensor, decode_fn, aux_k: int) -> Tensor:
    """AuxK loss: the top-aux_k dead latents (z_aux, from `auxk_indices`) must explain the
    (detached) residual: (B, ...) = x − x̂ ; decode_fn(z) must decode *without* the bias b_dec.
    Returns min(n_dead/aux_k, 1) · mean_b Σ (residual − decode_fn(z_aux))² (0 if nothing is dead)."""
    scale = (dead_F.sum() / aux_k).clamp(max=1.0)
    err = residual.detach() - decode_fn(z_aux)
    return scale * err.pow(2).flatten(1).sum(-1).mean()


# ----------------------------------------------------------------------------------------
# Small shared helpers
# ----------------------------------------------------------------------------------------


def sparse_decode(z: Tensor | Selection, W_FX: Tensor) -> Tensor:
    """z @ W for sparse z, reading only the rows of W that are active (F.embedding_bag):
    k·X instead of F·X multiply-adds per token, about 4x faster forward + backward for a
    crosscoder decoder on CPU. Equal to the dense product up to float rounding (tested);
    gradients reach W's active rows and z's selected entries.

    z is a Selection (training: no host reads) or a dense (B, F) tensor, whose non-zeros are
    found with nonzero() (a host–device sync: evaluation, analysis, ReLU + L1). Falls back to
    the dense product when more than 1/8 of z is selected (ReLU + L1 early in training)."""
    if isinstance(z, Selection):
        B, F_ = z.shape
        if len(z.idx) > B * F_ // 8:
            return z.dense().to(W_FX.dtype) @ W_FX
        return F.embedding_bag(z.idx % F_, W_FX, z.offsets(), mode="sum",
                               per_sample_weights=z.vals.to(W_FX.dtype))
    rows, cols = z.nonzero(as_tuple=True)
    if len(rows) > z.numel() // 8:
        return z.to(W_FX.dtype) @ W_FX
    counts = torch.bincount(rows, minlength=z.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(cols, W_FX, offsets, mode="sum", per_sample_weights=z[rows, cols].to(W_FX.dtype))


@torch.no_grad()
def geometric_median(x_ND: Tensor, iters: int = 100, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: argmin_m Σ_n ‖x_n − m‖. Starts at the mean."""
    m_D = x_ND.mean(0)
    for _ in range(iters):
        w_N = 1.0 / (x_ND - m_D).norm(dim=-1).clamp_min(eps)
        m_new = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
        if (m_new - m_D).norm() <= 1e-6 * m_D.norm().clamp_min(eps):
            return m_new
        m_D = m_new
    return m_D


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained on one batch: Σ‖x − x̂‖² / Σ‖x − mean_batch(x)‖².
    (metrics.py accumulates numerator and denominator over many batches instead.)"""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


class Output(NamedTuple):
    """What every dictionary's forward returns."""
    recon: Tensor      # x̂, same shape as x
    latents: Tensor    # z (B, F), sparse
    pre_acts: Tensor   # (B, F), dense, before ReLU and the sparsifier
    loss: Tensor       # the training loss: mse + aux_coeff·auxk + l1_coeff·l1
    mse: Tensor        # mean over tokens of Σ (x − x̂)² over the model dimension (and layers)
    auxk: Tensor       # AuxK loss (0 when off, in eval mode, or when nothing is dead)
    l1: Tensor         # L1 of z: decoder-norm-weighted for sparsity="relu", plain Σ z otherwise


@runtime_checkable
class Dictionary(Protocol):
    """What every dictionary of this project provides: SAE (here), PolySAE (polysae.py), CrossCoder
    (crosscoder.py), FMXCoder (fmxcoder.py). forward_with_losses, train_step, train.py, metrics.py
    and features.py use a model through these members only; a fifth dictionary that has them works
    with all of them. x is (B, d), or (B, L, d) for the crosscoders; z and pre are (B, F)."""

    config: Any                      # dataclass: d_in, n_latents, k, sparsity, l1_coeff, aux_k (aux_k),
    #                                  aux_coeff, dead_tokens, input_scale (+ n_layers for crosscoders)
    training: bool                   # nn.Module's: AuxK, dead counter and BatchTopK θ update only in training
    tokens_since_fired: Tensor       # buffer (F,) long: tokens since each latent last fired
    threshold: Tensor                # buffer (): BatchTopK's inference threshold θ
    dead_bound: HostMirror           # host-side upper bound of max(tokens_since_fired) (no host reads)

    def encoder_linear(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b) with pre = h Wᵀ + b, the encoder's last linear map (the sparse backward's input)."""

    def pre_acts(self, x: Tensor) -> Tensor:
        """(B, F) pre-activations: F.linear(*encoder_linear(x))."""

    def decoder_scale(self) -> Tensor | None:
        """(F,) per-latent selection score scale (activation × decoder norm), or None for 1."""

    def decode(self, z: Tensor | Selection) -> Tensor:
        """x̂ from z, with b_dec."""

    def decode_nobias(self, z: Tensor | Selection) -> Tensor:
        """x̂ − b_dec (what AuxK decodes the residual with)."""

    def decoder_vectors(self) -> Tensor:
        """(F, d) or (F, L, d): the direction(s) each latent writes."""

    def decoder_norms(self) -> Tensor:
        """(F,) or (F, L): the norm of what each latent writes at unit activation."""

    def init_b_dec(self, x: Tensor, method: str = "median") -> None:
        """b_dec from a data sample ("median", "mean", "zero")."""

    def before_step(self) -> None:
        """After backward, before the optimiser step (e.g. the decoder-gradient projection)."""

    def after_step(self) -> None:
        """After the optimiser step (renormalise decoder rows, re-orthonormalise U, ...)."""

    def fold_input_scale(self) -> None:
        """Fold config.input_scale into the weights so the model takes raw activations."""


def is_multilayer(model: Dictionary) -> bool:
    """Crosscoders and fmxcoders read (B, L, d) (their config has n_layers); SAEs and PolySAEs (B, d)."""
    return hasattr(model.config, "n_layers")


def forward_with_losses(model: Dictionary, x_in: Tensor, target: Tensor) -> Output:
    """The forward pass every dictionary shares (SAE, crosscoder, fmxcoder, PolySAE).

    Encodes `x_in` with model.encoder_linear and the configured sparsifier (scored by
    model.decoder_scale(), computed without gradient), decodes with model.decode, scores the
    reconstruction against `target` (crosscoders: the clean layers, while x_in may be masked),
    and in training mode adds AuxK and updates the dead counter and BatchTopK threshold.
    l1 is the decoder-norm-weighted L1 for sparsity="relu" (where it is in the loss) and the
    plain Σ_f z_f otherwise (logging only; weighting would cost a decoder-norm pass).

    TopK, and BatchTopK in training, decode a Selection and take the encoder gradient from the
    selected entries only where SPARSE_BACKWARD says so; AuxK runs while a latent may be dead
    (model.dead_bound, a host-side upper bound of the dead counter: no host reads)."""
    c = model.config
    enc = model.encoder_linear(x_in)
    with torch.no_grad():
        scale_F = model.decoder_scale()  # selection only: no gradient flows through it
    fixed = c.sparsity == "topk" or (c.sparsity == "batchtopk" and model.training)
    sparse_bw = fixed and torch.is_grad_enabled() and sparse_backward_on(enc[0].device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse_bw):
        pre_BF = F.linear(*enc)
    if fixed:
        idx_N, keep_N = select(pre_BF, c.sparsity, c.k, scale_F)
        z_sel = Selection(idx_N, selected_values(enc, pre_BF, idx_N, keep_N, sparse_bw), tuple(pre_BF.shape))
        z_BF = z_sel.dense()
        l1 = z_sel.vals.sum() / z_BF.shape[0]
    else:  # ReLU + L1, BatchTopK at inference: a dense z
        z_sel = z_BF = sparsify(pre_BF, c.sparsity, c.k, model.training, model.threshold, scale_F)
        l1 = z_BF.sum(-1).mean()
        if c.sparsity == "relu":
            w_F = model.decoder_scale()
            l1 = (z_BF * (model.decoder_norms() if w_F is None else w_F)).sum(-1).mean()
    recon = model.decode(z_sel)
    mse = F.mse_loss(recon, target, reduction="sum") / recon.shape[0]   # mean_b Σ (x̂ − x)², one fused pass
    auxk = mse.new_zeros(())
    if model.training:
        counter_F = model.tokens_since_fired
        bound = model.dead_bound.get(counter_F)   # ≥ max(counter_F), known on the host
        n_aux = c.aux_k                           # entries per token AuxK selects (refresh_dead_mirror)
        limit = getattr(model, "aux_limit", None)
        if limit is not None and bound < limit[1]:
            n_aux = min(n_aux, limit[0])
        if c.aux_coeff > 0 and c.sparsity != "relu" and bound >= c.dead_tokens and n_aux > 0:
            dead_F = counter_F >= c.dead_tokens
            idx_A, keep_A = auxk_indices(pre_BF.detach(), dead_F, n_aux)
            z_aux = Selection(idx_A, selected_values(enc, pre_BF, idx_A, keep_A, sparse_bw), tuple(pre_BF.shape))
            auxk = auxk_loss(z_aux, dead_F, target - recon, model.decode_nobias, c.aux_k)
        update_dead_counter(counter_F, z_sel)
        model.dead_bound.set(counter_F, bound + z_BF.shape[0] * world_size())
        if c.sparsity == "batchtopk":
            update_threshold(model.threshold, z_sel, scale_F)
    loss = mse + c.aux_coeff * auxk + (c.l1_coeff * l1 if c.sparsity == "relu" else 0.0)
    return Output(recon, z_BF, pre_BF, loss, mse, auxk, l1)


def train_step(model: Dictionary, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float = 1.0,
               forward=None, autocast=None) -> Output:
    """One optimiser step, as train.py takes it: forward with the losses (through `forward`,
    e.g. a DistributedDataParallel wrapper, under `autocast` if given), backward, the model's
    `before_step` (gradient projection), gradient clipping, the step, and `after_step`
    (decoder renormalisation, PolySAE's re-orthonormalisation of U, ...). For TopK/BatchTopK
    it reads nothing back from the device (tests/test_sparse_backward.py counts): logging the
    loss (`.item()`) is the caller's choice."""
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


@dataclass
class SAEConfig:
    d_in: int                     # model dimension d
    n_latents: int                # dictionary size F
    k: int = 32                   # active latents per token (TopK / BatchTopK)
    sparsity: str = "topk"        # "topk" | "batchtopk" | "relu" (ReLU + L1)
    l1_coeff: float = 0.0         # only used by sparsity="relu"
    aux_k: int | None = None      # aux_k for AuxK; None → d_in // 2
    aux_coeff: float = 1 / 32     # AuxK weight (OpenAI: 1/32); 0 disables it
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    input_scale: list[float] = field(default_factory=lambda: [1.0])  # x_model = x_raw · s
    decoder_norm: str = "unit"    # "unit": rows kept at norm 1 | "free": rows trained freely (SAELens)
    decoder_init_norm: float = 1.0  # row norm at init ("free" only; SAELens and the PolySAE code: 0.1)

    def __post_init__(self):
        check_common(self)
        if self.decoder_norm not in ("unit", "free"):
            raise ValueError(f"decoder_norm must be 'unit' or 'free', got {self.decoder_norm!r}")
        if not (self.decoder_init_norm > 0 and self.decoder_init_norm < float("inf")):
            raise ValueError(f"decoder_init_norm must be a finite number > 0, got {self.decoder_init_norm!r}")
        if self.decoder_norm == "unit" and self.decoder_init_norm != 1.0:
            raise ValueError(f"decoder_init_norm {self.decoder_init_norm} needs decoder_norm='free' "
                             f"(unit-norm rows are renormalised to 1 after every step)")


def check_common(cfg) -> None:
    """Validate the fields every dictionary config shares (clear errors on bad input)."""
    for name in ("d_in", "n_latents", "k"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    if cfg.k >= cfg.n_latents:
        raise ValueError(f"k must be smaller than n_latents, got k={cfg.k} >= n_latents={cfg.n_latents}")
    if cfg.sparsity not in SPARSITIES:
        raise ValueError(f"sparsity must be one of {SPARSITIES}, got {cfg.sparsity!r}")
    if cfg.aux_k is None:
        cfg.aux_k = max(1, cfg.d_in // 2)


# ----------------------------------------------------------------------------------------
# The TopK SAE
# ----------------------------------------------------------------------------------------


class SAE(nn.Module):
    """The TopK SAE: W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,). A `Dictionary`."""
    config_class = SAEConfig

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        d, n = config.d_in, config.n_latents
        W_dec = torch.randn(n, d)
        W_dec *= config.decoder_init_norm / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                     # (F, d), rows of norm decoder_init_norm
        self.W_enc = nn.Parameter(W_dec.T.clone())           # (d, F): tied init, W_enc = W_decᵀ
        self.b_enc = nn.Parameter(torch.zeros(n))            # (F,)
        self.b_dec = nn.Parameter(torch.zeros(d))            # (d,)
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.dead_bound = HostMirror(read_max, self.tokens_since_fired, 0)  # ≥ max(tokens_since_fired)
        self.register_buffer("threshold", torch.tensor(-1.0))  # BatchTopK inference θ

    # -- the three maps ------------------------------------------------------------------
    def encoder_linear(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h, W, b) with pre = h Wᵀ + b: h = x − b_dec (B, d), W = W_encᵀ (F, d), b = b_enc."""
        return x_BD - self.b_dec, self.W_enc.T, self.b_enc

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """(B, F) = (x − b_dec) W_enc + b_enc, before ReLU and the sparsifier."""
        return F.linear(*self.encoder_linear(x_BD))

    def decoder_scale(self) -> Tensor | None:
        """Per-latent score scale for the sparsifier: None, the SAE selects by pre-activation
        (with unit-norm rows this is activation × decoder norm; with free rows it is what
        SAELens's TopK does without rescale_acts_by_decoder_norm)."""
        return None

    def encode(self, x_BD: Tensor) -> Tensor:
        c = self.config
        return sparsify(self.pre_acts(x_BD), c.sparsity, c.k, self.training, self.threshold,
                        self.decoder_scale())

    def decode_nobias(self, z_BF: Tensor) -> Tensor:
        return sparse_decode(z_BF, self.W_dec)

    def decode(self, z_BF: Tensor) -> Tensor:
        return self.decode_nobias(z_BF) + self.b_dec

    def decoder_vectors(self) -> Tensor:
        """(F, d) the direction each latent writes (for analysis and toy-data recovery)."""
        return self.W_dec

    def decoder_norms(self) -> Tensor:
        """(F,) norm of each latent's decoder vector (1 after every step unless decoder_norm="free")."""
        return self.W_dec.norm(dim=-1)

    # -- forward with the losses ---------------------------------------------------------
    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """x: (B, d). `target` (default x) is what the reconstruction is scored against."""
        self._check_input(x)
        return forward_with_losses(self, x, x if target is None else target)

    def loss(self, x: Tensor) -> Tensor:
        return self(x).loss

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[-1] != self.config.d_in:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.config.d_in}), "
                             f"got {tuple(x.shape)}")

    # -- upkeep around the optimiser step ------------------------------------------------
    @torch.no_grad()
    def init_b_dec(self, x_BD: Tensor, method: str = "median") -> None:
        """Set b_dec from a data sample: "median" (geometric) or "mean"; "zero" keeps 0."""
        if method == "median":
            self.b_dec.copy_(geometric_median(x_BD.float()))
        elif method == "mean":
            self.b_dec.copy_(x_BD.float().mean(0))
        elif method != "zero":
            raise ValueError(f"b_dec init must be 'median', 'mean' or 'zero', got {method!r}")

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (keeps ‖row‖ = 1 to
        first order, so Adam does not waste steps growing the norm). Free rows: nothing."""
        if self.W_dec.grad is not None and self.config.decoder_norm == "unit":
            W, g = self.W_dec, self.W_dec.grad   # g −= (⟨g, W⟩ / ‖W‖²) W, row by row
            g.addcmul_(((g * W).sum(-1) / W.norm(dim=-1).square()).neg_()[:, None], W)

    @torch.no_grad()
    def after_step(self) -> None:
        """Renormalise the decoder rows to unit norm (free rows: nothing)."""
        if self.config.decoder_norm == "unit":
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Make the model take raw activations: with x = s·x_raw,
        pre = (x_raw − b_dec/s)(s W_enc) + b_enc and x̂_raw = z (W_dec/s) + b_dec/s.
        Afterwards the decoder rows have norm 1/s (no longer unit)."""
        (s,) = self.config.input_scale
        self.W_enc *= s
        self.W_dec /= s
        self.b_dec /= s
        self.config.input_scale = [1.0]

    def dead_fraction(self) -> float:
        return (self.tokens_since_fired >= self.config.dead_tokens).float().mean().item()


# ----------------------------------------------------------------------------------------
# Save / load any dictionary of this project
# ----------------------------------------------------------------------------------------


def _module_name(cls) -> str:
    mod = cls.__module__
    return Path(inspect.getfile(cls)).stem if mod == "__main__" else mod


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new one, never a part:
    a temporary file in the same folder, flushed to disk, then os.replace (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write `path/model.safetensors`, then `path/config.json` (class, config, extra metadata),
    each atomically: a folder with a config.json always has the weights that go with it."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"class": f"{_module_name(type(model))}.{type(model).__name__}",
            "config": dataclasses.asdict(model.config), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(path / "model.safetensors", save(tensors))
    write_atomic(path / "config.json", json.dumps(meta, indent=2))


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a dictionary saved with `save`: the class is read from config.json."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in {str(path)!r}: not a saved dictionary")
    meta = json.loads(cfg_file.read_text())
    module_name, class_name = meta["class"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    config = cls.config_class(**meta["config"])
    model = cls(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device)


def demo_model(d_in: int, n_layers: int = 1) -> SAE:
    """The model `python sae.py` trains on toy data (synthetic.demo)."""
    return SAE(SAEConfig(d_in=d_in, n_latents=512, k=8, dead_tokens=50_000))


if __name__ == "__main__":
    from synthetic import demo   # toy data with known atoms

    demo(demo_model, train_step)

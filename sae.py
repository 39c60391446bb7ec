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

Scores. Crosscoders select by activation × decoder norm (a latent that writes more counts
more) but decode the unscaled activation; the sparsifiers therefore take an optional
per-latent `scale_F`. For an SAE with unit-norm decoder rows the scale is 1.

Loss (per batch of B tokens)

    mse   = mean_b Σ_d (x − x̂)²                     sum over the model dimension, mean over tokens
    auxk  = min(n_dead/k_aux, 1) · mean_b Σ_d (e − ê)² (Gao et al. §A.2)
            e = (x − x̂).detach() is the residual, ê decodes the k_aux = d/2 largest
            pre-activations among *dead* latents (no b_dec: the residual has no offset)
    loss  = mse + aux_coeff · auxk (+ l1_coeff · L1 for sparsity="relu")

A latent is dead when it has not fired for `dead_tokens` tokens; the counter is a buffer,
so it is saved and resumed with the model.

Decoder-norm policy: rows of W_dec are kept at unit norm. Before each optimiser step the
gradient component parallel to each row is removed (`before_step`), after it the rows are
renormalised (`after_step`). At init W_enc = W_dec.T; b_dec is set from data by
`init_b_dec` (geometric median, Weiszfeld, or mean).

Inputs are assumed already normalised (E‖x‖² ≈ d, see activations.py); `config.input_scale`
records the factor so that `fold_input_scale()` can export a model that takes raw
activations.

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
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SPARSITIES = ("topk", "batchtopk", "relu")

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
# Sparsifiers: pure functions on pre-activations (B, F)
# ----------------------------------------------------------------------------------------


def topk(pre_BF: Tensor, k: int, scale_F: Tensor | None = None) -> Tensor:
    """ReLU, then keep the k largest (score = act · scale) entries per row."""
    acts_BF = F.relu(pre_BF)
    score_BF = acts_BF if scale_F is None else acts_BF * scale_F
    idx_BK = score_BF.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(acts_BF).scatter(-1, idx_BK, acts_BF.gather(-1, idx_BK))


def batch_topk(pre_BF: Tensor, k: int, scale_F: Tensor | None = None) -> Tensor:
    """ReLU, then keep the B·k largest (score = act · scale) entries of the whole batch.

    Under torch.distributed (data-parallel training) the batch is the *global* batch: each
    rank sends its local top-(world·B·k) scores (one rank may hold all of the global winners),
    and an entry is kept when its score reaches the (world·B·k)-th largest of them, so every
    rank selects exactly as one process would."""
    acts_BF = F.relu(pre_BF)
    score_BF = acts_BF if scale_F is None else acts_BF * scale_F
    n_keep = min(k * acts_BF.shape[0], acts_BF.numel())
    if world_size() > 1:  # --- distributed: a global threshold from every rank's candidates
        local = score_BF.detach().flatten().topk(min(n_keep * world_size(), score_BF.numel())).values
        gathered = [torch.empty_like(local) for _ in range(world_size())]
        torch.distributed.all_gather(gathered, local)
        kth = torch.cat(gathered).topk(n_keep * world_size()).values.min()
        return acts_BF * (score_BF >= kth)
    idx = score_BF.flatten().topk(n_keep, sorted=False).indices
    keep = torch.zeros(acts_BF.numel(), dtype=torch.bool, device=acts_BF.device)
    keep[idx] = True
    return acts_BF * keep.view_as(acts_BF)


def jump(pre_BF: Tensor, threshold: Tensor | float, scale_F: Tensor | None = None) -> Tensor:
    """Threshold activation used by BatchTopK at inference: keep acts whose score > θ."""
    acts_BF = F.relu(pre_BF)
    score_BF = acts_BF if scale_F is None else acts_BF * scale_F
    return acts_BF * (score_BF > threshold)


def sparsify(pre_BF: Tensor, sparsity: str, k: int, training: bool,
             threshold: Tensor, scale_F: Tensor | None = None) -> Tensor:
    """Apply the configured sparsifier. `threshold` is the BatchTopK inference threshold
    (a 0-dim buffer, < 0 while uncalibrated: then per-row TopK is used at inference)."""
    if sparsity == "topk":
        return topk(pre_BF, k, scale_F)
    if sparsity == "batchtopk":
        if training:
            return batch_topk(pre_BF, k, scale_F)
        if threshold.item() < 0:
            return topk(pre_BF, k, scale_F)
        return jump(pre_BF, threshold, scale_F)
    if sparsity == "relu":
        return F.relu(pre_BF)
    raise ValueError(f"sparsity must be one of {SPARSITIES}, got {sparsity!r}")


@torch.no_grad()
def update_threshold(threshold: Tensor, z_BF: Tensor, scale_F: Tensor | None = None,
                     momentum: float = 0.01) -> None:
    """EMA (in place) of the smallest kept score of a BatchTopK batch."""
    score_BF = z_BF if scale_F is None else z_BF * scale_F
    kept = score_BF[z_BF > 0]
    smallest = (kept.min() if kept.numel() else score_BF.new_tensor(torch.inf)).to(threshold.dtype)
    all_reduce(smallest, "min")  # distributed: the smallest over the global batch
    if not torch.isfinite(smallest):
        return
    if threshold.item() < 0:
        threshold.copy_(smallest)
    else:
        threshold.lerp_(smallest, momentum)


# ----------------------------------------------------------------------------------------
# Dead latents and AuxK
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def update_dead_counter(tokens_since_fired_F: Tensor, z_BF: Tensor) -> None:
    """Add the batch's tokens to every counter, reset those of latents that fired."""
    fired_F = (z_BF > 0).any(dim=0).to(torch.uint8)
    all_reduce(fired_F, "max")  # distributed: fired on any rank
    tokens_since_fired_F += z_BF.shape[0] * world_size()
    tokens_since_fired_F[fired_F.bool()] = 0


def auxk_loss(pre_BF: Tensor, dead_F: Tensor, residual: Tensor, decode_fn, k_aux: int) -> Tensor:
    """AuxK loss: the top-k_aux dead latents must explain the (detached) residual.

    residual: (B, ...) = x − x̂ ; decode_fn(z_BF) must decode *without* the bias b_dec.
    Returns min(n_dead/k_aux, 1) · mean_b Σ (residual − decode_fn(z_aux))².
    """
    n_dead = int(dead_F.sum())
    if n_dead == 0:
        return pre_BF.new_zeros(())
    k = min(k_aux, n_dead)
    masked_BF = torch.where(dead_F, pre_BF, torch.full_like(pre_BF, -torch.inf))
    z_aux_BF = topk(masked_BF, k)
    err = residual.detach() - decode_fn(z_aux_BF)
    return min(n_dead / k_aux, 1.0) * err.pow(2).flatten(1).sum(-1).mean()


# ----------------------------------------------------------------------------------------
# Small shared helpers
# ----------------------------------------------------------------------------------------


def sparse_decode(z_BF: Tensor, W_FX: Tensor) -> Tensor:
    """z @ W for sparse z, reading only the rows of W that are active (F.embedding_bag):
    k·X instead of F·X multiply-adds per token, about 4x faster forward + backward for a
    crosscoder decoder on CPU. Equal to the dense product up to float rounding (tested);
    gradients reach W's active rows and z's non-zeros (the sparsifier zeroes the others'
    gradients anyway). Falls back to the dense product when z is not sparse (ReLU + L1 early
    in training)."""
    rows, cols = z_BF.nonzero(as_tuple=True)
    if len(rows) > z_BF.numel() // 8:
        return z_BF @ W_FX
    counts = torch.bincount(rows, minlength=z_BF.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(cols, W_FX, offsets, mode="sum", per_sample_weights=z_BF[rows, cols])


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


def forward_with_losses(model: nn.Module, x_in: Tensor, target: Tensor) -> Output:
    """The forward pass every dictionary shares (SAE, crosscoder, fmxcoder, PolySAE).

    Encodes `x_in` with model.pre_acts and the configured sparsifier (scored by
    model.decoder_scale(), computed without gradient), decodes with model.decode, scores the
    reconstruction against `target` (crosscoders: the clean layers, while x_in may be masked),
    and in training mode adds AuxK and updates the dead counter and BatchTopK threshold.
    l1 is the decoder-norm-weighted L1 for sparsity="relu" (where it is in the loss) and the
    plain Σ_f z_f otherwise (logging only; weighting would cost a decoder-norm pass)."""
    c = model.config
    pre_BF = model.pre_acts(x_in)
    with torch.no_grad():
        scale_F = model.decoder_scale()  # selection only: no gradient flows through it
    z_BF = sparsify(pre_BF, c.sparsity, c.k, model.training, model.threshold, scale_F)
    recon = model.decode(z_BF)
    mse = (recon - target).pow(2).flatten(1).sum(-1).mean()
    if c.sparsity == "relu":
        w_F = model.decoder_scale()
        l1 = (z_BF * (model.decoder_norms() if w_F is None else w_F)).sum(-1).mean()
    else:
        l1 = z_BF.sum(-1).mean()
    auxk = mse.new_zeros(())
    if model.training:
        dead_F = model.tokens_since_fired >= c.dead_tokens
        if c.aux_coeff > 0 and c.sparsity != "relu":
            auxk = auxk_loss(pre_BF, dead_F, target - recon, model.decode_nobias, c.aux_k)
        update_dead_counter(model.tokens_since_fired, z_BF)
        if c.sparsity == "batchtopk":
            update_threshold(model.threshold, z_BF, scale_F)
    loss = mse + c.aux_coeff * auxk + (c.l1_coeff * l1 if c.sparsity == "relu" else 0.0)
    return Output(recon, z_BF, pre_BF, loss, mse, auxk, l1)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float = 1.0,
               forward=None, autocast=None) -> Output:
    """One optimiser step, as train.py takes it: forward with the losses (through `forward`,
    e.g. a DistributedDataParallel wrapper, under `autocast` if given), backward, the model's
    `before_step` (gradient projection), gradient clipping, the step, and `after_step`
    (decoder renormalisation, PolySAE's re-orthonormalisation of U, ...)."""
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
    aux_k: int | None = None      # k_aux for AuxK; None → d_in // 2
    aux_coeff: float = 1 / 32     # AuxK weight (OpenAI: 1/32); 0 disables it
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    input_scale: list[float] = field(default_factory=lambda: [1.0])  # x_model = x_raw · s

    def __post_init__(self):
        check_common(self)


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
    config_class = SAEConfig

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        d, n = config.d_in, config.n_latents
        W_dec = torch.randn(n, d)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                     # (F, d), unit-norm rows
        self.W_enc = nn.Parameter(W_dec.T.clone())           # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(n))            # (F,)
        self.b_dec = nn.Parameter(torch.zeros(d))            # (d,)
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(-1.0))  # BatchTopK inference θ

    # -- the three maps ------------------------------------------------------------------
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return (x_BD - self.b_dec) @ self.W_enc + self.b_enc

    def decoder_scale(self) -> Tensor | None:
        """Per-latent score scale for the sparsifier: None, decoder rows have unit norm."""
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
        """(F,) norm of each latent's decoder vector (1 after every step)."""
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
        first order, so Adam does not waste steps growing the norm)."""
        if self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(-1, keepdim=True) * W / W.pow(2).sum(-1, keepdim=True)

    @torch.no_grad()
    def after_step(self) -> None:
        """Renormalise the decoder rows to unit norm."""
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


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> list[tuple[list[int], nn.Module, dict]]:
    """Load what `train.py --out path` wrote: a list of (layers, dictionary, metadata).

    A run folder holds either one dictionary (config.json at its root) or, for the
    per-layer SAE baseline, one sub-folder `layer_<l>/` per layer. The metadata is the
    whole config.json (its "run" entry records model, hooks, layers and data)."""
    path = Path(path)
    dirs = [path] if (path / "config.json").exists() else sorted(
        (p for p in path.glob("layer_*") if (p / "config.json").exists()),
        key=lambda p: int(p.name.split("_")[1]))
    if not dirs:
        raise FileNotFoundError(f"{str(path)!r} holds no config.json nor layer_*/config.json")
    out = []
    for d in dirs:
        meta = json.loads((d / "config.json").read_text())
        out.append((list(meta.get("run", {}).get("layers", [])), load(d, device), meta))
    return out


def demo_model(d_in: int, n_layers: int = 1) -> SAE:
    """The model `python sae.py` trains on toy data (see synthetic.demo)."""
    return SAE(SAEConfig(d_in=d_in, n_latents=512, k=8, dead_tokens=50_000))


if __name__ == "__main__":
    from synthetic import demo

    demo("sae")

"""Evaluation of a trained dictionary: every number the two papers report, from a run folder.

    python metrics.py RUN_DIR [RUN_DIR ...] [--device cuda] [--thorough]

prints one table (a row per dictionary) and writes RUN_DIR/eval.json (support/evaluate.py runs the metrics
defined here over a run folder). All metrics are computed on
held-out tokens: the run's cache tokens [train_tokens, train_tokens + eval_tokens) that train.py
never trained on, or, when the cache is gone, tokens harvested from the windows of the run's text
stream that follow the training tokens (a hub dataset's "test" split when it has one; for a
streamed run, train.py --cache none, the first eval_tokens tokens of the stream). The LM
loss always runs on those text windows, which continue the cache exactly at its first held-out
token (approximately when the run dropped outlier tokens: the cache then holds fewer tokens than
the windows, and the boundary is placed by the windows' token counts).

Units. A dictionary reads x_model[l] = s_l · x_raw[l] (s_l = config.input_scale, activations.py's
`estimate_scale`: E‖s_l x_l‖² = d). MSE is reported in the raw activation scale (per layer, and
summed over layers) and in the normalised scale (s_l of the activation cache, so folded and
unfolded exports compare; without a cache the run's own s_l, or for a folded export one estimated
on the held-out tokens).

Reconstruction (fmxcoders arXiv 2605.09438: MSE on a held-out token panel; PolySAE arXiv 2602.01322:
SAEBench's "core" evaluation, raw MSE summed over d)            x: (N, L, d) held-out tokens
    MSE   = (1/N) Σ_n Σ_l Σ_d (x − x̂)²           sum over d (and layers), mean over tokens
    FVU   = Σ‖x − x̂‖² / Σ‖x − x̄‖²               x̄ the per-dimension mean over all N tokens;
            numerator and denominator are accumulated over batches (the denominator with Chan's
            merge of per-batch means and squared deviations) and divided once.
    L0    = mean over tokens of #{i : z_i > 0}
    dead  = fraction of latents that never fire on the held-out tokens (and the model's own
            tokens_since_fired counter, core.dead_fraction)

Language-model loss with the reconstruction spliced in (single-layer dictionaries): the output of
block l is replaced by x̂_raw = x̂ / s_l at the real tokens (special tokens keep their activation,
as in the harvest), and the next-token cross-entropy is averaged over the predictions made at
real tokens of real tokens (keep[t] and keep[t+1]).
    CE increase        = CE_spliced − CE_clean
    fraction recovered = (CE_ablate − CE_spliced) / (CE_ablate − CE_clean), with the block output
                         zero-ablated or mean-ablated (mean of x_raw over the held-out tokens)

Functional coherence (fmxcoders arXiv 2605.09438, pp. 6 and 14: each layer zeroed in turn, the relative
change of every latent with ε = 1e-8; the closed form below is our reading of that description: it lies
in [1, L], which fits the paper's "driven by one or two layers"); a_i = ReLU(pre_i) after ReLU and
before the sparsifier, "layer l zeroed" = x_model[l] = 0 in the dictionary's input space (pre_acts
subtracts b_dec inside, so a zero input is what the model sees as a missing layer, exactly as in
training's stochastic layer masking):
    Δ_il = mean over the tokens where latent i fires (z_i > 0) of |a_i(x) − a_i(x, l zeroed)| / (a_i(x) + 1e-8)
    FC_i = Σ_l Δ_il / max_l Δ_il ∈ [1, L]       1: driven by one layer, L: by all layers equally
Reported: mean FC over latents that fired ≥ min_fires times, a histogram over [1, L], the fraction
with FC ≥ 2, and the same spread ratio of the per-layer decoder norms Σ_l ‖d_il‖ / max_l ‖d_il‖,
which standard crosscoders keep high while their FC is low (the paper's point), and FC binned by that
spread (`fc_by_spread`: a mean FC mixes layer-local latents, spread ≈ 1, with multi-layer ones). Given
the data's mean (`mean_LD`), also FC under mean ablation (layer l replaced by its mean E x_l instead of 0:
a zeroed layer is far out of distribution where the residual mean is large), `fc_mean_ablation`.
The description leaves three choices open; `--fc-variants` reports FC under six readings on the same
tokens (FC_READINGS: a = ReLU(pre) or z; over firing or all tokens; mean of ratios or ratio of means).
The two left out (ARTEFACT_READINGS, `--fc-artefacts`) average the per-token ratio |a − a_l| / (a + ε)
over all tokens: where the latent is off (a = 0) it divides by ε, so on trained dictionaries essentially
all of their sum comes from tokens where the latent is off (`fc_artefacts[...]["off_token_share"]`); they
count how often zeroing a layer switches a latent on, not what drives it when it fires. Artefacts, not
readings (on planted features they miss the best linear encoder's FC; experiments/ground_truth.py).

Class-conditional Wasserstein distance (PolySAE arXiv 2602.01322, Table 1, computed as its SAEBench fork's
compute_mean_wasserstein_distance does):
latents mean-pooled over each text's tokens (probe.pooled_latents), for each class c one vs rest
and every latent i the 1-D Wasserstein-1 distance
    W1(u, v) = ∫ |F_u(t) − F_v(t)| dt            (F the empirical CDFs; samples of any sizes)
averaged over all latents; reported per class and the mean / median over classes.

Interaction vs co-occurrence (PolySAE arXiv 2602.01322: r = 0.06 vs 0.82): for the n most frequent latents
on held-out tokens, over the off-diagonal pairs i < j, the Pearson correlation of the learned
interaction weight ‖Θ2[i, j, :]‖ (polysae.PolySAE.interaction_matrix) with the co-occurrence
frequency P(z_i > 0 and z_j > 0), next to that of the feature covariance Cov(z_i, z_j).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

import activations
import core
from probe import percentile_interval

EPS = 1e-8


# ----------------------------------------------------------------------------------------
# Reconstruction: MSE, FVU (accumulated exactly), L0, dead latents
# ----------------------------------------------------------------------------------------


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ (x − x̂)² over every dimension but the first (tokens), then the mean over tokens."""
    return (x - x_hat).pow(2).flatten(1).sum(-1).mean()


def moments(x_N: Tensor) -> tuple[int, Tensor, Tensor]:
    """(n, mean, m2) of a batch along dim 0, m2 = Σ_n (x − mean)² (float64, per dimension)."""
    x = x_N.double()
    mean = x.mean(0)
    return x.shape[0], mean, (x - mean).pow(2).sum(0)


def merge_moments(a: tuple[int, Tensor, Tensor], b: tuple[int, Tensor, Tensor]) -> tuple[int, Tensor, Tensor]:
    """Chan et al. (1979): (n, mean, m2) of the union of two disjoint samples."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta.pow(2) * (na * nb / n)


class ReconStats:
    """Accumulates, over batches, what the reconstruction metrics need for one dictionary.

    update(x, out): x (B, L, d) or (B, d) in the dictionary's input units, out its sae.Output."""

    def __init__(self):
        self.n, self.sse_L, self.mom, self.l0 = 0, None, (0, None, None), 0.0
        self.fire_count_F = None

    @torch.no_grad()
    def update(self, x: Tensor, out: core.Output) -> None:
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])                   # (B, L, d), L = 1 for an SAE
        r3 = out.recon.reshape(x3.shape)
        sse_L = (x3 - r3).double().pow(2).sum((0, 2)).cpu()
        self.sse_L = sse_L if self.sse_L is None else self.sse_L + sse_L
        n, mean_LD, m2_LD = moments(x3)
        self.mom = merge_moments(self.mom, (n, mean_LD.cpu(), m2_LD.cpu()))
        fired_BF = out.latents > 0
        self.l0 += fired_BF.sum().item()
        count_F = fired_BF.sum(0).cpu()
        self.fire_count_F = count_F if self.fire_count_F is None else self.fire_count_F + count_F
        self.n += x3.shape[0]

    def result(self, s_model_L: Tensor, s_norm_L: Tensor) -> dict:
        """Metrics; s_model_L the model's input scale, s_norm_L the data's normalising scale."""
        if self.n == 0:
            raise ValueError("no held-out tokens were evaluated (0 tokens)")
        s_model, s_norm = s_model_L.double(), s_norm_L.double()
        sse_raw_L = self.sse_L / s_model.pow(2)                      # back to raw activation units
        sst_raw_L = self.mom[2].sum(-1) / s_model.pow(2)             # Σ‖x − x̄‖² per layer
        sse_norm_L, sst_norm_L = sse_raw_L * s_norm.pow(2), sst_raw_L * s_norm.pow(2)
        return {
            "tokens": self.n,
            "mse_raw": (sse_raw_L.sum() / self.n).item(),
            "mse_raw_per_layer": (sse_raw_L / self.n).tolist(),
            "mse_norm": (sse_norm_L.sum() / self.n).item(),
            "fvu": (sse_norm_L.sum() / sst_norm_L.sum()).item(),
            "fvu_per_layer": (sse_raw_L / sst_raw_L).tolist(),
            "l0": self.l0 / self.n,
            "dead_eval": (self.fire_count_F == 0).double().mean().item(),
            "_sse_raw_L": sse_raw_L, "_sst_raw_L": sst_raw_L,
            "_mean_raw_LD": self.mom[1] / s_model[:, None],
        }


# ----------------------------------------------------------------------------------------
# Functional coherence and decoder-norm spread (multi-layer dictionaries)
# ----------------------------------------------------------------------------------------


def spread(v_FL: Tensor) -> Tensor:
    """(F,) Σ_l v_il / max_l v_il ∈ [1, L] for non-negative v (nan where a row is all zero)."""
    v = v_FL.double()
    return v.sum(-1) / v.max(-1).values


@torch.no_grad()
def layer_deltas(model, x_BLD: Tensor, eps: float = EPS, fill_LD: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One batch: (Σ over firing tokens of |a − a_(l zeroed)| / (a + eps)) as (F, L), fires (F,); with
    fill_LD (L, d) layer l is replaced by fill_LD[l] instead of 0 (mean ablation: the data's mean)."""
    sums, fires = layer_delta_sums(model, x_BLD, eps, fill_LD=fill_LD)
    return sums[MAIN], fires


# The readings of "the relative change of each latent when a layer is zeroed" (arXiv 2605.09438, pp. 6, 14):
#   act      pre: a = ReLU(pre), before the sparsifier (ours) | post: z, after it
#   over     fired: the tokens where the latent fires (z > 0, ours) | all: every token
#   form     ratio_mean: mean_t |a − a_l| / (a + ε) (ours) | mean_ratio: mean_t |a − a_l| / (mean_t a + ε)
# "all" with ratio_mean divides by ε wherever a = 0: ARTEFACT_READINGS, reported only when asked for.
ALL_READINGS = [(act, over, form) for act in ("pre", "post") for over in ("fired", "all")
                for form in ("ratio_mean", "mean_ratio")]
ARTEFACT_READINGS = [("pre", "all", "ratio_mean"), ("post", "all", "ratio_mean")]
FC_READINGS = [r for r in ALL_READINGS if r not in ARTEFACT_READINGS]
MAIN = ("pre", "fired", "ratio_mean")


@torch.no_grad()
def layer_delta_sums(model, x_BLD: Tensor, eps: float = EPS, readings=(MAIN,),
                     fill_LD: Tensor | None = None) -> tuple[dict, Tensor]:
    """One batch: {reading: what Δ averages, summed over the batch, (F, L)} (ratio_mean: Σ of the ratios;
    mean_ratio: Σ|a − a_l| and, under ("den", act, over), Σa) and the fires (F,); Δ = sums / counts.
    Layer l is zeroed, or replaced by fill_LD[l] (L, d) when given (mean ablation)."""
    pre_BF = model.pre_acts(x_BLD)
    z_BF = core.latents_of(model, pre_BF)
    acts = {"pre": pre_BF.relu(), "post": z_BF}
    fired_BF = (z_BF > 0).double()
    over_set = lambda v_BF, over: (v_BF * fired_BF if over == "fired" else v_BF).sum(0)  # noqa: E731  (F,)
    sums = {r: [] for r in readings}
    for l in range(x_BLD.shape[1]):
        x_l = x_BLD.clone()
        x_l[:, l] = 0 if fill_LD is None else fill_LD[l].to(x_BLD.dtype)
        pre_l = model.pre_acts(x_l)
        acts_l = {"pre": pre_l.relu(), "post": core.latents_of(model, pre_l) if any(r[0] == "post" for r in readings)
                  else None}
        for act, over, form in readings:
            diff_BF = (acts[act] - acts_l[act]).abs()
            if form == "ratio_mean":
                diff_BF = diff_BF / (acts[act] + eps)
            sums[(act, over, form)].append(over_set(diff_BF.double(), over))
    out = {r: torch.stack(v, dim=1) for r, v in sums.items()}
    for act, over, form in readings:
        if form == "mean_ratio":
            out[("den", act, over)] = over_set(acts[act].double(), over)
    return out, fired_BF.sum(0)


def coherence(sums: dict, fires_F: Tensor, n_tokens: int, reading, eps: float = EPS) -> Tensor:
    """(F,) FC_i = Σ_l Δ_il / max_l Δ_il under `reading`, from summed layer_delta_sums."""
    act, over, form = reading
    count_F = fires_F if over == "fired" else torch.full_like(fires_F, n_tokens)
    if form == "ratio_mean":
        delta_FL = sums[reading] / count_F.clamp_min(1)[:, None]
    else:
        delta_FL = sums[reading] / (sums[("den", act, over)] + eps * count_F.clamp_min(1))[:, None]
    return spread(delta_FL)


def off_token_share(sums: dict, act: str, form: str) -> Tensor:
    """(F,) the share of an all-token reading's sum (over tokens and layers) that comes from tokens where
    the latent is off: 1 − Σ_l fired / Σ_l all (the per-token terms of ("act", "fired", form) and
    ("act", "all", form) are the same; only the tokens differ). Needs both readings in `sums`."""
    total = sums[(act, "all", form)].sum(-1)
    return 1 - sums[(act, "fired", form)].sum(-1) / total


@torch.no_grad()
def fc_per_latent(model, batches: Iterable[Tensor], readings=(MAIN,), eps: float = EPS,
                  fill_LD: Tensor | None = None) -> tuple[dict, Tensor, dict]:
    """({reading: FC (F,)}, fires (F,), the summed layer_delta_sums) over batches (B, L, d), layer l zeroed
    or replaced by fill_LD[l]. FC is nan for a latent that never fires."""
    sums, fires_F, n = None, None, 0
    for x in batches:
        s, f = layer_delta_sums(model, x, eps, readings, fill_LD)
        sums = s if sums is None else {k: sums[k] + v for k, v in s.items()}
        fires_F, n = (f if fires_F is None else fires_F + f), n + x.shape[0]
    if sums is None:
        raise ValueError("functional_coherence got no batches")
    return {r: coherence(sums, fires_F, n, r, eps) for r in readings}, fires_F, sums


def by_spread(fc_F: Tensor, spread_F: Tensor, n_layers: int) -> dict:
    """Mean FC of the latents in each decoder-norm-spread bin [1, 2), [2, 3), ..., [L − 1, L]: how FC goes
    with how many layers a latent writes, which a mean over all latents mixes up."""
    edges = list(range(1, n_layers + 1))
    b = (spread_F.double().floor().clamp(1, n_layers - 1) - 1).long()
    fc, count = [], []
    for i in range(n_layers - 1):
        v = fc_F[(b == i) & torch.isfinite(fc_F)]
        fc.append(v.mean().item() if len(v) else math.nan)
        count.append(len(v))
    return {"edges": edges, "fc_mean": fc, "latents": count}


@torch.no_grad()
def readout_profile(W_enc_LDF: Tensor, u_FD: Tensor) -> tuple[Tensor, Tensor]:
    """How each latent's encoder reads a direction u_f at every layer: (cos, projection), both (F, L), with
    cos[f, l] = cos(W_enc[l][:, f], u_f) and projection[f, l] = W_enc[l][:, f] · u_f / ‖u_f‖."""
    W_FLD = W_enc_LDF.detach().permute(2, 0, 1).double()
    u = u_FD.detach().double().to(W_FLD.device)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = torch.einsum("fld,fd->fl", W_FLD, u)
    return proj / W_FLD.norm(dim=-1).clamp_min(1e-12), proj


@torch.no_grad()
def differencing_signature(W_enc_LDF: Tensor, W_dec_FLD: Tensor) -> dict:
    """Per latent (F,): u_f = its decoder direction at the layer it writes most (max_l ‖W_dec[f, l]‖), r_l the
    projection of its encoder weights at layer l on u_f (readout_profile), the peak p = argmax_l r_l, and
    `ratio` = r_(p−1) / r_p (nan where p = 0), `cos_before`, `cos_peak` the cosines there. A latent that reads
    a persistent residual-stream feature by differencing (x_p − x_(p−1), cancelling what the stream already
    held) has ratio ≈ −1; one that reads only the layers it writes has ratio ≥ 0."""
    F_ = W_dec_FLD.shape[0]
    top_F = W_dec_FLD.detach().norm(dim=-1).argmax(-1)
    u_FD = W_dec_FLD.detach()[torch.arange(F_), top_F]
    cos_FL, proj_FL = readout_profile(W_enc_LDF, u_FD)
    p_F = proj_FL.argmax(-1)
    before = (p_F - 1).clamp_min(0)
    ar = torch.arange(F_, device=p_F.device)
    nan = torch.full((F_,), math.nan, dtype=torch.float64, device=p_F.device)
    ratio = torch.where(p_F > 0, proj_FL[ar, before] / proj_FL[ar, p_F], nan)
    return {"peak": p_F.cpu(), "ratio": ratio.cpu(), "cos_before": torch.where(p_F > 0, cos_FL[ar, before], nan).cpu(),
            "cos_peak": cos_FL[ar, p_F].cpu()}


@torch.no_grad()
def functional_coherence(model, batches: Iterable[Tensor], min_fires: int = 10, bins: int = 10,
                         eps: float = EPS, variants: bool = False, mean_LD: Tensor | None = None,
                         artefacts: bool = False) -> dict:
    """FC over batches of normalised inputs (B, L, d); see the module docstring. variants: also FC under
    the readings of FC_READINGS, on the same tokens and latents ("fc_readings"); artefacts: also the
    ARTEFACT_READINGS with their off-token share ("fc_artefacts"); mean_LD (L, d), the data's mean in the
    model's input units: also FC under mean ablation ("fc_mean_ablation", "fc_mean_ablation_by_spread")."""
    readings = [MAIN] + [r for r in (FC_READINGS if variants else []) + (ALL_READINGS if artefacts else [])
                         if r != MAIN]
    readings = list(dict.fromkeys(readings))
    if mean_LD is not None:
        batches = list(batches)                                      # read twice: zeroed, then mean-ablated
    fcs, fires_F, sums = fc_per_latent(model, batches, readings, eps)
    L = sums[MAIN].shape[1]
    fc_F = fcs[MAIN]
    ok = (fires_F >= min_fires) & torch.isfinite(fc_F)
    fc = fc_F[ok].cpu()
    norm_spread_F = spread(model.decoder_norms().detach()).cpu()
    hist = torch.histc(fc.float(), bins=bins, min=1.0, max=float(L)) if len(fc) else torch.zeros(bins)
    out = {"fc_mean": fc.mean().item() if len(fc) else math.nan,
           "fc_median": fc.median().item() if len(fc) else math.nan,
           "fc_frac_ge2": (fc >= 2).double().mean().item() if len(fc) else math.nan,
           "fc_latents": int(ok.sum()), "min_fires": min_fires,
           "fc_hist": hist.long().tolist(), "fc_hist_edges": torch.linspace(1, L, bins + 1).tolist(),
           "norm_spread_mean": norm_spread_F[ok.cpu()].nanmean().item() if ok.any() else math.nan,
           "norm_spread_mean_all": norm_spread_F.nanmean().item(),
           "fc_by_spread": by_spread(fc, norm_spread_F[ok.cpu()], L)}
    if mean_LD is not None:
        fcm_F = fc_per_latent(model, batches, (MAIN,), eps, mean_LD)[0][MAIN].cpu()
        okm = ok.cpu() & torch.isfinite(fcm_F)
        out["fc_mean_ablation"] = fcm_F[okm].mean().item() if okm.any() else math.nan
        out["fc_mean_ablation_by_spread"] = by_spread(fcm_F[okm], norm_spread_F[okm], L)

    def summary(r):
        v = fcs[r][ok].cpu()
        v = v[torch.isfinite(v)]
        return {"mean": v.mean().item() if len(v) else math.nan,
                "median": v.median().item() if len(v) else math.nan,
                "frac_ge2": (v >= 2).double().mean().item() if len(v) else math.nan, "latents": len(v)}

    if variants:
        out["fc_readings"] = {"/".join(r): summary(r) for r in FC_READINGS}
    if artefacts:
        out["fc_artefacts"] = {"/".join(r): {**summary(r), "off_token_share": off_token_share(sums, r[0], r[2])[
            ok].nanmean().item() if ok.any() else math.nan, "note": "artefact: divides by eps where the latent is off"}
            for r in ARTEFACT_READINGS}
    return out


# ----------------------------------------------------------------------------------------
# Wasserstein-1 between the classes (PolySAE / SAEBench)
# ----------------------------------------------------------------------------------------


def wasserstein_1d(u_NF: Tensor, v_MF: Tensor) -> Tensor:
    """(F,) exact W1 = ∫|F_u − F_v| between the columns of u (N, F) and v (M, F), N ≠ M allowed."""
    if u_NF.ndim != 2 or v_MF.ndim != 2 or u_NF.shape[1] != v_MF.shape[1] or not len(u_NF) or not len(v_MF):
        raise ValueError(f"wasserstein_1d expects non-empty (N, F) and (M, F), got {tuple(u_NF.shape)} "
                         f"and {tuple(v_MF.shape)}")
    u = u_NF.T.contiguous().sort(-1).values                          # (F, N)
    v = v_MF.T.contiguous().sort(-1).values                          # (F, M)
    allv = torch.cat([u, v], -1).sort(-1).values                     # (F, N + M)
    width = allv.diff(dim=-1)                                        # (F, N + M − 1)
    left = allv[:, :-1].contiguous()
    cdf_u = torch.searchsorted(u, left, right=True).to(u.dtype) / u.shape[1]
    cdf_v = torch.searchsorted(v, left, right=True).to(v.dtype) / v.shape[1]
    return ((cdf_u - cdf_v).abs() * width).sum(-1)


def class_wasserstein(features_NF: Tensor, labels, chunk: int = 2048) -> dict:
    """Per class (one vs rest): mean over latents of W1(latent | class, latent | rest);
    then the mean and median over classes. features: (N, F) pooled latents, labels: N items."""
    x = torch.as_tensor(features_NF, dtype=torch.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(labels) != len(x):
        raise ValueError(f"class_wasserstein expects features (N, F) and N labels, got {tuple(x.shape)} "
                         f"and {len(labels)} labels")
    per = {}
    for c in np.unique(labels):
        pos = torch.as_tensor(labels == c)
        if pos.all():
            raise ValueError(f"class_wasserstein needs at least two classes, got only {c!r}")
        w = torch.cat([wasserstein_1d(x[pos, i:i + chunk], x[~pos, i:i + chunk])
                       for i in range(0, x.shape[1], chunk)])
        per[str(c)] = w.mean().item()
    vals = np.array(list(per.values()))
    return {"per_class": per, "mean": float(vals.mean()), "median": float(np.median(vals))}


def wasserstein_intervals(features: dict, labels, n_boot: int = 200, seed: int = 0, reference: str | None = None,
                          keep_replicates: bool = False) -> dict:
    """Paired bootstrap of class_wasserstein's mean for several feature sets of the same texts:
    {name: {"mean", "mean_ci"}} and, with `reference`, {"ratio_ci": {name: interval of
    W1(name) / W1(reference)}}. Every resample draws the texts (rows) with replacement once, for all
    feature sets alike. W1 between finite samples is biased upward (noise alone gives a distance
    that shrinks like 1/sqrt(n)), so absolute values compare only at equal numbers of texts; the
    ratio of two dictionaries on the same resamples is the comparison the intervals are for."""
    labels = np.asarray(labels)
    point = {k: class_wasserstein(f, labels)["mean"] for k, f in features.items()}
    g = torch.Generator().manual_seed(seed)
    reps: dict[str, list] = {k: [] for k in features}
    for _ in range(n_boot):
        idx = torch.randint(len(labels), (len(labels),), generator=g)
        if len(np.unique(labels[idx.numpy()])) < len(np.unique(labels)):
            continue                                     # a class not drawn at all: skip the resample
        for k, f in features.items():
            reps[k].append(class_wasserstein(torch.as_tensor(f)[idx], labels[idx.numpy()])["mean"])
    out = {k: {"mean": point[k], "mean_ci": percentile_interval(reps[k]), **({"replicates": reps[k]} if keep_replicates
                                                                              else {})} for k in features}
    if reference is not None:
        out["ratio_ci"] = {k: percentile_interval([a / b for a, b in zip(reps[k], reps[reference])])
                           for k in features if k != reference}
    return out


# ----------------------------------------------------------------------------------------
# Interaction weights vs co-occurrence (PolySAE)
# ----------------------------------------------------------------------------------------


def offdiag_pearson(a_NN: Tensor, b_NN: Tensor) -> float:
    """Pearson correlation of two symmetric (n, n) matrices over the pairs i < j."""
    if a_NN.shape != b_NN.shape or a_NN.ndim != 2 or a_NN.shape[0] != a_NN.shape[1] or a_NN.shape[0] < 3:
        raise ValueError(f"offdiag_pearson expects two (n, n) matrices with n >= 3, got "
                         f"{tuple(a_NN.shape)} and {tuple(b_NN.shape)}")
    i, j = torch.triu_indices(*a_NN.shape, offset=1)
    a, b = a_NN[i, j].double().cpu(), b_NN[i, j].double().cpu()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def roc_auc(pos: Tensor, neg: Tensor) -> float:
    """Area under the ROC curve of scores that should rank `pos` (n,) above `neg` (m,): the fraction of the n·m
    (positive, negative) pairs ordered right, ties counting ½ (the Mann-Whitney U / nm). 0.5 is chance."""
    pos, neg = torch.as_tensor(pos).double().flatten(), torch.as_tensor(neg).double().flatten()
    if not len(pos) or not len(neg):
        raise ValueError(f"roc_auc needs at least one positive and one negative score, got {len(pos)} and {len(neg)}")
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


@torch.no_grad()
def cooccurrence(latent_batches: Iterable[Tensor], idx: Tensor) -> tuple[Tensor, Tensor]:
    """For latents idx (n,) over batches of z (B, F): co-occurrence frequency P(z_i>0, z_j>0)
    and covariance Cov(z_i, z_j), both (n, n), over all tokens."""
    n_tok, both, szz, sz = 0, 0.0, 0.0, 0.0
    for z_BF in latent_batches:
        z = z_BF[:, idx.to(z_BF.device)].double()
        f = (z > 0).double()
        both, szz, sz = both + f.T @ f, szz + z.T @ z, sz + z.sum(0)
        n_tok += z.shape[0]
    mean = sz / n_tok
    cov = szz / n_tok - mean[:, None] * mean[None, :]
    return (both / n_tok).cpu(), cov.cpu()


def interaction_vs_cooccurrence(model, latent_batches: Iterable[Tensor], fire_count_F: Tensor,
                                n: int = 512) -> dict:
    """r(‖Θ2[i,j]‖, cooc) and r(cov, cooc) over the n most frequent firing latents."""
    alive = int((fire_count_F > 0).sum())
    n = min(n, alive)
    if n < 3:
        raise ValueError(f"interaction_vs_cooccurrence needs at least 3 latents that fire, got {alive}")
    idx = fire_count_F.topk(n).indices
    cooc, cov = cooccurrence(latent_batches, idx)
    inter = model.interaction_matrix(idx).cpu()
    return {"n_latents": n, "r_interaction_cooc": offdiag_pearson(inter, cooc),
            "r_covariance_cooc": offdiag_pearson(cov, cooc)}


# ----------------------------------------------------------------------------------------
# LM loss with the reconstruction spliced in
# ----------------------------------------------------------------------------------------


def next_token_ce(logits_BTV: Tensor, input_ids_BT: Tensor, keep_BT: Tensor) -> tuple[float, int]:
    """(Σ CE, count) of the predictions at real tokens t of real tokens t+1 (keep[t] & keep[t+1])."""
    logp = logits_BTV[:, :-1].float().log_softmax(-1)
    target = input_ids_BT[:, 1:].to(logp.device)
    ce_BT = -logp.gather(-1, target[..., None])[..., 0]
    mask = (keep_BT[:, :-1] & keep_BT[:, 1:]).to(logp.device)
    return ce_BT[mask].double().sum().item(), int(mask.sum())


def frac_recovered(ce_clean: float, ce_spliced: float, ce_ablate: float) -> float:
    """(CE_ablate − CE_spliced) / (CE_ablate − CE_clean): 1 perfect, 0 no better than ablation."""
    return (ce_ablate - ce_spliced) / (ce_ablate - ce_clean)


@torch.no_grad()
def ce_recovered_all(lm, windows: Iterable[dict], splices: list[tuple[int, Callable, Tensor]],
                     progress: bool = False) -> list[dict]:
    """ce_recovered for several (layer, reconstruct, mean_raw_D) splices over the same windows: one clean
    pass per batch for all of them, and each spliced / ablated pass runs only the blocks after its layer
    (logits_from_block)."""
    from tqdm import tqdm

    clean = [0.0, 0]
    totals = [{"spliced": [0.0, 0], "zero": [0.0, 0], "mean": [0.0, 0]} for _ in splices]
    layers = sorted({l for l, _, _ in splices})
    bar = tqdm(desc="LM loss", unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress)
    for batch in windows:
        keep = batch["keep"].to(next(lm.parameters()).device)
        logits, outs = activations.block_outputs(lm, batch, layers)
        s, n = next_token_ce(logits, batch["input_ids"], keep)
        clean[0], clean[1] = clean[0] + s, clean[1] + n
        for (layer, reconstruct, mean_raw_D), tot in zip(splices, totals):
            fns = {"spliced": reconstruct, "zero": torch.zeros_like,
                   "mean": lambda h: mean_raw_D.to(h.device, h.dtype).expand_as(h)}
            for name, fn in fns.items():
                s, n = next_token_ce(activations.logits_from_block(lm, batch, layer, activations.spliced(outs[layer], keep, fn)),
                                     batch["input_ids"], keep)
                tot[name][0] += s
                tot[name][1] += n
        bar.update(int(keep.sum()))
    bar.close()
    if clean[1] == 0:
        raise ValueError("ce_recovered got no real next-token predictions (empty windows)")
    results = []
    for tot in totals:
        ce = {"clean": clean[0] / clean[1], **{k: s / n for k, (s, n) in tot.items()}}
        results.append({"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
                        "ce_mean": ce["mean"], "ce_increase": ce["spliced"] - ce["clean"], "ce_tokens": clean[1],
                        "frac_recovered_zero": frac_recovered(ce["clean"], ce["spliced"], ce["zero"]),
                        "frac_recovered_mean": frac_recovered(ce["clean"], ce["spliced"], ce["mean"])})
    return results


def ce_recovered(lm, windows: Iterable[dict], layer: int, reconstruct: Callable[[Tensor], Tensor],
                 mean_raw_D: Tensor) -> dict:
    """CE clean / spliced / zero- / mean-ablated at block `layer` over token windows
    (dicts of input_ids, attention_mask, keep), and the fractions recovered."""
    return ce_recovered_all(lm, windows, [(layer, reconstruct, mean_raw_D)])[0]


if __name__ == "__main__":     # the command line lives in support/evaluate.py, which is built on this module
    from support.evaluate import main
    raise SystemExit(main())

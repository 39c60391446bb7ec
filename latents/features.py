"""What each latent means: its top activating contexts on held-out text, and the numbers around them.

    python -m latents.features RUN_DIR [--thorough] [--tokens 30000] [--top 16] [--device cuda] [--intervene]

streams held-out text of the run through the LM and every dictionary of the run (the four kinds, per-layer
sets included), in batches of context windows with bounded memory, and writes RUN_DIR/features.json and the
browsable page RUN_DIR/features.html (latents/page.py). The text is the run's held-out stream (metrics.py:
the windows that follow its training tokens, support.corpora.heldout_text), read as the harvest reads it: the
same windows, special tokens excluded, attention-sink outliers dropped when the run dropped them. Each
window's first real token (`--skip-first`) is counted in every statistic but never peaks a top or sampled
example: a window starts mid-document after BOS, so that token has no context to explain it.

For every latent i of a dictionary, with z_i(t) its activation at token t (encode, as in inference):
  top        the `top` windows w with the largest m_i(w) = max_{t∈w} z_i(t); for each one the snippet of
             `left` tokens before and `right` after the peak t* = argmax_t z_i(t), with z_i at every token
  quantiles  a uniform random sample of `samples` firing windows (m_i(w) > 0) is kept while streaming
             (reservoir sampling: the windows with the `samples` smallest iid uniform keys); at the end it
             is cut into `bands` quantile bands of m_i and `per_band` examples of each band are kept
             (windows already in `top` excluded): the typical, weaker activations that top examples hide
  density    #{t : z_i(t) > 0} / #tokens;  max, mean over firing tokens
  histogram  counts of the firing z_i(t) in `bins` log-spaced bins over [HIST_LO, HIST_HI] (values outside
             go to the end bins), shared edges `hist_edges`
  pool_fires the indices of the random snippets ("pool": `pool` snippets, each centred on a random token of
             a random window, the same for every dictionary) on which latent i fires: the judge's
             non-activating examples are the others (autointerp.py)
  promoted / suppressed  the tokens with the largest / smallest logit of the latent's decoder direction d_i
             at the last layer it writes, through the final norm and the unembedding:
                 logits_i = (norm(d_i) − norm(0)) W_Uᵀ           (V,)
             norm(d) − norm(0) is the norm's linear part applied to d (LayerNorm: γ ⊙ (d − mean d)/σ(d),
             RMSNorm: g ⊙ d / rms(d)): the logit lens of SAE dashboards, scale-free
  intervention (with --intervene) the tokens the latent promotes and suppresses through the rest of the model,
             where it fires: latents/intervene.py's ablation (z_i zeroed at every layer the dictionary writes and at
             every real token, the reconstruction error kept) in each of its first `intervene_contexts` top
             contexts, cut after the peak (BOS + the snippet up to t*), read at the peak:
                 effect_i = mean over the contexts of  p_clean(v | ..t*) − p_ablated(v | ..t*)   (V,)
             promoted / suppressed: the largest / smallest effect; kl: the mean KL(clean || ablated) there
  crosscoder, fmxcoder: layer_delta Δ_il (metrics.layer_deltas, the functional-coherence formula of
             fmxcoders, arXiv 2605.09438 pp. 6 and 14, on the first `fc_tokens` tokens), fc = Σ_l Δ_il / max_l Δ_il (null when the
             latent fired fewer than `min_fires` times there), decoder_norms ‖d_il‖ per layer
  polysae    partners: the `partners` latents j with the largest ‖Θ2[i, j, :]‖ (PolySAE arXiv 2602.01322: Θ2[i,j,:] = Σ_r U_ir U_jr C2[:, r], polysae.py), among the
             `inter_latents` most frequent ones (both i and j; the others have none)

Shapes: a batch is B windows of T tokens; z: (B, T, F); the kept examples (F, K, W) with W = left + 1 + right.

features.json: {"run", "model", "text", "tokens" (read), "windows", "settings", "hist_edges", "vocab" {id: string},
"special_ids", "pool": {"tokens" [P][W], "window" [P], "center" [P]}, "dictionaries": [{"name", "kind", "layers",
"n_latents", "alive", "fc_tokens", "latents": [{"id", "fires", "density", "max_act", "mean_act", "promoted" and
"suppressed" [[token id, logit]], and when it fired "hist", "top" and per band "quantiles"[b]["examples"]: examples
{"act" (window max), "window", "peak" (index in the snippet), "tokens" [W] ids, "acts" [W]}, "pool_fires"; for
crosscoders "layer_delta", "fc", "decoder_norms"; for PolySAE "partners" [[j, weight]]; with --intervene
"intervention" {"promoted", "suppressed" [[token id, effect]], "kl", "contexts"}}]}]}. Ids are −1 at
positions outside the window; acts are in the dictionary's normalised input units (activations.py).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

import activations
import core
import metrics
from core import opt
from latents import intervene
from support import cache as activation_cache
from support import cli, corpora, runs, saved
from support.files import json_text, write_atomic
from support.heldout import check_held_out

HIST_LO, HIST_HI = 1e-2, 1e3          # histogram range of activations (normalised units)
VERSION = 1

QUICK = {"tokens": 30_000, "fc_tokens": 10_000}
"""The defaults of features.py: well under the training time of the default run on a laptop CPU (see the
README). --thorough uses THOROUGH; a flag given explicitly wins over either."""
THOROUGH = {"tokens": 100_000, "fc_tokens": 20_000}
"""The earlier defaults: the settings of latents/README.md's pages and examples."""


@dataclass
class Settings:
    """What is kept per latent (the flags of features.py besides --tokens, --device, --lm-batch)."""
    top: int = opt(16, "top-activating windows kept per latent")
    samples: int = opt(32, "reservoir of random firing windows per latent (the quantile examples)")
    bands: int = opt(4, "quantile bands of the reservoir")
    per_band: int = opt(2, "examples kept per band")
    left: int = opt(16, "tokens before the peak in a snippet")
    right: int = opt(8, "tokens after it")
    pool: int = opt(256, "random snippets (the judge's non-activating examples)")
    bins: int = opt(50, "histogram bins")
    fc_tokens: int = opt(QUICK["fc_tokens"], "tokens for the per-layer profile (crosscoders; --thorough: "
                                             f"{THOROUGH['fc_tokens']:,})")
    min_fires: int = opt(10, "latents firing fewer times on them get no FC")
    logits: int = opt(10, "promoted and suppressed tokens per latent")
    partners: int = opt(5, "PolySAE interaction partners per latent")
    inter_latents: int = opt(1024, "PolySAE: most frequent latents searched for partners")
    intervene: bool = opt(False, "also ablate each latent in its top contexts: the tokens it promotes through the "
                                 "rest of the model (latents/intervene.py; LM passes over contexts x latents)")
    intervene_contexts: int = opt(4, "top contexts per latent ablated with --intervene")
    skip_first: int = opt(1, "each window's first real tokens counted but never shown as a top or sampled example "
                             "(a window starts mid-document: they have no context)")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self):
        self.check()

    def check(self, name=lambda f: "--" + f.replace("_", "-")) -> None:
        for f in ("top", "samples", "bands", "per_band", "left", "right", "pool", "bins", "fc_tokens", "min_fires",
                  "logits", "partners", "inter_latents", "seed", "intervene_contexts", "skip_first"):
            v, zero_ok = getattr(self, f), f in ("left", "right", "fc_tokens", "partners", "seed", "skip_first")
            if not isinstance(v, int) or v < (0 if zero_ok else 1):
                raise ValueError(f"{name(f)} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")


# ----------------------------------------------------------------------------------------
# Streaming selection: the K best candidates per latent by a key, with their payload
# ----------------------------------------------------------------------------------------


class Best:
    """For each of F rows, the K candidates with the largest key seen so far (−inf: empty slot),
    and their payload tensors (F, K, ...). `offer` merges a batch of C candidates per row."""

    def __init__(self, F: int, K: int, shapes: dict[str, tuple], device):
        self.key = torch.full((F, K), -math.inf, device=device)
        self.data = {name: torch.zeros((F, K, *shape), dtype=dtype, device=device)
                     for name, (shape, dtype) in shapes.items()}

    def offer(self, key_FC: Tensor, **data_FC: Tensor) -> None:
        keys = torch.cat([self.key, key_FC], 1)
        self.key, idx_FK = keys.topk(self.key.shape[1], dim=1)
        for name, old in self.data.items():
            both = torch.cat([old, data_FC[name]], 1)
            idx = idx_FK.view(*idx_FK.shape, *[1] * (both.ndim - 2)).expand(-1, -1, *both.shape[2:])
            self.data[name] = both.gather(1, idx)

    def cpu(self) -> "Best":
        self.key, self.data = self.key.cpu(), {k: v.cpu() for k, v in self.data.items()}
        return self


def snippets(z_BTF: Tensor, ids_BT: Tensor, center_FB: Tensor, left: int, right: int) -> tuple[Tensor, Tensor]:
    """(acts (F, B, W), token ids (F, B, W)) of the snippets [c − left, c + right] of each window b
    around centre c = center_FB[f, b]; positions outside the window get act 0 and id −1."""
    B, T, F = z_BTF.shape
    pos_FBW = center_FB[..., None] + torch.arange(-left, right + 1, device=z_BTF.device)
    inside = (pos_FBW >= 0) & (pos_FBW < T)
    pos_FBW = pos_FBW.clamp(0, T - 1)
    acts = z_BTF.permute(2, 0, 1).gather(2, pos_FBW) * inside
    ids = ids_BT[None].expand(F, B, T).gather(2, pos_FBW).masked_fill(~inside, -1)
    return acts, ids


class Tracker:
    """Everything features.py keeps about one dictionary's F latents while the text streams by."""

    def __init__(self, F: int, s: Settings, device):
        W, self.s = s.left + 1 + s.right, s
        shapes = {"act": ((), torch.float32), "window": ((), torch.long),
                  "acts": ((W,), torch.float32), "ids": ((W,), torch.long)}
        self.top, self.sample = Best(F, s.top, shapes, device), Best(F, s.samples, shapes, device)
        self.fires = torch.zeros(F, dtype=torch.long, device=device)
        self.total = torch.zeros(F, dtype=torch.float64, device=device)
        self.hist = torch.zeros(F, s.bins, dtype=torch.long, device=device)
        self.inner_edges = torch.logspace(math.log10(HIST_LO), math.log10(HIST_HI), s.bins + 1, device=device)[1:-1]
        self.dsum, self.dfires = None, None                                      # per-layer profile sums

    @torch.no_grad()
    def update(self, z_BTF: Tensor, ids_BT: Tensor, window_B: Tensor, gen: torch.Generator,
               example_BT: Tensor | None = None) -> None:
        """Counts every firing; a window's top/sampled example peaks only where example_BT is True."""
        s = self.s
        z_NF = z_BTF.view(-1, z_BTF.shape[2])
        tok, f = z_NF.nonzero(as_tuple=True)                         # the firing entries only (z is sparse)
        val = z_NF[tok, f]
        self.fires.index_add_(0, f, torch.ones_like(f))
        self.total.index_add_(0, f, val.double())
        b = torch.bucketize(val, self.inner_edges, right=True)       # bin 0: below edge 1, last: above
        self.hist.view(-1).index_add_(0, f * s.bins + b, torch.ones_like(b))
        wmax_BF, peak_BF = (z_BTF if example_BT is None else z_BTF * example_BT[..., None]).max(1)
        act_FB, fires_FB = wmax_BF.T, wmax_BF.T > 0
        acts, ids = snippets(z_BTF, ids_BT, peak_BF.T, s.left, s.right)
        data = {"act": act_FB, "window": window_B.expand_as(act_FB), "acts": acts, "ids": ids}
        none = torch.full_like(act_FB, -math.inf)
        self.top.offer(torch.where(fires_FB, act_FB, none), **data)
        u_FB = torch.rand(act_FB.shape, generator=gen, device=act_FB.device)
        self.sample.offer(torch.where(fires_FB, u_FB, none), **data)


# ----------------------------------------------------------------------------------------
# The pass over the held-out text
# ----------------------------------------------------------------------------------------


def outlier_mask(h_BTLD: Tensor, keep_BT: Tensor, multiple: float) -> Tensor:
    """(B, T) True where a kept token's norm exceeds `multiple` × that layer's median over the batch's
    kept tokens, at any layer (activations.drop_outlier_tokens, as a mask)."""
    if not keep_BT.any():
        return keep_BT
    norms_BTL = h_BTLD.float().norm(dim=-1)
    med_L = norms_BTL[keep_BT].median(dim=0).values
    return (norms_BTL > multiple * med_L).any(-1) & keep_BT


def first_tokens(keep_BT: Tensor, n: int) -> Tensor:
    """(B, T) True at each window's first n kept tokens. A window starts mid-document after BOS, so these
    tokens have no context to explain them; in a SmolLM2 run they were the top example of 74-104 latents each."""
    return keep_BT & (keep_BT.long().cumsum(1) <= n)


def dictionary_input(x_NLD: Tensor, cols: list[int], model) -> Tensor:
    """The slice of the raw kept tokens (N, L_all, d) a dictionary reads, scaled by its input scale."""
    s_L = torch.tensor(model.config.input_scale, dtype=torch.float32, device=x_NLD.device)
    x = x_NLD[:, cols] * s_L[:, None]
    return x if core.is_multilayer(model) else x[:, 0]


@torch.no_grad()
def stream(entries, lm, tok, windows, n_tokens: int, s: Settings, drop_outliers: float | None,
           device, progress: bool = True) -> tuple[list[Tracker], dict]:
    """One pass over `windows` (collated dicts, corpora.heldout_windows): a Tracker per dictionary and
    the shared pool of random snippets {"ids": (P, W), "window": (P,), "center": (P,), "max<i>": (P, F_i)}."""
    from tqdm import tqdm

    layers = sorted({l for ls, _, _ in entries for l in ls})
    cols = [[layers.index(l) for l in ls] for ls, _, _ in entries]
    trackers = [Tracker(m.config.n_latents, s, device) for _, m, _ in entries]
    gen = torch.Generator(device=device).manual_seed(s.seed)
    # the pool: a uniform sample of windows (smallest iid keys), one snippet each, with every latent's max on it
    pool = Best(1, s.pool, {"ids": ((s.left + 1 + s.right,), torch.long), "window": ((), torch.long),
                            "center": ((), torch.long),
                            **{f"max{i}": ((m.config.n_latents,), torch.float32) for i, (_, m, _) in enumerate(entries)}},
                device)
    n_windows, n_seen = 0, 0
    bar = tqdm(total=n_tokens, desc="features", unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress)
    for batch in corpora.take_tokens(windows, n_tokens):
        h_BTLD = activations.hidden_states(lm, batch["input_ids"], batch["attention_mask"], layers).to(device)
        valid_BT = batch["keep"].to(device)
        example_BT = valid_BT & ~first_tokens(valid_BT, s.skip_first)
        if drop_outliers:
            valid_BT = valid_BT & ~outlier_mask(h_BTLD, valid_BT, drop_outliers)
            example_BT = example_BT & valid_BT
        ids_BT = batch["input_ids"].to(device).masked_fill(batch["attention_mask"].to(device) == 0, -1)
        x_NLD = h_BTLD[valid_BT].float()
        B, T = valid_BT.shape
        window_B = torch.arange(n_windows, n_windows + B, device=device)[None]
        center_B = (torch.rand(B, T, generator=gen, device=device) * valid_BT).argmax(1)  # a random valid token
        key_B = torch.rand(B, generator=gen, device=device).masked_fill(~valid_BT.any(1), -math.inf)
        cand = {"window": window_B, "center": center_B[None]}
        for i, ((ls, model, _), c, tr) in enumerate(zip(entries, cols, trackers)):
            z_NF = model.encode(dictionary_input(x_NLD, c, model)).float()
            z_BTF = z_NF.new_zeros(B, T, z_NF.shape[1])
            z_BTF[valid_BT] = z_NF
            tr.update(z_BTF, ids_BT, window_B, gen, example_BT)
            acts_FBW, ids_FBW = snippets(z_BTF, ids_BT, center_B[None].expand(z_NF.shape[1], -1), s.left, s.right)
            cand |= {f"max{i}": acts_FBW.amax(2).T[None], "ids": ids_FBW[:1]}
            if core.is_multilayer(model) and n_seen < s.fc_tokens:
                d_FL, f_F = metrics.layer_deltas(model, dictionary_input(x_NLD[:s.fc_tokens - n_seen], c, model))
                tr.dsum, tr.dfires = (d_FL, f_F) if tr.dsum is None else (tr.dsum + d_FL, tr.dfires + f_F)
        pool.offer(key_B[None], **cand)
        n_windows += B
        n_seen += len(x_NLD)
        bar.update(len(x_NLD))
    bar.close()
    if n_seen == 0:
        raise ValueError("no held-out tokens to read (the run's text stream ends at its training tokens)")
    kept = pool.key[0] > -math.inf
    out = {k: v[0][kept] for k, v in pool.data.items()}
    return trackers, {**out, "tokens": n_seen, "windows": n_windows}


# ----------------------------------------------------------------------------------------
# What the decoder writes: logit lens, per-layer profile, PolySAE partners
# ----------------------------------------------------------------------------------------


def final_norm(lm):
    """The final norm module before the unembedding (ln_f, model.norm, final_layer_norm, ...), or None."""
    blocks = tuple(p + "." for p in activations.block_paths(lm))
    names = ("ln_f", "norm", "final_layer_norm", "final_norm", "norm_f")
    found = [(n, m) for n, m in lm.named_modules() if n.rsplit(".", 1)[-1] in names and not n.startswith(blocks)]
    return min(found, key=lambda t: t[0].count("."))[1] if found else None


@torch.no_grad()
def token_logits(lm, dirs_FD: Tensor, n: int, chunk: int = 256, progress: bool = False) -> tuple[Tensor, ...]:
    """(top values, top ids, bottom values, bottom ids), each (F, n): the logits (norm(d) − norm(0)) W_Uᵀ
    of the directions d (raw residual units) through the LM's final norm and unembedding."""
    from tqdm import tqdm

    norm, W_VD = final_norm(lm), lm.get_output_embeddings().weight
    out = []
    for lo in tqdm(range(0, len(dirs_FD), chunk), desc="logit lens", disable=not progress, dynamic_ncols=True):
        d = dirs_FD[lo:lo + chunk].to(W_VD.device, W_VD.dtype)
        u = norm(d) - norm(torch.zeros_like(d)) if norm is not None else d
        logits = (u @ W_VD.T).float()
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out.append((top.values, top.indices, bottom.values, bottom.indices))
    return tuple(torch.cat(parts).cpu() for parts in zip(*out))


def last_layer_directions(model) -> Tensor:
    """(F, d) each latent's decoder direction at the last layer it writes, in raw residual units."""
    v = model.decoder_vectors().detach()
    v = v[:, -1] if v.ndim == 3 else v
    return v / model.config.input_scale[-1]


def partners(model, fires_F: Tensor, n_latents: int, n: int) -> dict[int, list]:
    """PolySAE: {i: [[j, ‖Θ2[i,j]‖], ...]} for the n_latents most frequent firing latents."""
    alive = int((fires_F > 0).sum())
    if model.config.order < 2 or n == 0 or alive < 2:
        return {}
    idx = fires_F.topk(min(n_latents, alive)).indices
    w = model.interaction_matrix(idx).cpu().fill_diagonal_(-math.inf)
    val, pos = w.topk(min(n, len(idx) - 1), dim=1)
    idx = idx.cpu()
    return {int(i): [[int(idx[p]), num(v)] for v, p in zip(vr, pr)] for i, vr, pr in zip(idx, val, pos)}


# ----------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------


def num(v, digits: int = 4) -> float:
    return float(f"{float(v):.{digits}g}")


def examples(best: Best, f: int, left: int) -> list[dict]:
    """The filled slots of latent f (a Best on the CPU), in slot order, as JSON examples."""
    key, act, window = (t[f].tolist() for t in (best.key, best.data["act"], best.data["window"]))
    ids, acts = best.data["ids"][f].tolist(), best.data["acts"][f].tolist()
    return [{"act": num(act[j]), "window": window[j], "peak": left, "tokens": ids[j],
             "acts": [num(a, 3) for a in acts[j]]} for j in range(len(key)) if key[j] > -math.inf]


def quantile_bands(sample: list[dict], bands: int, per_band: int, top_windows: set[int]) -> list[dict]:
    """Cut the (random) sample of firing windows into `bands` quantile bands of its activations."""
    ranked = sorted(range(len(sample)), key=lambda j: sample[j]["act"])
    out = []
    for b in range(bands):
        members = sorted(ranked[b * len(ranked) // bands:(b + 1) * len(ranked) // bands])   # sample order
        if not members:
            continue
        acts = [sample[j]["act"] for j in members]
        chosen = [sample[j] for j in members if sample[j]["window"] not in top_windows][:per_band]
        out.append({"band": b + 1, "of": bands, "range": [min(acts), max(acts)], "examples": chosen})
    return out


def latent_records(tr: Tracker, s: Settings, n_tokens: int, pool_max_PF: Tensor, logits, extra: dict) -> list[dict]:
    fires, hist = tr.fires.cpu(), tr.hist.cpu()
    total, fired_pool = tr.total.cpu(), (pool_max_PF > 0).cpu()
    tr.top.cpu(), tr.sample.cpu()
    tv, ti, bv, bi = logits
    out = []
    for f in range(len(fires)):
        r = {"id": f, "fires": int(fires[f]), "density": num(fires[f] / n_tokens),
             "max_act": num(tr.top.data["act"][f, 0]) if fires[f] else 0.0,
             "mean_act": num(total[f] / fires[f]) if fires[f] else 0.0,
             "promoted": [[int(i), num(v)] for v, i in zip(tv[f], ti[f])],
             "suppressed": [[int(i), num(v)] for v, i in zip(bv[f], bi[f])]}
        if fires[f]:
            top = examples(tr.top, f, s.left)
            windows = {e["window"] for e in top}
            r.update(hist=hist[f].tolist(), top=top,
                     quantiles=quantile_bands(examples(tr.sample, f, s.left), s.bands, s.per_band, windows),
                     pool_fires=fired_pool[:, f].nonzero()[:, 0].tolist())
        r.update({k: v[f] for k, v in extra.items() if isinstance(v, list) or f in v})
        out.append(r)
    return out


def per_layer(tr: Tracker, model, s: Settings) -> dict:
    """crosscoders: {"layer_delta": [...], "fc": [...], "decoder_norms": [...]} indexed by latent."""
    norms = model.decoder_norms().detach().cpu()
    if tr.dsum is None:
        return {"decoder_norms": [[num(v) for v in row] for row in norms.tolist()]}
    delta = (tr.dsum / tr.dfires.clamp_min(1)[:, None]).cpu()
    fc = metrics.spread(delta)
    ok = (tr.dfires.cpu() >= s.min_fires) & torch.isfinite(fc)
    return {"layer_delta": [[num(v) for v in row] for row in delta.tolist()],
            "fc": [num(v) if good else None for v, good in zip(fc.tolist(), ok.tolist())],
            "decoder_norms": [[num(v) for v in row] for row in norms.tolist()]}


def vocabulary(tok, dicts: list[dict], pool_ids: list[list[int]]) -> dict:
    """{id: string} of every token id that the examples, the pool and the logit lists use."""
    ids = {i for row in pool_ids for i in row}
    for d in dicts:
        for r in d["latents"]:
            ids.update(i for i, _ in r["promoted"] + r["suppressed"])
            effect = r.get("intervention", {})
            ids.update(i for i, _ in effect.get("promoted", []) + effect.get("suppressed", []))
            for e in r.get("top", []) + [e for b in r.get("quantiles", []) for e in b["examples"]]:
                ids.update(e["tokens"])
    return {str(i): tok.decode([i]) for i in sorted(ids) if i >= 0}


@torch.no_grad()
def read_run(run_dir, n_tokens: int = QUICK["tokens"], s: Settings | None = None, device="cpu", lm_batch: int = 8,
             progress: bool = True, allow_incomplete: bool = False, preset: str | None = None) -> dict:
    """The features of every dictionary of a run folder, as the JSON-ready dict features.json holds. The
    folder is opened as metrics.py and probe.py open it (saved.open_run): one-line errors for a damaged or
    foreign folder, and an interrupted run refused unless allow_incomplete. `preset` ("quick" | "thorough",
    default: the one whose values these are, else "custom") is recorded."""
    s = s or Settings()
    values = {"tokens": n_tokens, "fc_tokens": s.fc_tokens}
    preset = preset or next((n for n, v in (("quick", QUICK), ("thorough", THOROUGH)) if v == values), "custom")
    if n_tokens < 1:
        raise ValueError(f"--tokens must be positive, got {n_tokens}")
    entries = saved.open_run(run_dir, device, allow_incomplete)
    digests = runs.model_digests(run_dir)                  # of the weights read now
    run = saved.run_entry(run_dir, entries[0][2], ("model",))
    check_held_out(run_dir, run)
    lm, tok = activations.load_lm(run["model"], device=device, dtype=run.get("lm_dtype", "float32"))
    cache_meta = None
    if run.get("cache") and Path(run["cache"], "meta.json").exists():
        cache_meta = activation_cache.read_meta(Path(run["cache"]))
    split, skip, limit = corpora.heldout_text(run, cache_meta)
    n_tokens = min(n_tokens, limit or n_tokens)
    windows = corpora.heldout_windows(tok, run.get("dataset"), split, run.get("context", 128), skip, lm_batch)
    trackers, pool = stream(entries, lm, tok, windows, n_tokens, s, run.get("drop_outliers"), device, progress)
    dicts = []
    for i, ((layers, model, meta), tr) in enumerate(zip(entries, trackers)):
        multi = core.is_multilayer(model)
        extra = per_layer(tr, model, s) if multi else {}
        if hasattr(model, "interaction_matrix"):
            extra["partners"] = partners(model, tr.fires.cpu(), s.inter_latents, s.partners)
        logits = token_logits(lm, last_layer_directions(model), s.logits, progress=progress)
        if s.intervene:
            extra["intervention"] = intervene.top_context_effects(
                lm, tok, layers, model, tr.top.data["ids"], tr.top.key, s.left, s.intervene_contexts, s.logits,
                progress=progress)
        lat = latent_records(tr, s, pool["tokens"], pool[f"max{i}"], logits, extra)
        dicts.append({"name": f"layers {layers[0]}-{layers[-1]}" if multi else f"layer {layers[0]}",
                      "kind": saved.meta_kind(meta), "layers": layers,
                      "n_latents": len(lat), "alive": sum(r["fires"] > 0 for r in lat),
                      "fc_tokens": min(s.fc_tokens, pool["tokens"]) if multi else 0, "latents": lat})
    pool_ids = pool["ids"].tolist()
    return {"version": VERSION, "run": str(run_dir), "weights_sha256": digests,
            "model": run["model"], "dataset": run.get("dataset"), "drop_outliers": run.get("drop_outliers"),
            "text": f"{run.get('dataset') or 'bbc'} split {split}, "
                    + (f"after the first {skip:,} tokens (held out)" if skip else "its first tokens (held out)"),
            "tokens": pool["tokens"], "windows": pool["windows"], "preset": preset, "settings": asdict(s),
            "hist_edges": [num(e) for e in torch.logspace(math.log10(HIST_LO), math.log10(HIST_HI), s.bins + 1)],
            "vocab": vocabulary(tok, dicts, pool_ids), "special_ids": sorted(set(tok.all_special_ids)),
            "pool": {"tokens": pool_ids, "window": pool["window"].tolist(), "center": pool["center"].tolist()},
            "dictionaries": dicts}


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = cli.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by train.py")
    p.add_argument("--tokens", type=cli.parse_int, default=None,
                   help=f"held-out tokens to read (default {QUICK['tokens']:,}; --thorough {THOROUGH['tokens']:,})")
    p.add_argument("--thorough", action="store_true",
                   help=f"the earlier, longer settings: --tokens {THOROUGH['tokens']:,} --fc-tokens "
                        f"{THOROUGH['fc_tokens']:,} (flags given explicitly still win)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--lm-batch", type=cli.parse_int, default=8, help="context windows per LM forward pass")
    p.add_argument("--allow-incomplete", action="store_true", help="read a run whose training was interrupted")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_flags(p, Settings, group="what is kept per latent")
    p.set_defaults(fc_tokens=None)          # unset: the preset's
    a = p.parse_args(argv)
    preset = THOROUGH if a.thorough else QUICK
    a.tokens = preset["tokens"] if a.tokens is None else a.tokens
    a.fc_tokens = preset["fc_tokens"] if a.fc_tokens is None else a.fc_tokens
    a.preset = "thorough" if a.thorough else "quick"
    return a


def main(argv=None) -> int:
    from latents import page

    try:
        a = parse_args(argv)
        device = cli.resolve_device(a.device)
        s = Settings(**cli.values(a, Settings))
        with runs.reading(a.run):       # train.py cannot replace the run meanwhile
            feats = read_run(a.run, a.tokens, s, device, a.lm_batch, progress=not a.quiet,
                             allow_incomplete=a.allow_incomplete, preset=a.preset)
            write_atomic(Path(a.run, "features.json"), json_text(feats, separators=(",", ":")))
            page.write_page(feats, Path(a.run, "features.html"))
    except cli.USER_ERRORS as e:
        return cli.cli_error(e)
    except KeyboardInterrupt:
        return cli.interrupted("features.json")
    for d in feats["dictionaries"]:
        print(f"{d['name']}: {d['alive']:,} of {d['n_latents']:,} latents fire on {feats['tokens']:,} held-out tokens")
    print(f"wrote {Path(a.run, 'features.json')} and {Path(a.run, 'features.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

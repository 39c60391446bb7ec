"""What functional coherence measures, where the truth is known: crosscoders and fmxcoders on planted features.

    python experiments/ground_truth.py --out runs/ground_truth            # every cell; skips the cells done
    python experiments/ground_truth.py --out runs/ground_truth --workers 2  # two processes, one thread each
    python experiments/ground_truth.py --report runs/ground_truth         # the tables and the figure

The fmxcoders paper (arXiv 2605.09438, pp. 1, 6) finds standard crosscoder latents "driven by one or two
layers" (low functional coherence, FC) although their decoder norms spread over the layers, and reports that
low-rank factorisations plus layer masking roughly double FC. Here every dictionary is trained on synthetic
activations with planted features (support/synthetic.py: (a) independent directions per layer, (b)
persistent residual-stream features, (c) written-then-erased features with a gain walk, (d) near-collinear
adjacent layers), and scored against what is known: which atom each latent recovers, the atom's span and
norm profile, and the best linear readout of the atom's code (synthetic.Oracle) scored with the same FC.

A cell is one (generator, model, seed); its result is one line of OUT/cells.jsonl, written when the cell
ends, so an interrupted run loses at most the cells in flight and a rerun skips the done ones. The models:

  crosscoder          dense, no masking                       (crosscoder.py)
  cc_mask05, cc_mask20  dense, stochastic layer masking p 0.05, 0.2
  tr_low, cp_low      TR / CP fmxcoder, masked p 0.05, per-latent capacity L·d/4 (TR R2·R3, CP R): the
                      regime of the study's TR 8 / CP 64 at d 32 and of TR 32 on SmolLM2 (L·d/4.5)
  tr_low_nomask       the same TR without masking (the factorisation alone)
  tr_full, cp_full    TR / CP, masked p 0.05, per-latent capacity L·d (no cap on a latent's d × L weights)
  tr_dec              ablation, no masking: TR decoder with the crosscoder's dense encoder (does the encoder's
                      restriction or the decoder's sharing move FC?); tr_enc, the converse (TR encoder, dense
                      decoder), only with --models (not in the default run: CPU time)
  oracle              the best linear readout of every atom (not trained)

Per cell: FVU and L0 at the model's own BatchTopK threshold θ and at a θ calibrated on clean held-out
tokens to L0 = k (the equal-L0 comparison; with θ measured on masked tokens too, which explains the gap);
recovery (best decoder cosine > 0.9) of multi-layer and layer-local atoms; for each recovered atom the FC of
its latent under every reading (metrics.ALL_READINGS, layer zeroed) and under mean ablation, the decoder-norm
spread, the oracle's FC; the encoder's readout of the atom's onset direction at every layer (by offset from
the onset); the off-token share of the two all-token mean-of-ratio readings; metrics.differencing_signature
of every live latent (what the real-model analysis, experiments/real_fc.py, can measure without the truth).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import core  # noqa: E402
import metrics  # noqa: E402
from crosscoder import CrossCoder, CrossCoderConfig  # noqa: E402
from fmxcoder import FMXCoder, FMXCoderConfig, factor_names  # noqa: E402
from support import synthetic  # noqa: E402

# sizes (the study: d 32, L 8, 256 atoms, F 512, k 5, 2,000 steps, 2 seeds)
D, L, N_ATOMS, F_LATENTS, K = 48, 8, 384, 768, 5
BATCH, LR, STEPS, EVAL_TOKENS, FC_TOKENS = 512, 3e-3, 1000, 8192, 4096
SEEDS = (0, 1, 2)
GENERATORS = ("a", "b", "c", "d")
MODELS = ("crosscoder", "cc_mask05", "cc_mask20", "tr_low", "cp_low", "tr_low_nomask", "tr_full", "cp_full",
          "tr_dec", "tr_enc", "oracle")
RUN_MODELS = tuple(m for m in MODELS if m != "tr_enc")        # what a plain run trains (tr_enc: --models)
RECOVERED = 0.9


class DenseEncoder(FMXCoder):
    """Ablation: the fmxcoder's factorised decoder with the crosscoder's dense encoder W_enc (L, d, F)
    (starting as the transpose of the materialised decoder, as every dictionary here starts)."""

    def __init__(self, config: FMXCoderConfig):
        super().__init__(config)
        W_dec = self.decoder_vectors().detach()
        for name in factor_names(config):
            delattr(self, f"{name}_enc")
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).clone())

    def encoder_linear(self, x_BLD):
        return CrossCoder.encoder_linear(self, x_BLD)

    def full_weights(self):
        return self.W_enc, self.decoder_vectors()


class DenseDecoder(FMXCoder):
    """Ablation: the fmxcoder's factorised encoder with the crosscoder's dense decoder W_dec (F, L, d)."""

    def __init__(self, config: FMXCoderConfig):
        super().__init__(config)
        W_dec = self.decoder_vectors().detach().clone()
        for name in factor_names(config):
            delattr(self, f"{name}_dec")
        self.W_dec = nn.Parameter(W_dec)
        self.score_scale.copy_(self.exact_decoder_scale())

    def dense(self) -> bool:                         # False inside FMXCoder.__init__, before W_dec exists
        return "W_dec" in self._parameters

    def decode_nobias(self, z_BF):
        return CrossCoder.decode_nobias(self, z_BF) if self.dense() else FMXCoder.decode_nobias(self, z_BF)

    def decoder_norms(self):
        return CrossCoder.decoder_norms(self) if self.dense() else FMXCoder.decoder_norms(self)

    def decoder_vectors(self):
        return CrossCoder.decoder_vectors(self) if self.dense() else FMXCoder.decoder_vectors(self)

    def full_weights(self):
        from fmxcoder import all_layer_weights
        return all_layer_weights(self.config, self.factors("enc")).permute(1, 2, 0), self.W_dec


def ranks(capacity: int, d: int) -> list[int]:
    """TR ranks (R1, R2, R3) with R2·R3 = capacity and R1·R2 ≥ d: R2 the largest power of two ≤ sqrt(capacity)."""
    r2 = 2 ** int(math.log2(math.isqrt(capacity)))
    return [max(-(-d // r2), 1), r2, capacity // r2]


def build(name: str, d: int = D, n_layers: int = L, n_latents: int = F_LATENTS, k: int = K):
    base = dict(d_in=d, n_layers=n_layers, n_latents=n_latents, k=k, sparsity="batchtopk", dead_tokens=50_000)
    low, full = n_layers * d // 4, n_layers * d
    fmx = lambda cap, fac, p: FMXCoderConfig(**base, mask_prob=p, factorization=fac,  # noqa: E731
                                             rank=ranks(cap, d) if fac == "tr" else cap)
    return {"crosscoder": lambda: CrossCoder(CrossCoderConfig(**base)),
            "cc_mask05": lambda: CrossCoder(CrossCoderConfig(**base, mask_prob=0.05)),
            "cc_mask20": lambda: CrossCoder(CrossCoderConfig(**base, mask_prob=0.2)),
            "tr_low": lambda: FMXCoder(fmx(low, "tr", 0.05)),
            "cp_low": lambda: FMXCoder(fmx(low, "cp", 0.05)),
            "tr_low_nomask": lambda: FMXCoder(fmx(low, "tr", 0.0)),
            "tr_full": lambda: FMXCoder(fmx(full, "tr", 0.05)),
            "cp_full": lambda: FMXCoder(fmx(full, "cp", 0.05)),
            "tr_dec": lambda: DenseEncoder(fmx(low, "tr", 0.0)),
            "tr_enc": lambda: DenseDecoder(fmx(low, "tr", 0.0))}[name]()


def make_data(gen: str, seed: int, d: int = D, n_layers: int = L, n_atoms: int = N_ATOMS, k: int = K):
    return synthetic.GENERATORS[gen](d=d, n_layers=n_layers, n_atoms=n_atoms, density=k / n_atoms, seed=seed)


# ----------------------------------------------------------------------------------------
# Thresholds: the model's own, calibrated on clean tokens, measured on masked tokens
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def batch_threshold(model, x_BLD) -> float:
    """The B·k-th largest selection score of a batch (what one BatchTopK training step keeps at least)."""
    pre = model.pre_acts(x_BLD)
    score = core.scores(pre.relu(), model.decoder_scale())
    return score.flatten().topk(model.config.k * x_BLD.shape[0]).values.min().item()


@torch.no_grad()
def recon_stats(model, x_BLD, threshold: float | None = None) -> dict:
    """FVU and L0 on x at the model's θ, or at `threshold`."""
    keep = model.threshold.clone()
    if threshold is not None:
        model.threshold.fill_(threshold)
    out = model(x_BLD)
    model.threshold.copy_(keep)
    return {"fvu": core.fvu(x_BLD.flatten(1), out.recon.flatten(1)).item(),
            "l0": (out.latents > 0).float().sum(-1).mean().item()}


# ----------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------


def train(model, data, seed: int, steps: int | None = None, batch: int = BATCH, lr: float = LR) -> float:
    """core.train_step on fresh batches (the same stream for every model of a generator and seed); the masks
    draw from torch's global generator, seeded here. Returns the seconds it took."""
    steps = STEPS if steps is None else steps
    g = torch.Generator().manual_seed(10_000 + seed)
    torch.manual_seed(20_000 + seed)
    t0 = time.time()
    model.init_b_dec(data.sample(2048, g), "mean")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        core.train_step(model, opt, data.sample(batch, g))
    return time.time() - t0


@torch.no_grad()
def evaluate(model, data, oracle_fc, seed: int) -> dict:
    """Everything a cell reports (see the module docstring)."""
    model.eval()
    g = torch.Generator().manual_seed(30_000 + seed)
    x_eval, _ = data.sample_codes(EVAL_TOKENS, g)
    x_cal = data.sample(EVAL_TOKENS, g)
    x_fc = x_eval[:FC_TOKENS]
    multi = data.span_N > 1
    res = {}
    trained = not isinstance(model, synthetic.Oracle)
    if trained:
        p = getattr(model.config, "mask_prob", 0.0)
        theta_clean = float(np.mean([batch_threshold(model, x_cal[i:i + BATCH]) for i in range(0, EVAL_TOKENS, BATCH)]))
        torch.manual_seed(40_000 + seed)
        from crosscoder import mask_layers
        theta_masked = float(np.mean([batch_threshold(model, mask_layers(x_cal[i:i + BATCH], p))
                                      for i in range(0, EVAL_TOKENS, BATCH)]))
        res.update({"theta": model.threshold.item(), "theta_clean": theta_clean, "theta_masked": theta_masked,
                    **recon_stats(model, x_eval),
                    **{f"{k}_eq": v for k, v in recon_stats(model, x_eval, theta_clean).items()},
                    **{f"{k}_at_theta_masked": v for k, v in recon_stats(model, x_eval, theta_masked).items()}})
        cos_N, latent_N = synthetic.match(model.decoder_vectors(), data)
        W_enc = model.full_weights()[0].detach()
        res["dead_eval"] = (core.encode(model, x_eval) > 0).sum(0).eq(0).float().mean().item()
    else:
        cos_N, latent_N = torch.ones(len(multi)), torch.arange(len(multi))
        W_enc = model.W_enc
    rec = cos_N > RECOVERED
    res.update({"recovered_multi": rec[multi].float().mean().item(), "recovered_local": rec[~multi].float().mean().item()})

    readings = metrics.ALL_READINGS
    fcs, fires, sums = metrics.fc_per_latent(model, [x_fc[i:i + 1024] for i in range(0, FC_TOKENS, 1024)], readings)
    fc_mean_abl = metrics.fc_per_latent(model, [x_fc[i:i + 1024] for i in range(0, FC_TOKENS, 1024)],
                                        fill_LD=x_eval.mean(0))[0][metrics.MAIN]
    share = {f"{a}/all/{f}": metrics.off_token_share(sums, a, f) for a in ("pre", "post") for f in ("ratio_mean", "mean_ratio")}
    spread_F = metrics.spread(model.decoder_norms().detach())
    # per recovered atom: its latent's numbers
    idx = torch.nonzero(rec & (fires[latent_N] >= 10)).flatten()
    lat = latent_N[idx]
    atoms = {"atom": idx.tolist(), "span": data.span_N[idx].tolist(), "onset": data.onset_N[idx].tolist(),
             "true_spread": data.true_spread()[idx].tolist(), "cos": cos_N[idx].tolist(),
             "norm_spread": spread_F[lat].tolist(), "fc_mean_ablation": fc_mean_abl[lat].tolist(),
             **{"fc/" + "/".join(r): fcs[r][lat].tolist() for r in readings},
             **{"off_share/" + k: v[lat].tolist() for k, v in share.items()}}
    if oracle_fc is not None:
        atoms["oracle_fc"] = [oracle_fc[i] for i in idx.tolist()]
    # the encoder's readout of the atom's direction at its onset, at every layer
    u_onset = data.atoms_NLD[idx, data.onset_N[idx]]
    cos_FL, proj_FL = metrics.readout_profile(W_enc[..., lat], u_onset)
    atoms["readout_cos"] = cos_FL.tolist()
    atoms["readout_proj"] = (proj_FL / proj_FL.abs().max(-1, keepdim=True).values.clamp_min(1e-12)).tolist()
    res["atoms"] = atoms
    if trained:
        live = fires >= 10
        sig = metrics.differencing_signature(W_enc, model.decoder_vectors())
        res["signature"] = {"ratio": sig["ratio"][live].tolist(), "spread": spread_F[live].tolist(),
                            "fc": fcs[metrics.MAIN][live].tolist(), "fc_mean_ablation": fc_mean_abl[live].tolist()}
    return res


def oracle_fc_of(data) -> list[float]:
    g = torch.Generator().manual_seed(30_000 + data.seed)
    x = data.sample(FC_TOKENS, g)
    fcs, _, _ = metrics.fc_per_latent(synthetic.Oracle(data), [x[i:i + 1024] for i in range(0, FC_TOKENS, 1024)])
    return fcs[metrics.MAIN].tolist()


def run_cell(gen: str, name: str, seed: int) -> dict:
    data = make_data(gen, seed)
    t0 = time.time()
    if name == "oracle":
        model, train_s, oracle = synthetic.Oracle(data), 0.0, None
    else:
        torch.manual_seed(seed * 1000 + MODELS.index(name))
        model = build(name)
        train_s = train(model, data, seed)
        oracle = oracle_fc_of(data)
    res = evaluate(model, data, oracle, seed)
    return {"generator": gen, "model": name, "seed": seed, "train_s": train_s, "total_s": time.time() - t0,
            "sizes": {"d": D, "L": L, "atoms": N_ATOMS, "F": F_LATENTS, "k": K, "batch": BATCH, "lr": LR,
                      "steps": STEPS}, **res}


def done_cells(out: Path) -> set:
    f = out / "cells.jsonl"
    if not f.exists():
        return set()
    keys = set()
    for line in f.read_text().splitlines():
        try:
            r = json.loads(line)
            keys.add((r["generator"], r["model"], r["seed"]))
        except (json.JSONDecodeError, KeyError):
            continue                                                  # a line cut by a kill: redo that cell
    return keys


def append(out: Path, row: dict) -> None:
    with open(out / "cells.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def cells(models=RUN_MODELS, gens=GENERATORS, seeds=SEEDS) -> list[tuple[str, str, int]]:
    """Seed-major, so that a partial run already has every model of the first seeds."""
    return [(g, m, s) for s in seeds for g in gens for m in models]


def run(out: Path, worker: int = 0, workers: int = 1, models=RUN_MODELS, gens=GENERATORS, seeds=SEEDS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    todo = [c for i, c in enumerate(cells(models, gens, seeds)) if i % workers == worker]
    for c in todo:
        if c in done_cells(out):
            continue
        row = run_cell(*c)
        append(out, row)
        extra = f"FVU {row['fvu']:.3f} (eq-L0 {row['fvu_eq']:.3f}) L0 {row['l0']:.2f}" if "fvu" in row else ""
        print(f"[{worker}] {c}: {row['total_s']:.0f}s {extra} rec multi {row['recovered_multi']:.2f} "
              f"local {row['recovered_local']:.2f}", flush=True)


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def load(out: Path) -> list[dict]:
    rows = {}
    for line in (out / "cells.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[(r["generator"], r["model"], r["seed"])] = r
    return list(rows.values())


def mean_sd(v) -> str:
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "–"
    return f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def atom_stat(r: dict, key: str, multi: bool = True, span=None) -> float:
    a = r["atoms"]
    v = [x for x, s in zip(a[key], a["span"]) if (s > 1) == multi and (span is None or s == span)]
    v = [x for x in v if x == x]
    return float(np.mean(v)) if v else math.nan


def pearson(r: dict, key: str = "fc/pre/fired/ratio_mean", local: bool = False) -> float:
    """Pearson r over the recovered multi-layer atoms (with `local`, the layer-local ones too) between the
    FC of the atom's latent and the oracle's FC of the atom."""
    a = r["atoms"]
    pairs = [(x, y) for x, y, s in zip(a[key], a.get("oracle_fc", []), a["span"]) if (local or s > 1) and x == x and y == y]
    if len(pairs) < 3:
        return math.nan
    x, y = np.array(pairs).T
    return float(np.corrcoef(x, y)[0, 1])


def profile_by_offset(r: dict, key: str = "readout_cos", offsets=range(-2, 4)) -> dict:
    a = r["atoms"]
    out = {}
    for o in offsets:
        v = [prof[on + o] for prof, on, s in zip(a[key], a["onset"], a["span"]) if s > 1 and 0 <= on + o < len(prof)]
        out[o] = float(np.mean(v)) if v else math.nan
    return out


def seeds_of(by: dict, gen: str, model: str, f) -> list[float]:
    return [f(r) for r in by.get((gen, model), [])]


def live_fc(r: dict, key: str = "fc") -> float:
    v = [x for x in r["signature"][key] if x == x]
    return float(np.mean(v)) if v else math.nan


def ratio_over(by, gen, model, base, f) -> list[float]:
    """f(model) / f(base) per seed (the seeds both have)."""
    a = {r["seed"]: f(r) for r in by.get((gen, model), [])}
    b = {r["seed"]: f(r) for r in by.get((gen, base), [])}
    return [a[s] / b[s] for s in sorted(a) if s in b]


def report(out: Path, figure: Path | None = None) -> str:
    rows = load(out)
    by = {}
    for r in rows:
        by.setdefault((r["generator"], r["model"]), []).append(r)
    models = [m for m in MODELS if any((g, m) in by for g in GENERATORS)]
    gens = [g for g in GENERATORS if any((g, m) in by for m in MODELS)]
    sizes = next(r["sizes"] for r in rows if "sizes" in r)
    seeds = sorted({r["seed"] for r in rows})
    fc = "fc/pre/fired/ratio_mean"
    L_ = sizes["L"]
    out_lines = [f"sizes {sizes}; seeds {seeds}; mean ± sd over seeds (n per cell in brackets where < {len(seeds)})", ""]

    out_lines += ["### 1. Reconstruction, recovery and FC of the latents matched to multi-layer atoms", "",
                  "| gen | model | FVU | L0 | FVU at L0 = k | rec. multi | rec. local | FC all live | FC multi | "
                  "FC multi, mean abl. | oracle FC | r(FC, oracle) multi / all | dec. spread | true spread |",
                  "|---|---|" + "---:|" * 12]
    for gen in gens:
        for m in models:
            rs = by.get((gen, m))
            if not rs:
                continue
            n = f" ({len(rs)})" if len(rs) < len(seeds) else ""
            orc = ([atom_stat(r, "oracle_fc") for r in rs] if m != "oracle" else [atom_stat(r, fc) for r in rs])
            out_lines.append("| " + " | ".join([
                gen, m + n, mean_sd([r.get("fvu") for r in rs]), mean_sd([r.get("l0") for r in rs]),
                mean_sd([r.get("fvu_eq") for r in rs]), mean_sd([r["recovered_multi"] for r in rs]),
                mean_sd([r["recovered_local"] for r in rs]),
                mean_sd([live_fc(r) for r in rs]) if m != "oracle" else "–",
                mean_sd([atom_stat(r, fc) for r in rs]), mean_sd([atom_stat(r, "fc_mean_ablation") for r in rs]),
                mean_sd(orc), f"{mean_sd([pearson(r) for r in rs])} / {mean_sd([pearson(r, local=True) for r in rs])}"
                if m != "oracle" else "1",
                mean_sd([atom_stat(r, "norm_spread") for r in rs]) if m != "oracle" else "–",
                mean_sd([atom_stat(r, "true_spread") for r in rs])]) + " |")

    out_lines += ["", "### 2. FC ratios to the crosscoder (the fmxcoders claim), per seed then mean ± sd", "",
                  "| gen | model | FC all live / crosscoder | FC multi / crosscoder | FVU / crosscoder |",
                  "|---|---|---:|---:|---:|"]
    for gen in gens:
        for m in models:
            if m in ("crosscoder", "oracle") or (gen, m) not in by:
                continue
            out_lines.append(f"| {gen} | {m} | {mean_sd(ratio_over(by, gen, m, 'crosscoder', live_fc))} | "
                             f"{mean_sd(ratio_over(by, gen, m, 'crosscoder', lambda r: atom_stat(r, fc)))} | "
                             f"{mean_sd(ratio_over(by, gen, m, 'crosscoder', lambda r: r['fvu']))} |")

    out_lines += ["", "### 3. By span (multi-layer atoms recovered by each model; mean over seeds)", "",
                  "| gen | quantity | " + " | ".join(f"span {s}" for s in range(2, L_ + 1)) + " |",
                  "|---|---|" + "---:|" * (L_ - 1)]
    for gen in gens:
        for label, m, key in (("true spread", "oracle", "true_spread"), ("oracle FC", "oracle", fc),
                              ("crosscoder FC", "crosscoder", fc), ("crosscoder FC, mean abl.", "crosscoder", "fc_mean_ablation"),
                              ("crosscoder dec. spread", "crosscoder", "norm_spread"), ("cc_mask05 FC", "cc_mask05", fc),
                              ("tr_low FC", "tr_low", fc), ("tr_full FC", "tr_full", fc)):
            if (gen, m) not in by:
                continue
            cells = [np.nanmean(seeds_of(by, gen, m, lambda r: atom_stat(r, key, span=s_)) or [math.nan])
                     for s_ in range(2, L_ + 1)]
            out_lines.append(f"| {gen} | {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")

    out_lines += ["", "### 4. Encoder readout of the atom's onset direction u, by offset from the onset (multi-layer "
                  "atoms): cos(W_enc[l][:, f], u) / projection W_enc[l][:, f]·u over its largest |value| across layers",
                  "", "| gen | model | " + " | ".join(f"{o:+d}" for o in range(-2, 4)) + " |", "|---|---|" + "---:|" * 6]
    for gen in gens:
        for m in ("crosscoder", "cc_mask05", "tr_low", "tr_full", "oracle"):
            if (gen, m) not in by:
                continue
            prof = [profile_by_offset(r) for r in by[(gen, m)]]
            proj = [profile_by_offset(r, "readout_proj") for r in by[(gen, m)]]
            out_lines.append(f"| {gen} | {m} | " + " | ".join(
                f"{np.nanmean([p[o] for p in prof]):.2f} / {np.nanmean([p[o] for p in proj]):.2f}" for o in range(-2, 4)) + " |")

    out_lines += ["", "### 5. The readings (crosscoder, matched multi-layer atoms): FC, r with the oracle, off-token share", "",
                  "| gen | " + " | ".join("/".join(r) for r in metrics.ALL_READINGS) + " |",
                  "|---|" + "---:|" * len(metrics.ALL_READINGS)]
    for gen in gens:
        rs = by.get((gen, "crosscoder"), [])
        cells = []
        for rd in metrics.ALL_READINGS:
            key = "fc/" + "/".join(rd)
            txt = f"{mean_sd([atom_stat(r, key) for r in rs])}, r {mean_sd([pearson(r, key) for r in rs])}"
            if rd[1] == "all":
                txt += f", off {mean_sd([100 * atom_stat(r, 'off_share/' + rd[0] + '/all/' + rd[2]) for r in rs])} %"
            cells.append(txt)
        out_lines.append(f"| {gen} | " + " | ".join(cells) + " |")

    out_lines += ["", "### 6. BatchTopK θ under masking: the model's θ, θ measured on clean and on masked held-out batches, "
                  "and L0 at each", "", "| gen | model | θ | θ clean | θ masked | L0 | L0 at θ masked | FVU | FVU at θ masked |",
                  "|---|---|" + "---:|" * 7]
    for gen in gens:
        for m in models:
            rs = by.get((gen, m))
            if not rs or m == "oracle":
                continue
            out_lines.append(f"| {gen} | {m} | " + " | ".join(mean_sd([r[k] for r in rs]) for k in (
                "theta", "theta_clean", "theta_masked", "l0", "l0_at_theta_masked", "fvu", "fvu_at_theta_masked")) + " |")

    out_lines += ["", "### 7. Differencing signature of every live latent (metrics.differencing_signature), what a real "
                  "model allows", "", "| gen | model | share ratio < −0.5 | median ratio | FC, spread ≥ 4 | FC, spread < 2 |",
                  "|---|---|---:|---:|---:|---:|"]
    for gen in gens:
        for m in ("crosscoder", "cc_mask05", "tr_low", "tr_full"):
            rs = by.get((gen, m))
            if not rs:
                continue
            rat = [np.array([x for x in r["signature"]["ratio"] if x == x]) for r in rs]
            hi = [np.nanmean([f for f, s_ in zip(r["signature"]["fc"], r["signature"]["spread"]) if s_ >= 4] or [math.nan])
                  for r in rs]
            lo = [np.nanmean([f for f, s_ in zip(r["signature"]["fc"], r["signature"]["spread"]) if s_ < 2] or [math.nan])
                  for r in rs]
            out_lines.append(f"| {gen} | {m} | {mean_sd([(v < -0.5).mean() for v in rat])} | "
                             f"{mean_sd([np.median(v) for v in rat])} | {mean_sd(hi)} | {mean_sd(lo)} |")
    if figure is not None:
        plot(by, gens, L_, figure)
    return "\n".join(out_lines)


def plot(by: dict, gens: list[str], L_: int, path: Path) -> None:
    """Three panels: FC by span (crosscoder, oracle, true) for each generator; FC ratio to the crosscoder
    against FVU for the models; the readout profile by offset from the onset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fc = "fc/pre/fired/ratio_mean"
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    spans = list(range(2, L_ + 1))
    colours = dict(zip(GENERATORS, ("tab:grey", "tab:blue", "tab:green", "tab:orange")))
    for gen in gens:
        for m, style in (("crosscoder", "-o"), ("oracle", "--x")):
            ys = [[atom_stat(r, fc, span=s_) for r in by.get((gen, m), [])] for s_ in spans]
            ax[0].errorbar(spans, [np.nanmean(y) for y in ys], yerr=[np.nanstd(y) for y in ys], fmt=style,
                           color=colours[gen], ms=4, label=f"({gen}) {m}")
    ax[0].plot(spans, spans, ":", color="k", lw=1, label="true (= span)")
    ax[0].set(xlabel="atom span (layers)", ylabel="FC of the matched latent", title="FC by span")
    ax[0].legend(fontsize=6, ncol=2)
    markers = dict(zip(("cc_mask05", "cc_mask20", "tr_low", "cp_low", "tr_low_nomask", "tr_full", "cp_full", "tr_dec"),
                       "os^vD<>P"))
    for gen in gens:
        for m, mk in markers.items():
            x = ratio_over(by, gen, m, "crosscoder", lambda r: r["fvu"])
            y = ratio_over(by, gen, m, "crosscoder", live_fc)
            if x:
                ax[1].scatter(np.mean(x), np.mean(y), marker=mk, color=colours[gen], s=25,
                              label=m if gen == gens[0] else None)
    ax[1].axhline(1, color="k", lw=0.5)
    ax[1].axvline(1, color="k", lw=0.5)
    ax[1].set(xscale="log", xlabel="FVU / crosscoder's", ylabel="mean FC (live latents) / crosscoder's",
              title="what raises FC, at what cost (colour: generator)")
    ax[1].legend(fontsize=6)
    offs = list(range(-2, 4))
    for gen in gens:
        for m, style in (("crosscoder", "-o"), ("oracle", "--x")):
            ps = [profile_by_offset(r, "readout_proj") for r in by.get((gen, m), [])]
            if ps:
                ax[2].plot(offs, [np.nanmean([p[o] for p in ps]) for o in offs], style, color=colours[gen], ms=4,
                           label=f"({gen}) {m}")
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].set(xlabel="layer − onset", ylabel="encoder weights · atom direction (/ max)", title="encoder readout")
    ax[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "ground_truth"))
    p.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(RUN_MODELS))
    p.add_argument("--generators", default=",".join(GENERATORS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--report", default=None, help="print the tables of this folder's cells and stop")
    p.add_argument("--figure", default=None, help="with --report: write the figure (PNG) here")
    a = p.parse_args(argv)
    if a.report:
        print(report(Path(a.report), Path(a.figure) if a.figure else None))
        return 0
    models, gens = a.models.split(","), a.generators.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    for m in models:
        if m not in MODELS:
            p.error(f"--models: {m!r} is not one of {', '.join(MODELS)}")
    for g in gens:
        if g not in GENERATORS:
            p.error(f"--generators: {g!r} is not one of {', '.join(GENERATORS)}")
    torch.set_num_threads(1)
    if a.worker is not None or a.workers == 1:
        run(Path(a.out), a.worker or 0, a.workers, models, gens, seeds)
        return 0
    import subprocess
    procs = [subprocess.Popen([sys.executable, __file__, "--out", a.out, "--workers", str(a.workers), "--worker", str(w),
                               "--models", a.models, "--generators", a.generators, "--seeds", a.seeds],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for w in range(a.workers)]
    return max(pr.wait() for pr in procs)


if __name__ == "__main__":
    sys.exit(main())

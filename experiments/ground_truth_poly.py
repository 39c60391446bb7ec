"""PolySAE under known ground truth: does the polynomial decoder find composition, and only composition?

    python experiments/ground_truth_poly.py --jobs 2            # every missing cell, then the table and figure
    python experiments/ground_truth_poly.py --table-only       # the table and figure of the cells done so far

PolySAE (arXiv 2602.01322) argues that a linear decoder spends a monolithic latent on a compound of two features,
while its quadratic and cubic terms y2 = Σ_ij z_i z_j Θ2[i, j], Θ2[i, j, :] = Σ_{r≤R2} U_ir U_jr C2[:, r]
(polysae.py) write the composition from the parts' own latents and leave mere co-occurrence alone. Here the
truth is planted (support/synthetic.py, `make_composition_data`): interacting pairs P whose co-presence adds
s·a_i a_j E_ij (and triples T, s3·a_i a_j a_k E_ijk), co-occurring pairs Q that fire together as often and add
nothing. Each cell (config, model, seed) trains one dictionary with core.train_step and measures, on held-out
tokens of the same generator:
  * FVU, L0, dead latents; what each decoder row matches (synthetic.latent_roles, cosine > 0.9): an atom, an
    interaction direction E, a compound direction D_i + D_j + s E_ij (or D_i + D_j for a pair of Q);
  * PolySAE: λ2 along training; ‖Θ2[m(i), m(j)]‖ at the latents m matched to each pair's atoms, and the ROC AUC
    (metrics.roc_auc) of that raw weight for the pairs of P against those of Q and against the pairs of
    independent atoms; the effective interaction T = 2 λ2 Θ2[m, n] / (‖D1[m]‖ ‖D1[n]‖), what the quadratic term
    adds per unit of a_i a_j when both latents write their atoms, as |T| / s and cos(T, E_ij);
    r(‖Θ2‖, co-occurrence) and r(covariance, co-occurrence) as metrics.interaction_vs_cooccurrence computes them
    (r(covariance, co-occurrence) for the SAEs too);
  * probing on planted labels (synthetic.probe_set; probe.probe: top-k latents by mean difference, L2 logistic
    regression, test F1) and the class-conditional W1 (metrics.class_wasserstein, latents scaled by their
    decoder norms), per pair of P and of Q, for the labels "compound present" and "part present".

Models: "sae-unit" and "poly-ours" use this project's conventions (unit SAE decoder rows; tied PolySAE encoder;
b_dec from the geometric median; AuxK 1/32; dead after 100 steps' tokens); "sae-free" and "poly-official" the
official code's (free rows from norm 0.1; untied encoder; b_dec 0; AuxK 1.0; dead after 1,000 steps).
Diagnostic PolySAE variants (ours otherwise): "poly-c2zero" (C2 = C3 = 0 at init), "poly-noqr" (U trained
without the QR retraction), "poly-lr1e-3" (a third of the learning rate), "poly-k2" / "poly-k8" (k 2 or 8
instead of 4), "poly-long" (4x the steps), and in the "exact" and "tight" configs, where a PolySAE that writes
the data exactly exists (`oracle_polysae`, N + P + T ≤ d): "oracle" (that model, untrained; "oracle-k8" at k 8),
"oracle-trained" (trained from it), "frozen-enc" / "frozen-enc-c2zero" (the encoder fixed to the true codes,
only the decoder trained). Ranks (R1, R2, R3) = (d, 4T + 2P, 4T), what the exact construction uses; "tight" has
R1 = F = N + T, the narrowest width that construction needs.

Results go to OUT/results.jsonl, one line per cell; a cell already there is skipped, so an interrupted run
resumes where it stopped. Sizes, wall time and the table: experiments/README.md.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import core  # noqa: E402
import metrics  # noqa: E402
import probe as probing  # noqa: E402
from core import opt  # noqa: E402
from polysae import PolySAE, PolySAEConfig  # noqa: E402
from sae import SAE, SAEConfig  # noqa: E402
from support import cli, synthetic  # noqa: E402

STANDARD = ["sae-unit", "sae-free", "poly-ours", "poly-official"]
CONFIGS = {
    # superposition (N = 2d): 8 interacting pairs, 8 co-occurring pairs, 2 triples, 104 independent atoms
    "main": {"data": dict(d=64, n_atoms=128, n_pairs=8, n_cooc=8, n_triples=2, density=0.02, rate=0.02,
                          strength=1.0, strength3=1.0, noise=0.01),
             "n_latents": 192, "k": 4, "models": STANDARD + ["poly-c2zero", "poly-noqr", "poly-lr1e-3"]},
    # the same atoms and co-firing, no interaction at all: every pair is merely co-occurring
    "control": {"data": dict(d=64, n_atoms=128, n_pairs=8, n_cooc=8, n_triples=2, density=0.02, rate=0.02,
                             strength=0.0, strength3=0.0, noise=0.01),
                "n_latents": 192, "k": 4, "models": STANDARD},
    # no superposition (N + P + T <= d): an exact PolySAE exists (oracle_polysae)
    "exact": {"data": dict(d=32, n_atoms=24, n_pairs=2, n_cooc=2, n_triples=1, density=0.05, rate=0.05,
                           strength=1.0, strength3=1.0, noise=0.01),
              "n_latents": 48, "k": 4, "models": STANDARD + ["poly-c2zero", "poly-k2", "poly-k8", "poly-long", "oracle",
                                                              "oracle-k8", "oracle-trained", "frozen-enc",
                                                              "frozen-enc-c2zero"]},
    # the exact config's data at the narrowest width the exact PolySAE needs (F = R1 = N + T = 25): one latent
    # to spare, so a dictionary cannot give every compound a latent of its own and keep every atom
    "tight": {"data": dict(d=32, n_atoms=24, n_pairs=2, n_cooc=2, n_triples=1, density=0.05, rate=0.05,
                           strength=1.0, strength3=1.0, noise=0.01),
              "n_latents": 25, "r1": 25, "k": 4, "models": STANDARD + ["poly-c2zero", "oracle", "oracle-trained"]},
}
# diagnostic variants of poly-ours that change the training: k, a third of the lr, 4x the steps
VARIANTS = {"poly-k2": {"k": 2}, "poly-k8": {"k": 8}, "poly-lr1e-3": {"lr": 1 / 3}, "poly-long": {"steps": 4},
            "oracle-k8": {"k": 8}}
UNTRAINED = ("oracle", "oracle-k8")
LAMBDA_STEPS = (0, 100, 250, 500, 1000, 2000, 4000)      # λ2 is recorded after these steps (and at the end)


@dataclass
class GroundTruthConfig:
    out: str = opt(str(ROOT / "runs" / "ground_truth_poly"), "folder of results.jsonl and the figure")
    configs: str = opt("main,control,exact,tight", "comma-separated data configs (main, control, exact, tight)")
    seeds: int = opt(3, "seeds per (config, model): data, init and batches")
    steps: int = opt(2000, "training steps")
    batch: int = opt(512, "tokens per step")
    lr: float = opt(3e-3, "Adam learning rate (poly-lr1e-3 uses lr/3)")
    eval_tokens: int = opt(8192, "held-out tokens for FVU, L0, dead and co-occurrence")
    probe_n: int = opt(400, "examples per probing split (train and test each), a multiple of 4")
    jobs: int = opt(1, "cells trained at once (one thread each)")
    table_only: bool = opt(False, "only write the table and figure from the cells done so far")

    def check(self, name=str) -> None:
        bad = [c for c in str(self.configs).split(",") if c not in CONFIGS]
        if bad:
            raise ValueError(f"{name('configs')} must name configs among {', '.join(CONFIGS)}, got {bad}")
        for f in ("seeds", "steps", "batch", "eval_tokens", "jobs"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name(f)} must be a positive integer, got {v!r}")
        if not (isinstance(self.probe_n, int) and self.probe_n >= 8 and self.probe_n % 4 == 0):
            raise ValueError(f"{name('probe_n')} must be a multiple of 4, at least 8, got {self.probe_n!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"{name('lr')} must be a positive number, got {self.lr!r}")


# ----------------------------------------------------------------------------------------
# The exact PolySAE of a planted composition (no superposition)
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def oracle_polysae(data: synthetic.CompositionData, k: int, n_latents: int | None = None, r1: int | None = None,
                   dtype=torch.float64) -> PolySAE:
    """A PolySAE whose latents are the true codes (z_n = a_n, n < N) and whose decoder writes data.signal(a)
    exactly, when N + P + T ≤ d (the encoder is the atoms' rows of the pseudo-inverse of [D; E]). U's columns,
    ranks (R1, 4T + 2P, 4T) (R3 = 1 and no cubic term without triples), N + T ≤ R1 ≤ n_latents (defaults d, R1):
      triple (i, j, k): 4 columns, rows i, j, k = S/2 with S the sign patterns (+++, ++−, +−+, +−−), and one
        latent that never fires (row N + t) = (1, −1, −1, 1)/2, which makes them orthonormal; C3 = σ ⊗ c with
        σ = (1, −1, −1, 1): Σ_w σ_w a_w³ = 3 z_i z_j z_k (polarisation), c = s3 E_ijk / (3 λ3); C2 = 0 there;
      pair (i, j): 2 columns, rows i = (1, 1)/√2, j = (1, −1)/√2: a₊² − a₋² = 2 z_i z_j, so C2 = (c, −c) with
        c = s E_ij / (2 λ2); the diagonal terms z_i², z_j² cancel;
      every other atom n: one column e_n with C1 = D_n; the columns left over: latents that never fire.
    C1 on each block maps its a back to Σ z_n D_n. λ2, λ3 stay at their initial values."""
    N, d, P, T = data.n_atoms, data.d, len(data.pairs_P2), len(data.triples_T3)
    R1 = r1 or d
    F = n_latents or R1
    if N + P + T > d or not N + T <= R1 <= F:
        raise ValueError(f"oracle_polysae needs N + P + T <= d and N + T <= r1 <= n_latents, got N={N}, P={P}, T={T}, "
                         f"d={d}, r1={R1}, n_latents={F}")
    R2, R3 = max(4 * T + 2 * P, 1), max(4 * T, 1)
    model = PolySAE(PolySAEConfig(d_in=d, n_latents=F, k=k, sparsity="topk", ranks=(R1, R2, R3),
                                  order=3 if T else 2)).to(dtype)
    D = data.atoms_ND.to(dtype)
    U, C1 = torch.zeros(F, R1, dtype=dtype), torch.zeros(d, R1, dtype=dtype)
    C2, C3 = torch.zeros(d, R2, dtype=dtype), torch.zeros(d, R3, dtype=dtype)
    S = torch.tensor([[1., 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, -1]], dtype=dtype) / 2     # (3, 4)
    sigma = torch.tensor([1., -1, -1, 1], dtype=dtype)
    c = 0
    for t, (tri, e) in enumerate(zip(data.triples_T3, data.triple_dirs_TD.to(dtype))):
        U[tri, c:c + 4], U[N + t, c:c + 4] = S, sigma / 2
        C1[:, c:c + 4] = D[tri].T @ S
        C3[:, c:c + 4] = (data.strength3 * e / (3 * model.lambda3))[:, None] * sigma
        c += 4
    h = 1 / math.sqrt(2)
    for (i, j), e in zip(data.pairs_P2.tolist(), data.pair_dirs_PD.to(dtype)):
        U[i, c], U[i, c + 1], U[j, c], U[j, c + 1] = h, h, h, -h
        C1[:, c], C1[:, c + 1] = (D[i] + D[j]) * h, (D[i] - D[j]) * h
        C2[:, c] = data.strength * e / (2 * model.lambda2)
        C2[:, c + 1] = -C2[:, c]
        c += 2
    grouped = set(data.pairs_P2.flatten().tolist()) | set(data.triples_T3.flatten().tolist())
    for n in range(N):
        if n not in grouped:
            U[n, c], C1[:, c] = 1.0, D[n]
            c += 1
    for row in range(N + T, N + T + R1 - c):    # columns left: latents that never fire
        U[row, c] = 1.0
        c += 1
    model.U.copy_(U)
    model.C1.copy_(C1)
    model.C2.copy_(C2)
    if T:
        model.C3.copy_(C3)
    E = torch.cat([D, data.pair_dirs_PD.to(dtype), data.triple_dirs_TD.to(dtype)])     # (N + P + T, d)
    model.W_enc.zero_()
    model.W_enc[:, :N] = torch.linalg.pinv(E)[:, :N]
    model.b_enc.fill_(-1.0)
    model.b_enc[:N] = 0.0
    model.b_dec.zero_()
    return model


# ----------------------------------------------------------------------------------------
# One cell: build, train, measure
# ----------------------------------------------------------------------------------------


def build(model_name: str, data: synthetic.CompositionData, n_latents: int, k: int, batch: int,
          r1: int | None = None):
    """(model, how to initialise b_dec: "median", "zero" or None to keep it) for a model name."""
    d, P, T = data.d, len(data.pairs_P2), len(data.triples_T3)
    official = model_name in ("sae-free", "poly-official")
    common = dict(d_in=d, n_latents=n_latents, k=k, sparsity="topk",
                  aux_coeff=1.0 if official else 1 / 32, dead_tokens=(1000 if official else 100) * batch)
    if model_name.startswith("sae"):
        kw = dict(decoder_norm="free", decoder_init_norm=0.1) if official else {}
        return SAE(SAEConfig(**common, **kw)), "zero" if official else "median"
    if model_name in UNTRAINED + ("oracle-trained",):
        oracle = oracle_polysae(data, k, n_latents, r1).float()
        model = PolySAE(PolySAEConfig(**common, ranks=oracle.config.ranks, order=oracle.config.order))
        model.load_state_dict(oracle.state_dict())
        return model, None
    ranks = (r1 or d, max(4 * T + 2 * P, 1), max(4 * T, 1))
    model = PolySAE(PolySAEConfig(**common, ranks=ranks, untied_init=official))
    with torch.no_grad():
        if model_name.endswith("c2zero"):
            model.C2.zero_()
            model.C3.zero_()
        if model_name.startswith("frozen-enc"):
            oracle = oracle_polysae(data, k, n_latents, r1)
            model.W_enc.copy_(oracle.W_enc)
            model.b_enc.copy_(oracle.b_enc)
            for p in (model.W_enc, model.b_enc, model.b_dec):
                p.requires_grad_(False)
            return model, None
    if model_name == "poly-noqr":
        model.after_step = lambda: None
    return model, "zero" if official else "median"


def train(model, data, b_dec_init, steps: int, batch: int, lr: float, seed: int) -> list:
    """core.train_step steps on fresh samples; returns [(step, λ2)] for a PolySAE."""
    g = torch.Generator().manual_seed(10_000 + seed)
    if b_dec_init is not None:
        model.init_b_dec(data.sample(2048, g), b_dec_init)
    opt_ = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    lam = [(0, model.lambda2.item())] if hasattr(model, "lambda2") else None
    model.train()
    for step in range(1, steps + 1):
        core.train_step(model, opt_, data.sample(batch, g))
        if lam is not None and (step in LAMBDA_STEPS or step == steps):
            lam.append((step, model.lambda2.item()))
    model.eval()
    return lam


def median(v) -> float | None:
    v = torch.as_tensor(v, dtype=torch.float64)
    return v.median().item() if len(v) else None


@torch.no_grad()
def measure(model, data: synthetic.CompositionData, eval_tokens: int, probe_n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(20_000 + seed)
    x = data.sample(eval_tokens, g)
    out = model(x)
    z = out.latents
    fires = (z > 0).sum(0)
    dec = model.decoder_vectors().detach()
    roles = synthetic.latent_roles(dec, data)
    res = {"fvu": core.fvu(x, out.recon).item(), "l0": (z > 0).float().sum(-1).mean().item(),
           "dead": (fires == 0).float().mean().item(), "roles": roles["counts"],
           "atom_recovery": roles["atom_recovery"]}
    alive = fires.nonzero()[:, 0]
    cooc, cov = metrics.cooccurrence([z], alive)
    res["r_covariance_cooc"] = metrics.offdiag_pearson(cov, cooc)
    latent_N, cos_N = synthetic.match_atoms(dec, data)
    ok_N = cos_N > 0.8
    res["atoms_matched"] = ok_N.float().mean().item()
    if isinstance(model, PolySAE):
        res["lambda2"] = model.lambda2.item()
        res.update({k: v for k, v in metrics.interaction_vs_cooccurrence(model, [z], fires, n=len(fires)).items()})
        theta_FF = model.interaction_matrix(torch.arange(model.config.n_latents)).cpu()
        raw = synthetic.pair_scores(theta_FF, data, latent_N, ok_N)
        norm_F = dec.norm(dim=-1).clamp_min(1e-8)
        eff = synthetic.pair_scores(2 * abs(res["lambda2"]) * theta_FF / (norm_F[:, None] * norm_F[None, :]),
                                    data, latent_N, ok_N)
        s = data.strength if data.strength > 0 else 1.0
        res["theta"] = {k: median(v) for k, v in raw.items()}
        res["T_over_s"] = {k: median(v / s) for k, v in eff.items()}
        for name, neg in (("auc_pair_vs_cooc", raw["cooc"]), ("auc_pair_vs_other", raw["other"])):
            res[name] = metrics.roc_auc(raw["pair"], neg) if len(raw["pair"]) and len(neg) else None
        # cos(T, E_ij) for each interacting pair whose atoms are matched
        U2, C2 = model.U[:, :model.config.ranks[1]], model.C2
        coss = []
        for (i, j), e in zip(data.pairs_P2.tolist(), data.pair_dirs_PD):
            m, n = latent_N[i].item(), latent_N[j].item()
            if ok_N[i] and ok_N[j] and m != n:
                coss.append(torch.cosine_similarity((U2[m] * U2[n]) @ C2.T * model.lambda2, e, dim=0).item())
        res["cos_T_E"] = median(coss)
    res["probe"] = probe_scores(model, data, probe_n, seed)
    return res


@torch.no_grad()
def probe_scores(model, data: synthetic.CompositionData, n: int, seed: int) -> dict:
    """{"<P|Q> <compound|part>": {"f1_top1", "f1_top2", "w1_scaled"}}: means over the pairs of each group."""
    scale_F = model.decoder_norms().detach()
    out = {}
    for group, pairs in (("P", data.pairs_P2), ("Q", data.cooc_Q2)):
        for task in ("compound", "part"):
            f1 = {1: [], 2: []}
            w1 = []
            for p, pair in enumerate(pairs):
                g = torch.Generator().manual_seed(30_000 + 97 * seed + 7 * p + (task == "part"))
                x_tr, y_tr = synthetic.probe_set(data, pair, task, n, g)
                x_te, y_te = synthetic.probe_set(data, pair, task, n, g)
                z_tr, z_te = model.encode(x_tr), model.encode(x_te)
                ar = torch.arange(n)
                r = probing.probe(z_tr, z_te, [(ar, y_tr, ar, y_te)], ks=(1, 2), full=False)
                for k in (1, 2):
                    f1[k].append(r[f"top_{k}"]["f1"][0])
                w1.append(metrics.class_wasserstein(z_tr * scale_F, y_tr.long().numpy())["mean"])
            out[f"{group} {task}"] = {"f1_top1": sum(f1[1]) / len(f1[1]), "f1_top2": sum(f1[2]) / len(f1[2]),
                                      "w1_scaled": sum(w1) / len(w1)}
    return out


def run_cell(config_name: str, model_name: str, seed: int, cfg: GroundTruthConfig) -> dict:
    torch.set_num_threads(1)
    spec = CONFIGS[config_name]
    data = synthetic.make_composition_data(**spec["data"], seed=seed)
    torch.manual_seed(seed)
    var = VARIANTS.get(model_name, {})
    k, lr, steps = var.get("k", spec["k"]), cfg.lr * var.get("lr", 1), cfg.steps * var.get("steps", 1)
    model, b_dec_init = build(model_name, data, spec["n_latents"], k, cfg.batch, spec.get("r1"))
    t0 = time.time()
    lam = None
    if model_name in UNTRAINED:
        steps = 0
    else:
        lam = train(model, data, b_dec_init, steps, cfg.batch, lr, seed)
    model.eval()
    res = measure(model, data, cfg.eval_tokens, cfg.probe_n, seed)
    return {"config": config_name, "model": model_name, "seed": seed, "steps": steps, "k": k, "batch": cfg.batch,
            "lr": lr, "train_s": round(time.time() - t0, 1), "lambda2_path": lam, **res}


# ----------------------------------------------------------------------------------------
# The sweep, the table, the figure
# ----------------------------------------------------------------------------------------


def cells(cfg: GroundTruthConfig) -> list[tuple[str, str, int]]:
    return [(c, m, s) for c in cfg.configs.split(",") for m in CONFIGS[c]["models"] for s in range(cfg.seeds)]


def load(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def sweep(cfg: GroundTruthConfig) -> None:
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {(r["config"], r["model"], r["seed"]) for r in load(path)}
    todo = [c for c in cells(cfg) if c not in done]
    bar = tqdm(total=len(todo), desc="cells", unit="cell", dynamic_ncols=True)

    def write(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix_str(f"{row['config']}/{row['model']}/{row['seed']} {row['train_s']}s")

    if cfg.jobs == 1:
        for c in todo:
            write(run_cell(*c, cfg))
    else:
        with ProcessPoolExecutor(cfg.jobs) as pool:
            for fut in as_completed([pool.submit(run_cell, *c, cfg) for c in todo]):
                write(fut.result())
    bar.close()


def spread(vals, digits: int = 3) -> str:
    """mean ± sd over seeds (sd with n − 1), or the single value; "—" when there is none."""
    v = [x for x in vals if x is not None]
    if not v:
        return "—"
    t = torch.tensor(v, dtype=torch.float64)
    out = f"{t.mean().item():.{digits}f}"
    return out + (f" ± {t.std().item():.{digits}f}" if len(v) > 1 else "")


def table(rows: list[dict]) -> str:
    """Three markdown tables (mean ± sd over seeds): reconstruction and what the latents match; PolySAE's
    interaction weights at the planted pairs; probing and W1 on the planted labels."""
    groups = [(c, m, [r for r in rows if r["config"] == c and r["model"] == m])
              for c in CONFIGS for m in CONFIGS[c]["models"]]
    groups = [(c, m, rs) for c, m, rs in groups if rs]
    role = lambda r, *names: sum(r["roles"].get(n, 0) for n in names)  # noqa: E731
    cols = {
        "latents": [("FVU", lambda r: r["fvu"], 3), ("L0", lambda r: r["l0"], 2), ("dead", lambda r: r["dead"], 2),
                    ("atoms recovered", lambda r: r["atom_recovery"], 2),
                    ("latents on P compounds or E_ij (of P)", lambda r: role(r, "pair compound", "pair E"), 1),
                    ("on T compounds or E_ijk (of T)", lambda r: role(r, "triple compound", "triple E"), 1),
                    ("on Q compounds (of Q)", lambda r: role(r, "cooc compound"), 1)],
        "interactions": [("λ2 at step 0 → end", None, 3), ("AUC ‖Θ2‖: P vs Q", lambda r: r["auc_pair_vs_cooc"], 2),
                         ("P vs independent", lambda r: r["auc_pair_vs_other"], 2),
                         ("\\|T\\|/s at P", lambda r: r["T_over_s"]["pair"], 3),
                         ("\\|T\\|/s at Q", lambda r: r["T_over_s"]["cooc"], 3),
                         ("cos(T, E_ij) at P", lambda r: r["cos_T_E"], 2),
                         ("r(‖Θ2‖, co-occ.)", lambda r: r["r_interaction_cooc"], 2),
                         ("r(cov, co-occ.)", lambda r: r["r_covariance_cooc"], 2)],
        "probing": [(f"{what} {key}", (lambda key, f: lambda r: r["probe"][key][f])(key, field), 4 if what == "W1" else 3)
                    for what, field, keys in (("F1 top-1", "f1_top1", ("P compound", "P part", "Q compound", "Q part")),
                                              ("F1 top-2", "f1_top2", ("P compound",)),
                                              ("W1", "w1_scaled", ("P compound", "Q compound")))
                    for key in keys],
    }
    out = []
    for name, spec in cols.items():
        head = "| config | model | " + " | ".join(h for h, _, _ in spec) + " |"
        lines = [head, "|---|---|" + "---:|" * len(spec)]
        for c, m, rs in groups:
            if name == "interactions" and "lambda2" not in rs[0]:
                continue
            cells = []
            for h, f, digits in spec:
                if f is None:                                           # λ2 path: start → end
                    cells.append(f"{rs[0]['lambda2_path'][0][1]:.2f} → {spread([r['lambda2'] for r in rs], 3)}"
                                 if rs[0].get("lambda2_path") else spread([r["lambda2"] for r in rs], 3))
                else:
                    cells.append(spread([f(r) for r in rs], digits))
            lines.append(f"| {c} | {m} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def figure(rows: list[dict], path: Path) -> None:
    """Three panels: latents on compounds per pair (P vs Q) per model, the effective interaction |T|/s at P and Q
    per PolySAE (each seed a dot), and λ2 along training (main config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    labels, P, Q, Ps, Qs = [], [], [], [], []
    for c in CONFIGS:
        n_p, n_q = CONFIGS[c]["data"]["n_pairs"], CONFIGS[c]["data"]["n_cooc"]
        for m in CONFIGS[c]["models"]:
            rs = [r for r in rows if r["config"] == c and r["model"] == m]
            if not rs or m in UNTRAINED:
                continue
            p = torch.tensor([(r["roles"].get("pair compound", 0) + r["roles"].get("pair E", 0)) / n_p for r in rs])
            q = torch.tensor([r["roles"].get("cooc compound", 0) / n_q for r in rs])
            labels.append(f"{c}/{m}")
            P.append(p.mean().item()), Q.append(q.mean().item())
            Ps.append([p.mean().item() - p.min().item(), p.max().item() - p.mean().item()])
            Qs.append([q.mean().item() - q.min().item(), q.max().item() - q.mean().item()])
    y = torch.arange(len(labels)).float()
    axes[0].barh(y - 0.2, P, 0.4, xerr=torch.tensor(Ps).T.reshape(2, -1), label="interacting pairs P (+ E)")
    axes[0].barh(y + 0.2, Q, 0.4, xerr=torch.tensor(Qs).T.reshape(2, -1), label="co-occurring pairs Q")
    axes[0].set_yticks(y.tolist(), labels, fontsize=6)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("compound latents per pair (cos > 0.9)")
    axes[0].legend(fontsize=6)
    polys = [(c, m) for c in CONFIGS for m in CONFIGS[c]["models"]
             if c != "control" and m.startswith(("poly", "oracle", "frozen"))
             and any(r["config"] == c and r["model"] == m for r in rows)]
    for k_, (c, m) in enumerate(polys):
        rs = [r for r in rows if r["config"] == c and r["model"] == m]
        for r in rs:
            for key, col in (("pair", "C0"), ("cooc", "C1")):
                v = r["T_over_s"][key]
                if v is not None:
                    axes[1].scatter(max(v, 1e-4), k_ + (0.15 if key == "cooc" else -0.15), c=col, s=10,
                                    label=("P" if key == "pair" else "Q") if (k_, r["seed"]) == (0, 0) else None)
    for c, style in (("main", "-"), ("tight", "--")):
        for k_, m in enumerate(("poly-ours", "poly-official", "poly-c2zero")):
            for r in rows:
                if r["config"] == c and r["model"] == m and r.get("lambda2_path"):
                    path_ = r["lambda2_path"]
                    axes[2].plot([s for s, _ in path_], [v for _, v in path_], style, color=f"C{k_}", lw=1,
                                 label=f"{c}/{m}" if r["seed"] == 0 else None)
    axes[1].set_xscale("log")
    axes[1].set_yticks(range(len(polys)), [f"{c}/{m}" for c, m in polys], fontsize=6)
    axes[1].invert_yaxis()
    axes[1].axvline(1.0, color="grey", lw=0.5)
    axes[1].set_xlabel("|T| / s at P and Q pairs (1 = planted)")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=6)
    axes[2].axhline(0, color="grey", lw=0.5)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("λ2")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    p = cli.ArgParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    cli.add_flags(p, GroundTruthConfig)
    try:
        cfg = cli.build(GroundTruthConfig, **cli.values(p.parse_args(argv), GroundTruthConfig))
        cli.check_writable(cfg.out, "the results folder")
    except cli.USER_ERRORS as e:
        return cli.cli_error(e)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not cfg.table_only:
        sweep(cfg)
    rows = load(Path(cfg.out) / "results.jsonl")
    if not rows:
        return cli.cli_error(ValueError(f"no results in {cfg.out}/results.jsonl yet"))
    print(table(rows))
    figure(rows, Path(cfg.out) / "ground_truth_poly.png")
    (Path(cfg.out) / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figure and table of the scaled-down reproduction (experiments/reproduce.sh).

    python experiments/figure.py [RUNS_DIR=runs/repro]

Reads RUNS_DIR/<run>/eval.json (metrics.py), probe.json (probe.py format, experiments/probe_all.py)
and the models (saved.load_run), and writes
  experiments/fc_and_norms.png : (a) functional-coherence histograms, FC_i ∈ [1, L] (1 = driven by one
      layer); (b) decoder-norm spread Σ_l‖d_il‖ / max_l‖d_il‖ on the same axis; (c, d) per-latent,
      per-layer decoder norms ‖d_il‖ / max_l ‖d_il‖ (rows = latents sorted by peak layer) for the
      crosscoder and the TR fmxcoder;
  experiments/results_repro.md : the tables (fmxcoders comparison on 8 layers; PolySAE vs SAE on one layer).
A run that is missing is left out (its row says "not run").
"""
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.saved import load_run  # noqa: E402

HERE = Path(__file__).resolve().parent
MULTI = [("sae_per_layer", "TopK SAE per layer (8)"), ("crosscoder", "crosscoder"),
         ("crosscoder_mask", "crosscoder + masking"), ("fmx_tr", "fmxcoder TR (masked)"),
         ("fmx_tr_nomask", "fmxcoder TR, no masking"), ("fmx_cp", "fmxcoder CP (masked)"),
         ("fmx_cp_nomask", "fmxcoder CP, no masking")]


def load(run: Path) -> dict | None:
    if not (run / "eval.json").exists():
        return None
    ev = json.loads((run / "eval.json").read_text())
    res = ev["results"][-1]                      # a per-layer set: its "set of L" entry comes last
    out = {"eval": res, "per_layer": ev["results"][:-1] if len(ev["results"]) > 1 else [res]}
    pj = run / "probe.json"
    out["probe"] = json.loads(pj.read_text()) if pj.exists() else None
    sj = run / "summary.json"
    out["summary"] = json.loads(sj.read_text()) if sj.exists() else {}
    return out


def f1(p: dict | None, key: str, col: str) -> float | None:
    return None if p is None else (p["mean"].get(key) or {}).get(col)


def fmt(v, spec=".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def dict_key(p: dict) -> str:
    """The probe feature set of the dictionary itself (the per-layer mean for a per-layer set)."""
    return f"{p['dict']}@mean" if f"{p['dict']}@mean" in p["mean"] else p["dict"]


def f1_cells(p: dict | None, key: str | None, ks=(1, 2, 5)) -> str:
    """The probe F1 columns top-k for k in ks, as " | "-joined table cells."""
    return " | ".join(fmt(f1(p, key, f"top_{k}")) for k in ks)


def loaded(R: Path, runs, lines: list[str], n_cols: int):
    """(label, run, probe, probe feature key) of each (name, label) in runs that has an eval.json;
    appends a "not run" row of n_cols cells to lines for the others."""
    for name, label in runs:
        r = load(R / name)
        if r is None:
            lines.append(f"| {label} | not run |" + " |" * (n_cols - 2))
            continue
        p = r["probe"]
        yield label, r, p, dict_key(p) if p else None


def spread(norms_FL: np.ndarray) -> np.ndarray:
    return norms_FL.sum(1) / np.maximum(norms_FL.max(1), 1e-12)


def table_multi(R: Path) -> str:
    lines = ["| dictionary | params | FVU (8 layers) | MSE (norm., Σ layers) | L0 | dead | mean FC | FC ≥ 2 | "
             "norm spread | probe F1 top-1 | top-2 | top-5 | W1 (bbc) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    per_layer = ["| dictionary | " + " | ".join(f"FVU L{l}" for l in range(11, 19)) + " |", "|---|" + "---:|" * 8]
    for label, r, p, key in loaded(R, MULTI, lines, 13):
        e, w = r["eval"], None
        if p and p.get("wasserstein"):
            w = float(np.mean([v["mean"] for v in p["wasserstein"].values()]))
        ps = r["summary"].get("parameters") or {}
        params = ps.get("all", sum(ps.values()) if ps else None)
        lines.append(f"| {label} | {fmt(params, ',')} | {fmt(e['fvu'])} | {fmt(e['mse_norm'], '.0f')} | "
                     f"{fmt(e['l0'], '.1f')} | {fmt(e['dead_eval'])} | {fmt(e.get('fc_mean'), '.2f')} | "
                     f"{fmt(e.get('fc_frac_ge2'), '.2f')} | {fmt(e.get('norm_spread_mean'), '.2f')} | "
                     f"{f1_cells(p, key)} | {fmt(w, '.4f')} |")
        fvus = e.get("fvu_per_layer") or [x["fvu"] for x in r["per_layer"]]
        per_layer.append(f"| {label} | " + " | ".join(fmt(v) for v in fvus) + " |")
    raw = load(R / "crosscoder")
    if raw and raw["probe"]:
        p = raw["probe"]
        lines.append(f"| *raw residual, mean of layers 11–18* | | | | | | | | | {f1_cells(p, 'raw@mean')} | |")
    return "\n".join(lines) + "\n\nFVU per layer (held-out tokens):\n\n" + "\n".join(per_layer)


def table_single(R: Path) -> str:
    lines = ["| dictionary (layer 15) | FVU | MSE (norm.) | L0 | dead | ΔCE | CE rec. (zero abl.) | probe F1 top-1 | "
             "top-2 | top-5 | W1 (bbc) | r(‖Θ2‖, co-occ.) | r(cov, co-occ.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r, p, key in loaded(R, [("sae_L15", "TopK SAE"), ("polysae_L15", "PolySAE (576, 64, 64)")],
                                   lines, 13):
        e = r["eval"]
        w = p["wasserstein"].get(key, {}).get("mean") if p and p.get("wasserstein") else None
        lines.append(f"| {label} | {fmt(e['fvu'])} | {fmt(e['mse_norm'], '.1f')} | {fmt(e['l0'], '.1f')} | "
                     f"{fmt(e['dead_eval'])} | {fmt(e.get('ce_increase'), '.4f')} | "
                     f"{fmt(e.get('frac_recovered_zero'))} | {f1_cells(p, key)} | {fmt(w, '.4f')} | "
                     f"{fmt(e.get('r_interaction_cooc'))} | {fmt(e.get('r_covariance_cooc'))} |")
    r = load(R / "sae_L15")
    if r and r["probe"]:
        p = r["probe"]
        lines.append(f"| *raw residual, layer 15* | | | | | | | {f1_cells(p, 'raw@15')} | | | |")
    return "\n".join(lines)


def table_length(R: Path) -> str | None:
    """FVU, mean FC and probe F1 (top-1) against training tokens: R/<name> (the main runs) and
    R/length/<name>_<tokens> (`reproduce.sh length`). None when no length run exists."""
    if not (R / "length").exists():
        return None
    rows = []
    for name, label in [("crosscoder", "crosscoder"), ("fmx_tr", "fmxcoder TR (masked)"),
                        ("fmx_cp", "fmxcoder CP (masked)")]:
        for run in [R / name, *(R / "length").glob(f"{name}_[0-9]*")]:
            r = load(run)
            if r is not None:
                rows.append((label, r["summary"].get("tokens", 0), r["eval"], r["probe"]))
    lines = ["| dictionary | training tokens | FVU | mean FC | dead | probe F1 top-1 | top-5 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, tokens, e, p in sorted(rows, key=lambda row: (row[0], row[1])):
        key = dict_key(p) if p else None
        lines.append(f"| {label} | {tokens:,} | {fmt(e['fvu'])} | {fmt(e.get('fc_mean'), '.2f')} | "
                     f"{fmt(e['dead_eval'])} | {f1_cells(p, key, (1, 5))} |")
    return "\n".join(lines)


def figure(R: Path, path: Path) -> None:
    runs = [(n, l) for n, l in MULTI[1:] if (R / n / "eval.json").exists()]
    heat = [(n, l) for n, l in [("crosscoder", "crosscoder"), ("fmx_tr", "fmxcoder TR")] if (R / n).exists()]
    fig, axes = plt.subplots(1, 2 + len(heat), figsize=(4.2 * (2 + len(heat)), 3.8), dpi=90,
                             gridspec_kw={"width_ratios": [1.4, 1.4] + [1] * len(heat)})
    edges = None
    for name, label in runs:
        e = json.loads((R / name / "eval.json").read_text())["results"][-1]
        if "fc_hist" not in e:
            continue
        edges, h = np.array(e["fc_hist_edges"]), np.array(e["fc_hist"], dtype=float)
        axes[0].stairs(h / max(h.sum(), 1), edges, label=f"{label} (mean {e['fc_mean']:.2f})", lw=1.6)
        [(_, m, _)] = load_run(R / name)
        with torch.no_grad():
            s = spread(m.decoder_norms().float().numpy())
        hs, _ = np.histogram(s, bins=edges)
        axes[1].stairs(hs / max(hs.sum(), 1), edges, label=f"{label} (mean {s.mean():.2f})", lw=1.6)
    axes[0].set(title="(a) functional coherence FC_i", xlabel="FC (1 = one layer drives the latent, 8 = all)",
                ylabel="fraction of latents")
    axes[1].set(title="(b) decoder-norm spread (all latents)", xlabel="Σ_l‖d_il‖ / max_l‖d_il‖")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    for ax, (name, label) in zip(axes[2:], heat):
        [(layers, m, _)] = load_run(R / name)
        with torch.no_grad():
            n = m.decoder_norms().float().numpy()
        n = n / np.maximum(n.max(1, keepdims=True), 1e-12)
        order = np.lexsort((-spread(n), n.argmax(1)))
        im = ax.imshow(n[order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(layers)), layers, fontsize=7)
        ax.set(title=f"({'c' if name == 'crosscoder' else 'd'}) {label}: ‖d_il‖ / max_l",
               xlabel="layer", ylabel="latent (sorted by peak layer)")
    if heat:
        fig.colorbar(im, ax=axes[-1], fraction=0.08)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


def main(R: Path) -> None:
    md = ("# Scaled-down reproduction: results\n\nWritten by `experiments/figure.py` from the run folders of "
          "`experiments/reproduce.sh`.\n\n## fmxcoders comparison (SmolLM2-135M, layers 11–18)\n\n"
          + table_multi(R) + "\n\n## PolySAE vs TopK SAE (SmolLM2-135M, layer 15, same F, k, tokens)\n\n"
          + table_single(R) + "\n")
    length = table_length(R)
    if length:
        md += ("\n## Training length (crosscoder vs fmxcoders, same cache, batches of the same size)\n\n"
               + length + "\n")
    (HERE / "results_repro.md").write_text(md)
    print(md)
    figure(R, HERE / "fc_and_norms.png")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="?", default="runs/repro", help="the run folders of reproduce.sh (default runs/repro)")
    main(Path(p.parse_args().runs))

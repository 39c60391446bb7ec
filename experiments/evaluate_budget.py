"""Evaluate the runs of experiments/budget.py and write their figure and tables.

    python experiments/evaluate_budget.py [--no-probe]

1. Probing and Wasserstein (experiments/probe_all.py: one LM pass per task, 95% bootstrap intervals
   over the test texts, paired W1 resamples) of the finished curve runs and PolySAE runs that have
   no probe.json yet; metrics.py (reconstruction, interaction weight vs co-occurrence) of the
   PolySAE/SAE runs.
2. experiments/budget_curves.png: functional coherence, held-out FVU, dead fraction and
   decoder-norm spread against training steps, one line per dictionary (train.py's curve.jsonl:
   a fixed panel of 8,192 held-out tokens, every 1,000 steps).
3. experiments/results.md: the tables. Values "at step s" come from curve.jsonl, so a 3,000-step
   run and a 15,000-step run with the same flags (constant lr) are compared at the same step.
A run that is missing or unfinished is shown as "not run".
"""
import argparse
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import budget  # noqa: E402
import probe  # noqa: E402
from support import runs  # noqa: E402

HERE = ROOT / "experiments"
NAMES = {"crosscoder": "crosscoder", "crosscoder_mask": "crosscoder + masking", "fmx_tr": "fmxcoder TR (masked)",
         "fmx_cp": "fmxcoder CP (masked)", "fmx_tr_nomask": "fmxcoder TR, no masking",
         "fmx_cp_nomask": "fmxcoder CP, no masking"}
CURVES = ["crosscoder", "crosscoder_mask", "fmx_tr", "fmx_cp"]
POLY = ["sae_ours", "polysae_ours", "sae_official", "polysae_official"]


def done(name: str) -> bool:
    s = runs.read_summary(budget.OUT / name)
    return s is not None and s.get("complete") is True


@lru_cache(maxsize=None)
def curve(name: str) -> dict[int, dict]:
    """{step: eval of the whole model} from the run's curve.jsonl ({} when absent)."""
    path = budget.OUT / name / "curve.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: (r["eval"].get("all") or next(iter(r["eval"].values()))) for r in rows}


def params(name: str) -> int | None:
    s = runs.read_summary(budget.OUT / name)
    return None if s is None else sum(s["parameters"].values())


def evaluate(probe: bool) -> None:
    poly = [n for n in POLY if done(n) and not (budget.OUT / n / "eval.json").exists()]
    if poly:
        subprocess.check_call([sys.executable, str(ROOT / "metrics.py"), *[str(budget.OUT / n) for n in poly],
                               "--ce-tokens", "0", "--fc-tokens", "0", "--wasserstein", ""], cwd=ROOT)
    todo = [n for n in CURVES + POLY if done(n) and not (budget.OUT / n / "probe.json").exists()]
    if probe and todo:
        # one call: the runs in it see the same texts and the same W1 resamples (paired intervals; the
        # PolySAE/SAE ratio needs both runs of a pair probed in the same call, which running this after
        # the PolySAE stage gives)
        subprocess.check_call([sys.executable, str(HERE / "probe_all.py"), *[str(budget.OUT / n) for n in todo],
                               "--task", "offline", "--no-full"], cwd=ROOT)


# -- figure ----------------------------------------------------------------------------------

def figure(path: Path) -> None:
    panels = [("fc_mean", "mean functional coherence (FC ∈ [1, 8])"), ("fvu", "held-out FVU"),
              ("dead_eval", "dead fraction (held-out panel)"), ("norm_spread_mean", "decoder-norm spread")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name in CURVES + ["fmx_tr_nomask", "fmx_cp_nomask"]:
        c = curve(name)
        if not c:
            continue
        steps = sorted(c)
        style = "--" if "nomask" in name else "-"
        for ax, (key, title) in zip(axes, panels):
            pts = [(s, c[s][key]) for s in steps if c[s].get(key) is not None and (key != "fvu" or s > 0)]
            ax.plot(*zip(*pts), style, marker="o", ms=3, label=NAMES[name])
            ax.set_title(title)
            ax.set_xlabel("optimiser step, thousands (batch 256, lr 1e-3)")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}"))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M layers 11-18, F 512, k 32: training to lr x steps = {budget.STEPS / 1000:g} "
                 "(experiments/budget.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- tables ----------------------------------------------------------------------------------

def fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}"


def ci(value, interval, digits=3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else fmt(value, digits)


def probe_report(name: str) -> dict | None:
    """The run's probe.json (experiments/probe_all.py), None when it was not probed."""
    p = budget.OUT / name / "probe.json"
    return json.loads(p.read_text()) if p.exists() else None


def wasserstein(name: str) -> dict | None:
    """The run's W1 entry of probe.json ({"raw", "decoder_norm_scaled"}: mean, mean_ci, replicates)."""
    r = probe_report(name)
    return None if r is None else next(iter(r.get("wasserstein", {}).values()), None)


def probe_cells(name: str, kind: str) -> list[str]:
    r = probe_report(name)
    if r is None:
        return ["–", "–", "–"]
    mean, intervals = r["mean"].get(kind, {}), r.get("mean_ci", {}).get(kind, {})
    w = wasserstein(name)
    w1 = ci(w["decoder_norm_scaled"]["mean"], w["decoder_norm_scaled"]["mean_ci"], 4) if w else "–"
    return [ci(mean.get(c), intervals.get(c)) for c in ("top_1", "top_5")] + [w1]


def row_at(name: str, step: int) -> list[str]:
    c = curve(name).get(step)
    if c is None:
        return ["not run"] + ["–"] * 4
    return [fmt(c["fvu"]), fmt(c["dead_eval"]), fmt(c.get("fc_mean"), 2), fmt(c.get("norm_spread_mean"), 2),
            fmt(c.get("fc_frac_ge2"), 2)]


def tables() -> str:
    S, s = budget.STEPS, budget.SHORT
    out = ["# Training to the papers' budget: results", "",
           "Written by `experiments/evaluate_budget.py` from the runs of `experiments/budget.py` (SmolLM2-135M, "
           "2M-token cache, batch 256, lr 1e-3 constant, BatchTopK k 32, F 512 unless stated). FVU, dead "
           "fraction, mean FC and decoder-norm spread are measured on the same 8,192 held-out tokens at every "
           "step shown. Probe F1 (mean over the offline tasks) and W1 (bbc_topic, latents scaled by what they "
           "write) carry 95% bootstrap intervals over the test texts. The first, shorter reproduction is in "
           "[results_repro.md](results_repro.md).", "",
           "![FC, FVU, dead fraction and decoder-norm spread against steps](budget_curves.png)", "",
           f"## 1. Curves: from init to step {S:,} (lr × steps = {S / 1000:g})", "",
           "| dictionary | params | step | FVU | dead | mean FC | norm spread | FC ≥ 2 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in CURVES:
        for step in (0, s, S):
            out.append(f"| {NAMES[name]} | {fmt(params(name))} | {step:,} | " + " | ".join(row_at(name, step)) + " |")
    out += ["", f"Probing and W1 at step {S:,}:", "", "| dictionary | probe F1 top-1 | top-5 | W1 (bbc, decoder-norm "
            "scaled) |", "|---|---:|---:|---:|"]
    for name in CURVES:
        kind = "crosscoder" if name.startswith("crosscoder") else "fmxcoder"
        out.append(f"| {NAMES[name]} | " + " | ".join(probe_cells(name, kind)) + " |")

    # the window runs are compared at the last step both logged (all of them, once they finish)
    sw = min([s] + [max(curve(n), default=0) for n in ("window_crosscoder", "window_fmx_tr")])
    out += ["", f"## 2. Layer window: blocks 11-18 vs blocks 4, 7, ..., 25 (step {sw:,})", "",
            "| dictionary | layers | step | FVU | dead | mean FC | norm spread | FC ≥ 2 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, label, layers in (("crosscoder", "crosscoder", "11-18"), ("window_crosscoder", "crosscoder", "4-25 / 3"),
                                ("fmx_tr", "fmxcoder TR (masked)", "11-18"), ("window_fmx_tr", "fmxcoder TR (masked)", "4-25 / 3")):
        for step in (0, sw):
            out.append(f"| {label} | {layers} | {step:,} | " + " | ".join(row_at(name, step)) + " |")

    out += ["", f"## 3. Matched baselines (step {s:,})", "",
            "Equal width: every dictionary has F 512. Equal weights: dense crosscoders whose F gives the TR "
            "(F 244) and CP (F 137) fmxcoders' parameter counts.", "",
            "| dictionary | F | params | FVU | dead | mean FC | norm spread | FC ≥ 2 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label, F in (("crosscoder", "crosscoder", 512), ("crosscoder_F244", "crosscoder", 244),
                           ("crosscoder_F137", "crosscoder", 137), ("fmx_tr", "fmxcoder TR (masked)", 512),
                           ("fmx_cp", "fmxcoder CP (masked)", 512)):
        out.append(f"| {label} | {F} | {fmt(params(name))} | " + " | ".join(row_at(name, s)) + " |")

    out += ["", f"## 4. AuxK (step {s:,})", "", "| dictionary | AuxK weight | FVU | dead | mean FC | norm spread | FC ≥ 2 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for base, label in (("crosscoder", "crosscoder"), ("fmx_tr", "fmxcoder TR (masked)")):
        for name, w in ((f"{base}_aux0", "0"), (base, "1/32 (ours)"), (f"{base}_aux1.0", "1.0 (official)")):
            out.append(f"| {label} | {w} | " + " | ".join(row_at(name, s)) + " |")

    out += ["", f"## 5. PolySAE vs TopK SAE, layer 15, F 1,024, k 32, {s:,} steps: our conventions and the official "
            "code's", "",
            "Ours: unit-norm SAE decoder rows, tied PolySAE encoder, b_dec from the geometric median, AuxK 1/32. "
            "Official: free SAE decoder rows from norm 0.1, untied PolySAE encoder, b_dec 0, AuxK 1.0.", "",
            "| conventions | dictionary | FVU | dead | probe F1 top-1 | top-5 | W1 raw | W1 decoder-norm scaled | "
            "W1 ratio PolySAE/SAE (scaled) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for conv in ("ours", "official"):
        ratio = w1_ratio(f"polysae_{conv}", f"sae_{conv}")
        for kind in ("sae", "polysae"):
            name = f"{kind}_{conv}"
            c, w = curve(name).get(s), wasserstein(name)
            cells = [fmt(c["fvu"]) if c else "not run", fmt(c["dead_eval"]) if c else "–",
                     *probe_cells(name, kind)[:2],
                     ci(w["raw"]["mean"], w["raw"]["mean_ci"], 4) if w else "–",
                     ci(w["decoder_norm_scaled"]["mean"], w["decoder_norm_scaled"]["mean_ci"], 4) if w else "–",
                     ratio if kind == "polysae" else ""]
            out.append(f"| {conv} | {'PolySAE' if kind == 'polysae' else 'TopK SAE'} | " + " | ".join(cells) + " |")

    seeds = [n for n in budget.experiments()["seeds"] if curve(n)]
    if seeds:
        out += ["", f"## 6. Seeds (step {s:,})", "", "| run | FVU | dead | mean FC | norm spread | FC ≥ 2 |",
                "|---|---:|---:|---:|---:|---:|"]
        for name in ["crosscoder", "fmx_tr"] + seeds:
            out.append(f"| {name} | " + " | ".join(row_at(name, s)) + " |")
    return "\n".join(out) + "\n"


def w1_ratio(a: str, b: str) -> str:
    """W1(a) / W1(b) with the interval of the paired replicates (both runs probed in one call)."""
    wa, wb = wasserstein(a), wasserstein(b)
    if wa is None or wb is None:
        return "–"
    wa, wb = wa["decoder_norm_scaled"], wb["decoder_norm_scaled"]
    reps = [x / y for x, y in zip(wa.get("replicates", []), wb.get("replicates", []))]
    return ci(wa["mean"] / wb["mean"], probe.percentile_interval(reps) if reps else None, 2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-probe", action="store_true", help="tables and figure only (no LM passes)")
    a = p.parse_args(argv)
    evaluate(not a.no_probe)
    figure(HERE / "budget_curves.png")
    (HERE / "results.md").write_text(tables())
    print(f"wrote {HERE / 'budget_curves.png'} and {HERE / 'results.md'}")


if __name__ == "__main__":
    main()

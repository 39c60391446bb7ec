"""The ground-truth questions on the real model: do SmolLM2 crosscoders look like planted features of kind (a)
(a latent reads the layers it writes) or (b)-(d) (persistent residual-stream features, read by differencing)?

    python experiments/real_fc.py --out runs/real_fc                 # train 3 seeds (one cache), evaluate, report
    python experiments/real_fc.py --out runs/real_fc --report        # only the report of finished seeds

Per seed one train.py run trains three dictionaries together on one activation cache (harvested once, reused
by the later seeds): a crosscoder, the crosscoder with layer masking p 0.05 and the masked TR fmxcoder rank 32,
F 512, k 32, BatchTopK, SmolLM2-135M blocks 11-18, the offline corpus. Then support/evaluate.py evaluates it
(held-out FVU, L0; FC under zeroing and under mean ablation, binned by decoder-norm spread; the other
readings and the artefact readings with their off-token share), and from the weights
metrics.differencing_signature: for each latent, the projection of its encoder weights at every layer on
its own decoder direction, and the ratio r_(p−1) / r_p at the layer before its readout peak p. On planted
features (experiments/ground_truth.py) that ratio is ≈ −1 for persistent features (b)-(d), read as a
difference of adjacent layers, and ≈ 0 for independent per-layer directions (a).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RUN = ["--layers", "11-18", "--n-latents", "512", "--k", "32", "--sparsity", "batchtopk", "--batch-size", "256",
       "--lr", "1e-3", "--tokens", "256000", "--cache-tokens", "200000", "--eval-tokens", "16384",
       "--lm-dtype", "float32", "--dead-tokens", "20000", "--log-every", "100"]
DICTS = ["--dict", "crosscoder", "--dict", "crosscoder", "--name", "masked", "--mask-prob", "0.05",
         "--dict", "fmxcoder", "--name", "tr", "--rank", "32"]
NAMES = ("crosscoder", "masked", "tr")


def signature_of(folder: Path) -> dict:
    """metrics.differencing_signature of a saved dictionary's weights, and its decoder-norm spread."""
    import metrics
    from support import saved

    [(_, model, _)] = saved.open_run(folder)
    W_enc, W_dec = (w.detach() for w in model.full_weights())
    sig = metrics.differencing_signature(W_enc, W_dec)
    return {"ratio": sig["ratio"].tolist(), "cos_before": sig["cos_before"].tolist(), "peak": sig["peak"].tolist(),
            "spread": metrics.spread(model.decoder_norms().detach()).tolist()}


def evaluate(run: Path) -> None:
    """RUN/<name>/analysis.json for each dictionary of a finished seed (skipped when there)."""
    from support import evaluate as ev

    for name in NAMES:
        folder = run / name
        if (folder / "analysis.json").exists():
            continue
        e = ev.evaluate_run(folder, ce_tokens=0, fc_tokens=8192, wasserstein_task=None, fc_variants=True,
                            fc_artefacts=True, progress=True)
        (folder / "analysis.json").write_text(json.dumps({"eval": e["results"][0], "signature": signature_of(folder)}))


def ci(v) -> str:
    """mean ± half-width of the 95 % t-interval over seeds."""
    v = np.array([x for x in v if x == x], dtype=float)
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    from scipy.stats import t
    return f"{v.mean():.2f} ± {t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)):.2f}"


def load(out: Path) -> dict:
    """{name: [analysis of each finished seed]}."""
    res = {}
    for seed in sorted(out.glob("seed*")):
        for name in NAMES:
            f = seed / name / "analysis.json"
            if f.exists():
                res.setdefault(name, []).append(json.loads(f.read_text()))
    return res


def report(out: Path) -> str:
    res = load(out)
    n = max((len(v) for v in res.values()), default=0)
    lines = [f"{n} seeds; mean ± 95 % t-interval over seeds; signature ratio r_(p−1)/r_p (metrics.differencing_signature)"]
    lines += ["| dictionary | FVU | L0 | FC (zeroed) | FC (mean abl.) | dec. spread | share ratio < −0.5 | median ratio |"
              " pre/all/ratio_mean FC, off-token share |", "|---|" + "---:|" * 8]
    for name, rs in res.items():
        ev = [r["eval"] for r in rs]
        ratio = [np.array([x for x in r["signature"]["ratio"] if x == x]) for r in rs]
        art = [e["fc_artefacts"]["pre/all/ratio_mean"] for e in ev]
        lines.append(f"| {name} | {ci([e['fvu'] for e in ev])} | {ci([e['l0'] for e in ev])} | "
                     f"{ci([e['fc_mean'] for e in ev])} | {ci([e['fc_mean_ablation'] for e in ev])} | "
                     f"{ci([e['norm_spread_mean'] for e in ev])} | {ci([(v < -0.5).mean() for v in ratio])} | "
                     f"{ci([np.median(v) for v in ratio])} | {ci([a['mean'] for a in art])}, "
                     f"{ci([100 * a['off_token_share'] for a in art])} % |")
    lines += ["", "FC by decoder-norm spread, zeroed / mean ablation (latents per bin, mean over seeds):"]
    for name, rs in res.items():
        ev = [r["eval"] for r in rs]
        cells = []
        for i, lo in enumerate(ev[0]["fc_by_spread"]["edges"][:-1]):
            count = np.mean([e["fc_by_spread"]["latents"][i] for e in ev])
            if count >= 1:
                z = [e["fc_by_spread"]["fc_mean"][i] for e in ev]
                m = [e["fc_mean_ablation_by_spread"]["fc_mean"][i] for e in ev]
                cells.append(f"[{lo},{lo + 1}) {ci(z)} / {ci(m)} (n {count:.0f})")
        lines.append(f"- {name}: " + "; ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "real_fc"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--report", action="store_true", help="only print the report of the finished seeds")
    a, extra = p.parse_known_args(argv)
    out = Path(a.out)
    if not a.report:
        import train

        for s in [int(x) for x in a.seeds.split(",")]:
            run = out / f"seed{s}"
            if not (run / "summary.json").exists():
                code = train.main([*RUN, "--seed", str(s), "--out", str(run), *extra, *DICTS])
                if code:
                    return code
            evaluate(run)
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

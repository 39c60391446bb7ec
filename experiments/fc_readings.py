"""Functional coherence under every reading of the fmxcoders paper's description, at step 0 and trained.

    python experiments/fc_readings.py                   # CPU: F 512, SmolLM2 blocks 4, 7, ..., 25, offline-large
    python experiments/fc_readings.py --table runs/fc_readings     # only print the table of a finished run

The paper (arXiv 2605.09438, pp. 6, 14) zeroes each layer in turn and measures "the relative change" of each
latent, which leaves three choices open (metrics.FC_READINGS): the activation (ReLU(pre) before the sparsifier,
or z after it), the tokens averaged over (where the latent fires, or all), and the form (the mean of per-token
ratios, or the ratio of the means). A crosscoder, the crosscoder with layer masking and the masked TR fmxcoder
are trained together on one stream (train.py, several --dict); train.py --eval-every logs FC under the six
readings of metrics.FC_READINGS on the same held-out panel at step 0 and along training (curve.jsonl; runs made
before the two all-token mean-of-ratio readings became metrics.ARTEFACT_READINGS have all eight). The table asks
whether any reading makes the standard crosscoder's latents look driven by one or two layers (FC near 1-2 of
L = 8). Those two readings divide by ε where the latent is off, and on planted features almost all of their sum
comes from such tokens (experiments/ground_truth.py): artefacts, reported only by `metrics.py --fc-artefacts`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DICTS = ["--dict", "crosscoder", "--dict", "crosscoder", "--name", "masked", "--mask-prob", "0.05",
         "--dict", "fmxcoder", "--name", "tr", "--rank", "32"]


def table(run: Path) -> str:
    curves = {}
    for name in ("crosscoder", "masked", "tr"):
        rows = [json.loads(l) for l in (run / name / "curve.jsonl").read_text().splitlines()]
        curves[name] = (rows[0], rows[-1])
    readings = list(curves["crosscoder"][0]["eval"]["all"]["fc_readings"])
    head = "| reading (activation/tokens/form) | " + " | ".join(
        f"{n} step {curves[n][0]['step']} → {curves[n][1]['step']:,}" for n in curves) + " |"
    lines = [head, "|---|" + "---:|" * len(curves)]
    for r in readings:
        cells = []
        for n, (first, last) in curves.items():
            a, b = first["eval"]["all"]["fc_readings"][r], last["eval"]["all"]["fc_readings"][r]
            cells.append(f"{a['mean']:.2f} → {b['mean']:.2f} ({b['frac_ge2']:.0%} ≥ 2)")
        lines.append(f"| {r}{' (ours)' if r == 'pre/fired/ratio_mean' else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "fc_readings"))
    p.add_argument("--table", default=None, help="print the table of this finished run and stop")
    p.add_argument("--dataset", default="offline-large")
    p.add_argument("--layers", default="4,7,10,13,16,19,22,25")
    p.add_argument("--steps", type=int, default=2000)
    a, extra = p.parse_known_args(argv)
    if a.table:
        print(table(Path(a.table)))
        return 0
    import train

    batch = 256
    code = train.main(["--dataset", a.dataset, "--layers", a.layers, "--n-latents", "512", "--k", "32",
                       "--sparsity", "batchtopk", "--batch-size", str(batch), "--lr", "1e-3",
                       "--tokens", str(a.steps * batch), "--cache-tokens", "400000", "--eval-tokens", "16384",
                       "--lm-dtype", "bfloat16", "--dead-tokens", "20000", "--eval-every", str(a.steps // 4),
                       "--eval-panel", "4096", "--log-every", "50", "--out", a.out, *DICTS, *extra])
    if code == 0:
        print(table(Path(a.out)))
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The fmxcoders paper's main comparison at its width, on one GPU, in about ten minutes, evaluated there.

    python experiments/paper_gpu.py OUT                          # on the GPU machine (SmolLM2-135M, offline-large)
    python experiments/paper_gpu.py OUT --smoke --model DIR --dataset FILE.u16   # the same steps, tiny, on a CPU

Four dictionaries trained together on one stream of activations (train.py, several --dict: one harvest), each
with its own optimiser, at the papers' recipe (arXiv 2605.09438 pp. 13-14): F 16,384 latents, BatchTopK k 64,
batch 4,096, Adam lr 3e-4 constant, clip 1, context 128, `--time-limit` seconds of training (as many tokens as
fit), streamed (`--cache none`) from the pre-tokenised offline-large corpus (experiments/corpus_large.py):

    crosscoder          the standard crosscoder
    crosscoder+masking  the same with stochastic layer masking p 0.05 (the paper's ablation)
    fmxcoder TR         Tensor Ring ranks 32x32x32, masking 0.05 (the paper's main model)
    fmxcoder CP         CP rank 768 (>= d), masking 0.05 (the paper's appendix)

Layers: SmolLM2-135M blocks 4, 7, 10, ..., 25 (8 of its 30, every third). The papers read 8 of GPT-2's 12
blocks, far apart; SmolLM2's adjacent middle blocks (11-18) are nearly collinear (adjacent centred cosine
0.93-0.95), which leaves a layer-local latent little to be local to, so the window spread over the depth is
the closer analogue.

Then, on the device (nothing paper-sized comes back: a crosscoder is 600 MB), for each dictionary:
  metrics.py --fc-variants   held-out FVU/MSE per layer, L0, dead, FC under every reading, decoder-norm spread
  probe.py --task offline    probe F1 (top-k 1, 2, 5) with 95 % bootstrap intervals on the offline tasks
and from training: curve.jsonl (held-out FVU, dead, FC (all readings) and norm spread at step 0 and every
--eval-every steps), summary.json (tokens reached, tokens/s, time split). Written to OUT/: results.json (one
object: settings, environment, per dictionary the summary, eval and probe), curves.jsonl, and figure.png
when matplotlib is there. Every step prints its command; a failed step is recorded and the next one runs.
The runs go to --runs (default runs/paper_gpu; runs/paper_gpu_smoke with --smoke), which must be new or
empty unless --overwrite: a rehearsal never replaces the real run.

--smoke runs every step at tiny sizes (F 64, k 4, batch 256, CP rank d (F ≥ d/4), 6 s, layers 0-3 of --model) on the
CPU, so that a typo cannot waste the GPU try (tests/test_paper_gpu.py runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS = "4,7,10,13,16,19,22,25"
DICTS = [("crosscoder", ["--dict", "crosscoder"]),
         ("masked", ["--dict", "crosscoder", "--name", "masked", "--mask-prob", "0.05"]),
         ("tr", ["--dict", "fmxcoder", "--name", "tr", "--factorization", "tr", "--rank", "{tr_rank}"]),
         ("cp", ["--dict", "fmxcoder", "--name", "cp", "--factorization", "cp", "--rank", "{cp_rank}"])]
PAPER = {"cp_rank": 768, "n_latents": 16384, "k": 64, "batch": 4096, "seconds": 480, "eval_every": 500, "panel": 8192,
         "eval_tokens": 65536, "probe_train": 600, "probe_test": 300, "bootstrap": 1000, "lm_batch": 256}
SMOKE = {"cp_rank": 64, "n_latents": 64, "k": 4, "batch": 256, "seconds": 6, "eval_every": 4, "panel": 512,
         "eval_tokens": 1024, "probe_train": 16, "probe_test": 8, "bootstrap": 20, "lm_batch": 8}


def fit_to_width(size: dict, d: int, n_layers: int) -> dict:
    """The fmxcoders' ranks (and the width) for an LM of width d read at n_layers layers: CP rank R >= d and TR
    ranks with R1·R2 >= d (below, train.py refuses them: they cannot reconstruct), and F·L >= R (a CP rank is at
    most FL); else the paper's (768; 32x32x32; F 16,384). The smoke's CP rank 64 is raised to d (576 for SmolLM2),
    and its F 64 to d / L (144)."""
    cp = max(size["cp_rank"], d)
    return {"cp_rank": cp, "tr_rank": max(32, math.isqrt(d - 1) + 1), "n_latents": max(size["n_latents"],
                                                                                     -(-cp // n_layers))}


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda)
    return env


def step(name: str, argv: list[str], main, log: list) -> bool:
    """Run one entry point's main(argv), record its exit code and time; an exception is recorded too."""
    print(f"\n== {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    t0 = time.time()
    try:
        code = main(argv)
    except Exception:                     # noqa: BLE001 (recorded; the next step still runs)
        code, err = -1, traceback.format_exc(limit=3)
        print(err, file=sys.stderr)
    log.append({"step": name, "argv": argv, "exit": code, "seconds": round(time.time() - t0, 1)})
    return code == 0


def check_folders(out: Path, runs_dir: Path, overwrite: bool) -> None:
    """Before anything runs: OUT can be written (a folder), and --runs holds no run unless --overwrite (a
    rehearsal must never replace the real run)."""
    from support import cli

    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {str(out)!r} is a file: pass a folder for the results")
    cli.check_writable(out, "the results folder")
    if runs_dir.exists() and (not runs_dir.is_dir() or any(runs_dir.iterdir())) and not overwrite:
        raise ValueError(f"--runs {str(runs_dir)!r} already holds a run: pass --overwrite to replace it, or choose "
                         f"another --runs")


def main(argv=None) -> int:
    from support import cli

    p = cli.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for the small results ($OUT on the GPU machine: what comes back)")
    p.add_argument("--runs", default=None, help="the run folders (GBs at the papers' width: keep them out of OUT; "
                   "default runs/paper_gpu, runs/paper_gpu_smoke with --smoke)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --runs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the rehearsal")
    p.add_argument("--model", default="smollm2-135m", help="the LM (a short name or an HF folder)")
    p.add_argument("--dataset", default="offline-large", help="a pre-tokenised corpus (default offline-large)")
    p.add_argument("--layers", default=None, help=f"default {LAYERS} ({'0-3'!r} with --smoke)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--seconds", type=float, default=None, help="training time (default 480; 6 with --smoke)")
    try:
        a = p.parse_args(argv)
        out, runs_dir = Path(a.out), Path(a.runs or ("runs/paper_gpu_smoke" if a.smoke else "runs/paper_gpu"))
        check_folders(out, runs_dir, a.overwrite)
        import activations
        lm = activations.lm_config(a.model)                        # the config only, no weights
        layers = a.layers or ("0-3" if a.smoke else LAYERS)
        size = {**(SMOKE if a.smoke else PAPER)}
        n_layers = len(activations.parse_layers(layers, lm.num_hidden_layers, True))
        size.update(fit_to_width(size, lm.hidden_size, n_layers))
    except cli.USER_ERRORS as e:
        return cli.cli_error(e)
    from support import evaluate
    import probe
    import train

    device = a.device or ("cpu" if a.smoke else "cuda")
    out.mkdir(parents=True, exist_ok=True)
    seconds = a.seconds if a.seconds is not None else size["seconds"]
    common = ["--model", a.model, "--dataset", a.dataset, "--layers", layers,
              "--n-latents", str(size["n_latents"]), "--k", str(size["k"]), "--sparsity", "batchtopk",
              "--batch-size", str(size["batch"]), "--lr", "3e-4", "--grad-clip", "1", "--context", "128",
              "--dead-tokens", "10000000" if not a.smoke else "1000", "--cache", "none", "--passes", "50",
              "--tokens", str(10 ** 10 // size["batch"] * size["batch"]), "--time-limit", str(seconds),
              "--eval-tokens", str(size["eval_tokens"]), "--eval-every", str(size["eval_every"]),
              "--eval-panel", str(size["panel"]), "--device", device, "--ckpt-every", "0",
              "--harvest-batch", str(size["lm_batch"]), "--log-every", "50" if not a.smoke else "2"]
    if device.startswith("cuda"):
        common += ["--lm-dtype", "bfloat16", "--dtype", "bfloat16"]
    log: list = []
    dicts = [x.format(**size) for _, flags in DICTS for x in flags]
    train_ok = step("train", common + dicts + ["--out", str(runs_dir)] + ["--overwrite"] * a.overwrite, train.main, log)
    results = {"settings": {"size": size, "seconds": seconds, "layers": common[common.index("--layers") + 1],
                            "model": a.model, "dataset": a.dataset, "device": device, "smoke": a.smoke,
                            "dictionaries": {n: d for n, d in DICTS}},
               "environment": environment(), "dictionaries": {}, "log": log}
    curves = []
    for name, _ in DICTS:
        run = runs_dir / name
        entry = results["dictionaries"][name] = {}
        if train_ok:
            step(f"metrics {name}", [str(run), "--device", device, "--fc-variants", "--quiet",
                                     "--eval-tokens", str(size["eval_tokens"])], evaluate.main, log)
            step(f"probe {name}", [str(run), "--task", "offline", "--thorough", "--device", device, "--n-train",
                                   str(size["probe_train"]), "--n-test", str(size["probe_test"]), "--no-full",
                                   "--bootstrap", str(size["bootstrap"]),
                                   "--batch-size", str(size["lm_batch"])], probe.main, log)
        for key, file in (("summary", "summary.json"), ("eval", "eval.json"), ("probe", "probe.json")):
            if (run / file).exists():
                entry[key] = json.loads((run / file).read_text())
        if (run / "curve.jsonl").exists():
            curves += [{"dictionary": name, **json.loads(l)} for l in (run / "curve.jsonl").read_text().splitlines()]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "curves.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curves))
    try:
        figure(curves, out / "figure.png")
    except ImportError:
        print("no matplotlib: no figure (curves.jsonl holds its data)")
    failed = [s["step"] for s in log if s["exit"] != 0]
    print(f"\nwrote {out}/results.json, curves.jsonl" + (f"; failed steps: {failed}" if failed else ""))
    return 1 if failed else 0


def figure(curves: list[dict], path: Path) -> None:
    """FC (main reading), held-out FVU, dead fraction and decoder-norm spread against tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fc_mean", "mean FC"), ("fvu", "held-out FVU"), ("dead_eval", "dead (held out)"),
              ("norm_spread_mean", "decoder-norm spread")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for name in dict.fromkeys(c["dictionary"] for c in curves):
        pts = [(c["tokens"], c["eval"].get("all", {})) for c in curves if c["dictionary"] == name]
        for ax, (key, title) in zip(axes, panels):
            ax.plot([t / 1e6 for t, _ in pts], [e.get(key) for _, e in pts], marker=".", label=name)
            ax.set_title(title)
            ax.set_xlabel("tokens (M)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

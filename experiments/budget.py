"""Where do the papers' claims start to hold? Training to the papers' optimisation budget, with
matched baselines (SmolLM2-135M, CPU-sized widths). One command per experiment, resumable:

    python experiments/budget.py curves      # 1. crosscoder (with and without masking), masked TR and CP fmxcoders, 15k steps
    python experiments/budget.py window      # 2. crosscoder vs masked TR on blocks 4, 7, ..., 25 (spread over the depth)
    python experiments/budget.py matched     # 3. dense crosscoders with the fmxcoders' parameter counts
    python experiments/budget.py auxk        # 4. crosscoder and masked TR without AuxK and with the official weight 1.0
    python experiments/budget.py polysae     # 5. SAE vs PolySAE on block 15, our conventions and the official code's
    python experiments/budget.py seeds       # 6. the main pair (crosscoder, masked TR) at two more seeds
    python experiments/budget.py eval        # metrics.py and probing of every finished run (bootstrap intervals)
    python experiments/budget.py all         # every run above in one queue (in PRIORITY order), then eval
    python experiments/budget.py list        # print the commands, run nothing

Budget. The papers train with Adam at lr 3e-4 for 73k-122k steps (lr x steps of about 22-37); the
first reproduction (experiments/reproduce.sh) had lr x steps of 1.5-3.1. Here the four curve runs
take lr 1e-3 x 15,000 steps = 15 (half to two-thirds of the papers' figure, five to ten times the
first reproduction's: what fitted the session's CPU time), at F 512 latents, k 32, batch 256
(3.8M training tokens, 2 passes over the 1.95M training tokens of the 2M-token cache). The other experiments are shorter (SHORT = 3,000
steps, lr x steps = 3) so that all of them fit in about an hour of a 2-core CPU; the learning
rate is constant, so a short run is exactly the first 3,000 steps of a long one with its flags
and is compared with the curve runs at step 3,000. A run can be extended later: train.py --resume
accepts a larger --tokens when the lr is constant. Every run writes curve.jsonl (train.py
--eval-every 1000): held-out FVU, L0, dead fraction, and for crosscoders the functional coherence
and decoder-norm spread on a fixed panel of 8,192 held-out tokens, at step 0 and every 1,000 steps.

Runs go to runs/budget/<name>/. A finished run is skipped, an interrupted one resumed (train.py
--resume), anything else started afresh; `--jobs N` runs N training processes at once (one thread
each). `python experiments/budget.py eval` (experiments/evaluate_budget.py) probes the finished runs and
writes experiments/budget_curves.png and experiments/results.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from support import runs  # noqa: E402

HOME = Path.home() / ".cache" / "fmxcoders"
CORPUS = HOME / "corpus" / "offline-2m.jsonl"
CACHE = HOME / "acts" / "repro2m-smollm2-L11-18"          # layers 11-18, 2M tokens (also reproduce.sh's)
CACHE_WINDOW = HOME / "acts" / "repro2m-smollm2-L4-25s3"  # layers 4, 7, ..., 25
CACHE_L15 = HOME / "acts" / "repro2m-smollm2-L15"         # layer 15 sliced out of CACHE
OUT = ROOT / "runs" / "budget"

STEPS, SHORT, BATCH = 15_000, 3_000, 256
COMMON = ["--dataset", str(CORPUS), "--cache-tokens", "2000000", "--lm-dtype", "bfloat16", "--eval-tokens", "49152",
          "--batch-size", str(BATCH), "--lr", "1e-3", "--dead-tokens", "20000", "--ckpt-every", "1000",
          "--eval-every", "1000", "--eval-panel", "8192", "--log-every", "100"]
MULTI = ["--n-latents", "512", "--k", "32", "--sparsity", "batchtopk", "--layers", "11-18", "--cache", str(CACHE)]
TR = ["--dict", "fmxcoder", "--factorization", "tr", "--rank", "32"]
CP = ["--dict", "fmxcoder", "--factorization", "cp", "--rank", "576"]
CC = ["--dict", "crosscoder"]
MASK, NOMASK = ["--mask-prob", "0.05"], ["--mask-prob", "0"]


def tokens(steps: int) -> list[str]:
    return ["--tokens", str(steps * BATCH)]


def experiments() -> dict[str, dict[str, list[str]]]:
    """{experiment: {run name: train.py flags}}."""
    full, short = tokens(STEPS), tokens(SHORT)
    window = ["--layers", "4,7,10,13,16,19,22,25", "--cache", str(CACHE_WINDOW)]
    return {
        "curves": {"crosscoder": CC + MULTI + full, "crosscoder_mask": CC + MASK + MULTI + full,
                   "fmx_tr": TR + MASK + MULTI + full, "fmx_cp": CP + MASK + MULTI + full},
        "nomask": {"fmx_tr_nomask": TR + NOMASK + MULTI + short, "fmx_cp_nomask": CP + NOMASK + MULTI + short},
        "window": {"window_crosscoder": CC + MULTI + window + short, "window_fmx_tr": TR + MASK + MULTI + window + short},
        # dense crosscoders with as many weights as the TR (2,244,608) and CP (1,262,592) fmxcoders
        # (fmxcoder.costs): 2 d L F = 9,216 F weights, so F = 244 (2,248,704) and 137 (exactly)
        "matched": {"crosscoder_F244": CC + MULTI + short + ["--n-latents", "244"],
                    "crosscoder_F137": CC + MULTI + short + ["--n-latents", "137"]},
        "auxk": {f"{name}_aux{c}": flags + MULTI + short + ["--aux-coeff", c]
                 for name, flags in (("crosscoder", CC), ("fmx_tr", TR + MASK)) for c in ("0", "1.0")},
        "polysae": {f"{kind}_{conv}": ["--dict", kind, "--layers", "15", "--cache", str(CACHE_L15), "--n-latents", "1024",
                                      "--k", "32", "--sparsity", "topk"] + short + (OFFICIAL[kind] if conv == "official" else [])
                    for kind in ("sae", "polysae") for conv in ("ours", "official")},
        "seeds": {f"{name}_seed{s}": flags + MULTI + short + ["--seed", str(s)]
                  for name, flags in (("crosscoder", CC), ("fmx_tr", TR + MASK)) for s in (1, 2)},
    }


# `all`: one queue, the most informative runs first (a cut-short session still has them)
PRIORITY = ["curves", "matched", "polysae", "window", "auxk", "nomask", "seeds"]


# The official PolySAE code's conventions (SAELens defaults): decoder rows free, initialised at norm 0.1,
# b_dec = 0, AuxK weight 1.0, dead after 1,000 steps (256,000 tokens here); its PolySAE encoder is untied.
OFFICIAL = {"sae": ["--decoder-norm", "free", "--decoder-init-norm", "0.1", "--b-dec-init", "zero",
                    "--aux-coeff", "1.0", "--dead-tokens", str(1000 * BATCH)],
            "polysae": ["--untied-init", "--b-dec-init", "zero", "--aux-coeff", "1.0", "--dead-tokens", str(1000 * BATCH)]}


def run_train(name: str, flags: list[str]) -> tuple[str, int]:
    out = OUT / name
    summary = runs.read_summary(out)
    if summary is not None and summary.get("complete", True) is True:
        return name, 0
    mode = ["--resume"] if (out / "checkpoint.pt").exists() else ["--overwrite"]
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, *flags, "--out", str(out), *mode]
    log = OUT / f"{name}.log"
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    return name, code


def prepare(stage: str) -> None:
    """The caches an experiment reads (each built once; the corpus first)."""
    if not CORPUS.exists():
        subprocess.check_call([sys.executable, str(ROOT / "experiments" / "corpus.py"), str(CORPUS)], cwd=ROOT)
    from support import cache as activation_cache
    common = dict(dataset=str(CORPUS), n_tokens=2_000_000, context=128, batch_size=16, dtype="float16",
                  drop_outliers=10.0, multi=True, lm_dtype="bfloat16")
    activation_cache.build_cache(CACHE, "smollm2-135m", layers="11-18", **common)
    if stage == "window":
        activation_cache.build_cache(CACHE_WINDOW, "smollm2-135m", layers="4,7,10,13,16,19,22,25", **common)
    if stage == "polysae":
        subprocess.check_call([sys.executable, str(ROOT / "experiments" / "slice_cache.py"), str(CACHE),
                               str(CACHE_L15), "15"], cwd=ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*experiments(), "eval", "all", "list"])
    p.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    a = p.parse_args()
    exps = experiments()
    if a.stage == "list":
        for stage, named in exps.items():
            for name, flags in named.items():
                print(f"[{stage}] python train.py {' '.join(COMMON + flags)} --out runs/budget/{name}")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    stages = PRIORITY if a.stage == "all" else [a.stage] if a.stage != "eval" else []
    for stage in stages:
        prepare(stage)
    queue = [(name, flags) for stage in stages for name, flags in exps[stage].items()]
    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as pool:
        for name, code in pool.map(lambda kv: run_train(*kv), queue):
            print(f"{name}: {'done' if code == 0 else f'exit {code}, see {OUT / name}.log'} "
                  f"({(time.time() - t0) / 60:.0f} min)", flush=True)
    if a.stage in ("eval", "all"):
        subprocess.check_call([sys.executable, str(ROOT / "experiments" / "evaluate_budget.py")], cwd=ROOT)


if __name__ == "__main__":
    main()

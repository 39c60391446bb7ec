"""Training throughput of every dictionary at one fixed size: tokens/s, peak memory, and the
achieved fraction of the machine's fp32 matmul peak (measured in the same run).

    python bench/bench_train.py                       # CPU-sized defaults (d 576 = SmolLM2, L 8, F 2048, k 32)
    python bench/bench_train.py --device cuda --n-latents 16384 --k 64 --batch 4096 --steps 50

One training step is what train.py runs per batch: forward with the losses, backward,
`before_step`, gradient clipping (1.0), Adam, `after_step`, and the `.item()` of the loss.
The data are standard-normal tokens (throughput does not depend on them; with the default
`dead_tokens` nothing is dead during a short run, so AuxK never runs — as in the first
10M tokens of a real run).

Analytic FLOPs per step (B tokens; 2 FLOPs per MAC; the backward of a matmul costs twice its
forward, so every weight matmul counts 3 × 2 × MACs = 6 × MACs; the first decoder contraction
reads only the k active latents (sae.sparse_decode), so it costs k rows, not F):
    sae        6 B (d F + k d)
    polysae    6 B (d F + k R1 + d (R1 + R2 + R3))  +  2 F R1² (QR of U after the step)
    crosscoder 6 B (L d F + k L d)  +  2 F L d (decoder norms for the selection score, no grad)
    fmxcoder   6 B (enc_macs + dec_macs_sparse)  +  2 norm_macs_per_batch / norm_every   (fmxcoder.costs;
               the decoder norms of the selection score are refreshed every norm_every = 10 steps)
Adam, clipping, ReLU/top-k and the elementwise losses are not counted (O(params + B F)).
Fraction of peak = (FLOPs / step time) / (best fp32 GFLOP/s of an n × n × n matmul, n = 4096
on CUDA, 2048 on CPU, best of 5, timed at the start of this run).

Peak memory. CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
the memory allocated before the model was built (data included in the baseline). CPU: each
dictionary runs in a fresh child process; peak = resource ru_maxrss (the process's peak RSS)
minus the RSS (psutil) just before the model is built, i.e. the model, optimiser state and
activations of one step, as the OS sees them.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crosscoder  # noqa: E402
import fmxcoder  # noqa: E402
import polysae  # noqa: E402
import sae  # noqa: E402

KINDS = ("sae", "polysae", "crosscoder", "fmxcoder-cp", "fmxcoder-tr")


def build(kind: str, a) -> torch.nn.Module:
    common = dict(d_in=a.d, n_latents=a.n_latents, k=a.k, sparsity=a.sparsity)
    if kind == "sae":
        return sae.SAE(sae.SAEConfig(**common))
    if kind == "polysae":
        return polysae.PolySAE(polysae.PolySAEConfig(**common))
    if kind == "crosscoder":
        return crosscoder.CrossCoder(crosscoder.CrossCoderConfig(**common, n_layers=a.layers))
    fact = kind.split("-")[1]
    rank = a.cp_rank if fact == "cp" else a.tr_rank
    return fmxcoder.FMXCoder(fmxcoder.FMXCoderConfig(**common, n_layers=a.layers, mask_prob=0.05,
                                                     factorization=fact, rank=rank))


def flops_per_step(kind: str, model, a) -> float:
    B, d, F, L, k = a.batch, a.d, a.n_latents, a.layers, a.k
    if kind == "sae":
        return 6 * B * (d * F + k * d)
    if kind == "polysae":
        r1, r2, r3 = model.config.ranks
        return 6 * B * (d * F + k * r1 + d * (r1 + r2 + r3)) + 2 * F * r1 ** 2
    if kind == "crosscoder":
        return 6 * B * (L * d * F + k * L * d) + 2 * F * L * d
    c = fmxcoder.costs(model.config)
    return 6 * B * (c["enc_macs"] + c["dec_macs_sparse"]) + 2 * c["norm_macs_per_batch"] / model.config.norm_every


def matmul_peak(device: torch.device) -> float:
    """Best fp32 GFLOP/s of an n × n × n matmul."""
    n = 4096 if device.type == "cuda" else 2048
    x, y = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        x @ y
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(kind: str, a) -> dict:
    """Warm-up, then a.steps timed training steps; returns the figures of one dictionary."""
    import psutil

    device = torch.device(a.device)
    torch.manual_seed(0)
    shape = (a.batch, a.d) if kind in ("sae", "polysae") else (a.batch, a.layers, a.d)
    xs = [torch.randn(shape, device=device) for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    model = build(kind, a).to(device)
    model.init_b_dec(xs[0], "mean")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step(x):
        return sae.train_step(model, opt, x).loss.item()

    for i in range(a.warmup):
        step(xs[i % 2])
    sync(device)
    t = time.perf_counter()
    for i in range(a.steps):
        step(xs[i % 2])
    sync(device)
    dt = (time.perf_counter() - t) / a.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    n_params = sum(p.numel() for p in model.parameters())
    return {"kind": kind, "step_s": dt, "tok_s": a.batch / dt, "peak_mb": peak / 2**20,
            "params": n_params, "gflop_step": flops_per_step(kind, model, a) / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--d", type=int, default=576, help="model width (576 = SmolLM2-135M)")
    p.add_argument("--layers", type=int, default=8, help="layers L of the crosscoders")
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--sparsity", default="topk", choices=["topk", "batchtopk"])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--cp-rank", type=int, default=576, help="CP rank (>= d)")
    p.add_argument("--tr-rank", type=int, default=32, help="TR rank R1 = R2 = R3 (R1·R2 >= d)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default=",".join(KINDS), help=f"comma list of {KINDS}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared "
                                                          "machine fewer threads than cores avoids spin-wait collapse")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    kinds = a.only.split(",")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"--only must list kinds from {KINDS}, got {kind!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False")
    if a.child:  # one dictionary in a fresh process (CPU peak RSS is per process)
        print(json.dumps(run_one(kinds[0], a)))
        return 0

    device = torch.device(a.device)
    peak = matmul_peak(device)
    print(f"device {a.device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"fp32 matmul peak {peak:,.1f} GFLOP/s; d {a.d}, L {a.layers}, F {a.n_latents}, k {a.k}, "
          f"{a.sparsity}, batch {a.batch}, {a.warmup} warm-up + {a.steps} timed steps")
    rows = []
    for kind in kinds:
        if device.type == "cpu":
            args = [sys.executable, __file__, "--child", "--only", kind] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("only", "child")]
            res = subprocess.run(args, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{kind} failed:\n{res.stderr.strip()}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        else:
            rows.append(run_one(kind, a))
    mem = "peak CUDA MB" if device.type == "cuda" else "peak RSS MB"
    print(f"\n| dictionary | parameters | tokens/s | ms/step | GFLOP/step | GFLOP/s | % of peak | {mem} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gfs = r["gflop_step"] / r["step_s"]
        print(f"| {r['kind']} | {r['params']:,} | {r['tok_s']:,.0f} | {1e3 * r['step_s']:,.0f} | "
              f"{r['gflop_step']:,.1f} | {gfs:,.1f} | {100 * gfs / peak:.0f} % | {r['peak_mb']:,.0f} |")
    by = {r["kind"]: r for r in rows}
    for f in ("fmxcoder-cp", "fmxcoder-tr"):
        if "crosscoder" in by and f in by:
            print(f"{f} vs crosscoder at equal width: {by[f]['tok_s'] / by['crosscoder']['tok_s']:.2f}x the tokens/s, "
                  f"FLOPs/step crosscoder / {f} = {by['crosscoder']['gflop_step'] / by[f]['gflop_step']:.2f}, "
                  f"parameters crosscoder / {f} = {by['crosscoder']['params'] / by[f]['params']:.2f}, "
                  f"peak memory crosscoder / {f} = {by['crosscoder']['peak_mb'] / by[f]['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

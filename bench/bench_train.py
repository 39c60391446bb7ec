"""Training throughput of every dictionary, dense and sparse encoder backward side by side in one
run: tokens/s, ms/step, FLOPs per step, the achieved fraction of the machine's matmul peak
(measured in the same run) for the dense parts, and peak memory.

    python bench/bench_train.py --threads 1           # CPU-sized defaults (d 576 = SmolLM2, L 8, F 2048, k 32)
    python bench/bench_train.py --device cuda --paper # F 16384, k 64, batch 4096, L 8, d 768; fp32 and bf16

One training step is core.train_step, what train.py runs per batch: forward with the losses,
backward, `before_step`, gradient clipping (1.0), Adam with fused=True as train.py builds it (one
kernel; `--adam plain` for torch's default several passes per tensor), `after_step`. Each dictionary runs twice
(`--paths`): with the dense autograd encoder backward, and with the sparse one
(core.SparseEncoderGrad, switched by core.SPARSE_BACKWARD); `*` marks the device's default.
On CUDA each path runs in float32 and under torch.autocast(bfloat16) (`--dtype`). The data are
standard-normal tokens (throughput does not depend on them; with the default `dead_tokens`
nothing is dead during a short run, so AuxK never runs, as in the first 10M tokens of a real run).
The step reads nothing back from the device; the clock stops after a synchronize.

Analytic FLOPs per step (B tokens, 2 FLOPs per MAC). Every encoder ends in one product
pre = h Wᵀ + b with h (B, D), W (F, D): D = d (sae, polysae), L·d (crosscoder), R (fmxcoder CP),
R2·R3 (fmxcoder TR). Its forward costs 2·B·D·F; its backward 4·B·D·F dense, or 4·B·k·D sparse (the
gradients only at the k selected entries of each token). The decoder's first contraction reads only
the k active rows of an X-wide matrix (core.sparse_decode): 6·B·k·X with its backward. The rest are
dense matmuls with their backward, 6 × MACs: the factorised encoder before its last product and the
decoder after its first (fmxcoder.costs), PolySAE's polynomial, plus per step
    polysae     2 F R1²  the QR retraction of U
    crosscoder  2 F L d  decoder norms for the selection score (elementwise, not a matmul)
    fmxcoder    2 norm_macs_per_batch / norm_every   (decoder norms, refreshed every norm_every steps)
Adam, clipping, top-k and the elementwise losses are not counted (O(params + B F)).
"matmul GFLOP" counts the dense matmuls only (what the BLAS runs; the gathers are memory-bound);
"% of peak" = matmul FLOPs / step time / peak, the best n × n × n matmul throughput (n = 4096 on
CUDA, 2048 on CPU, best of 5, timed at the start of this run) in float32 and bfloat16.

Peak memory. CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
the memory allocated before the model was built (data included in the baseline). CPU: each
run is a fresh child process; peak = resource ru_maxrss (the process's peak RSS) minus the RSS
(psutil) just before the model is built, i.e. the model, optimiser state and activations of one
step, as the OS sees them.
"""
from __future__ import annotations

import argparse
import contextlib
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
import core  # noqa: E402
from support import cli  # noqa: E402

KINDS = ("sae", "polysae", "crosscoder", "fmxcoder-cp", "fmxcoder-tr")
PATHS = ("dense", "sparse")
PAPER = {"n_latents": 16384, "k": 64, "batch": 4096, "layers": 8, "d": 768}
CPU_DEFAULTS = {"n_latents": 2048, "k": 32, "batch": 1024, "layers": 8, "d": 576}


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


def flops_per_step(kind: str, model, a, path: str) -> tuple[float, float]:
    """(all counted FLOPs, dense-matmul FLOPs) of one step; see the module docstring."""
    B, d, F, L, k = a.batch, a.d, a.n_latents, a.layers, a.k
    pre = tail = per_step = 0       # per-token MACs before the last encoder product / after the first decode
    per_step_is_matmul = True
    if kind == "sae":
        D = X = d
    elif kind == "polysae":
        r1, r2, r3 = model.config.ranks
        D, X, tail, per_step = d, r1, d * (r1 + r2 + r3), 2 * F * r1 ** 2
    elif kind == "crosscoder":
        D = X = L * d
        per_step, per_step_is_matmul = 2 * F * L * d, False
    else:
        c = fmxcoder.costs(model.config)
        rs = fmxcoder.ranks(model.config)
        D = X = rs[0] if len(rs) == 1 else rs[1] * rs[2]
        pre, tail = c["enc_macs"] - F * D, c["dec_macs_sparse"] - k * X
        per_step = 2 * c["norm_macs_per_batch"] / model.config.norm_every
    enc_fwd, enc_bwd = 2 * B * D * F, (4 * B * D * F if path == "dense" else 4 * B * k * D)
    matmul = enc_fwd + 6 * B * (pre + tail) + (per_step if per_step_is_matmul else 0)
    total = enc_fwd + enc_bwd + 6 * B * (pre + tail) + 6 * B * k * X + per_step
    return total, matmul + (enc_bwd if path == "dense" else 0)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best GFLOP/s of an n × n × n matmul in dtype."""
    n = 4096 if device.type == "cuda" else 2048
    x, y = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
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


def run_one(kind: str, path: str, dtype: str, a) -> dict:
    """Warm-up, then a.steps timed training steps; returns the figures of one dictionary and path."""
    import psutil

    device = torch.device(a.device)
    core.SPARSE_BACKWARD.update({device.type: path == "sparse", f"{device.type}+autocast": path == "sparse"})
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
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=a.adam == "fused")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    model.train()
    for i in range(a.warmup):
        core.train_step(model, opt, xs[i % 2], autocast=autocast)
    sync(device)
    t = time.perf_counter()
    for i in range(a.steps):
        core.train_step(model, opt, xs[i % 2], autocast=autocast)
    sync(device)
    dt = (time.perf_counter() - t) / a.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    total, matmul = flops_per_step(kind, model, a, path)
    return {"kind": kind, "path": path, "dtype": dtype, "step_s": dt, "tok_s": a.batch / dt,
            "peak_mb": peak / 2**20, "params": sum(p.numel() for p in model.parameters()),
            "gflop_step": total / 1e9, "matmul_gflop_step": matmul / 1e9}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--paper", action="store_true", help="the papers' size: F 16384, k 64, batch 4096, L 8, d 768 "
                                                        "(explicit flags still win)")
    p.add_argument("--d", type=int, default=None, help="model width (default 576 = SmolLM2-135M; 768 with --paper)")
    p.add_argument("--layers", type=int, default=None, help="layers L of the crosscoders (default 8)")
    p.add_argument("--n-latents", type=int, default=None, help="F (default 2048; 16384 with --paper)")
    p.add_argument("--k", type=int, default=None, help="default 32; 64 with --paper")
    p.add_argument("--batch", type=int, default=None, help="default 1024; 4096 with --paper")
    p.add_argument("--sparsity", default="topk", choices=["topk", "batchtopk"])
    p.add_argument("--cp-rank", type=int, default=None, help="CP rank (>= d; default d)")
    p.add_argument("--tr-rank", type=int, default=32, help="TR rank R1 = R2 = R3 (R1·R2 >= d)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default=",".join(KINDS), help=f"comma list of {KINDS}")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of dense,sparse (encoder backward)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "both"],
                   help="float32, bfloat16 (torch.autocast) or both; default both on cuda, float32 on cpu")
    p.add_argument("--adam", default="fused", choices=["fused", "plain"],
                   help="torch.optim.Adam with fused=True, as train.py builds it (default), or the plain one")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared "
                                                          "machine fewer threads than cores avoids spin-wait collapse")
    a = p.parse_args(argv)
    for name, value in (PAPER if a.paper else CPU_DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.cp_rank = a.cp_rank or a.d
    a.dtype = a.dtype or ("both" if a.device == "cuda" else "float32")
    for flag, values, allowed in (("--only", a.only, KINDS), ("--paths", a.paths, PATHS)):
        for v in values.split(","):
            if v not in allowed:
                p.error(f"{flag} must list items of {allowed}, got {v!r}")
    try:
        cli.resolve_device(a.device)              # cuda asked for but not there: one line, no traceback
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:  # one dictionary, path and dtype in a fresh process (CPU peak RSS is per process)
        kind, path, dtype = a.child.split(":")
        print(json.dumps(run_one(kind, path, dtype, a)))
        return 0

    device = torch.device(a.device)
    dtypes = ["float32", "bfloat16"] if a.dtype == "both" else [a.dtype]
    peaks = {dt: matmul_peak(device, getattr(torch, dt)) for dt in dtypes}
    default = {}                                  # the device's default path, per dtype (autocast or not)
    for dt in dtypes:
        key = device.type + ("+autocast" if dt == "bfloat16" else "")
        default[dt] = "sparse" if core.SPARSE_BACKWARD.get(key, core.SPARSE_BACKWARD.get(device.type)) else "dense"
    print(f"device {a.device} ({torch.get_num_threads()} threads), torch {torch.__version__}; matmul peak "
          + ", ".join(f"{dt} {v:,.1f} GFLOP/s" for dt, v in peaks.items())
          + f"; d {a.d}, L {a.layers}, F {a.n_latents}, k {a.k}, {a.sparsity}, batch {a.batch}, "
          f"{a.warmup} warm-up + {a.steps} timed steps, {a.adam} Adam; default encoder backward here: "
          + ", ".join(f"{p} ({dt})" for dt, p in default.items()))
    rows = []
    for kind in a.only.split(","):
        for dtype in dtypes:
            for path in a.paths.split(","):
                if device.type == "cpu":
                    args = [sys.executable, __file__, "--child", f"{kind}:{path}:{dtype}"] + [
                        f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                        if k not in ("only", "child", "paper", "paths")]
                    res = subprocess.run(args, capture_output=True, text=True)
                    if res.returncode != 0:
                        sys.exit(f"error: {kind} ({path}, {dtype}) failed:\n{res.stderr.strip()}")
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                else:
                    rows.append(run_one(kind, path, dtype, a))
                print(f"# {kind} {path} {dtype}: {rows[-1]['tok_s']:,.0f} tokens/s", flush=True)
    mem = "peak CUDA MB" if device.type == "cuda" else "peak RSS MB"
    pct = " | ".join(f"% of {dt} peak" for dt in peaks)
    print(f"\n| dictionary | encoder backward | dtype | parameters | tokens/s | ms/step | GFLOP/step | "
          f"matmul GFLOP/step | {pct} | {mem} |")
    print("|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(peaks) + "---:|")
    for r in rows:
        fracs = " | ".join(f"{100 * r['matmul_gflop_step'] / r['step_s'] / v:.0f} %" for v in peaks.values())
        print(f"| {r['kind']} | {r['path']}{' *' if r['path'] == default[r['dtype']] else ''} | {r['dtype']} | {r['params']:,} | "
              f"{r['tok_s']:,.0f} | {1e3 * r['step_s']:,.0f} | {r['gflop_step']:,.1f} | "
              f"{r['matmul_gflop_step']:,.1f} | {fracs} | {r['peak_mb']:,.0f} |")
    by = {(r["kind"], r["path"], r["dtype"]): r for r in rows}
    print()
    for (kind, path, dtype), r in by.items():
        if path == "sparse" and (kind, "dense", dtype) in by:
            dense = by[kind, "dense", dtype]
            print(f"{kind} ({dtype}): sparse / dense backward = {r['tok_s'] / dense['tok_s']:.2f}x the tokens/s, "
                  f"{dense['gflop_step'] / r['gflop_step']:.2f}x fewer FLOPs/step")
    for f in ("fmxcoder-cp", "fmxcoder-tr"):
        for dtype in dtypes:
            cc, fx = by.get(("crosscoder", default[dtype], dtype)), by.get((f, default[dtype], dtype))
            if cc and fx:
                print(f"{f} vs crosscoder at equal width ({default[dtype]} backward, {dtype}): "
                      f"{fx['tok_s'] / cc['tok_s']:.2f}x the tokens/s, FLOPs/step crosscoder / {f} = "
                      f"{cc['gflop_step'] / fx['gflop_step']:.2f}, parameters {cc['params'] / fx['params']:.2f}, "
                      f"peak memory {cc['peak_mb'] / fx['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

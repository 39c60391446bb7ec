"""What the training data path costs per step, as the data grow: the batch order of a cached run
(batches.batch_indices) and the shuffle buffer of a streamed run (activations.ShuffleBuffer), next to
the implementations of an earlier commit, side by side in one run.

    python bench/bench_data.py                        # this checkout only
    python bench/bench_data.py --before 14a29d2       # ... and the code of that commit, loaded from git

batch_indices: mean seconds per step over `--steps` consecutive steps inside an epoch (the steady
state), at each training-region size; and, separately, the once-per-epoch cost (the seeded
permutation, which the current code makes once when an epoch starts, and the old code made every
step), amortised over the epoch's steps at --batch. The cache itself is not read: reading a batch
costs the same whatever the cache size (one random gather of B rows).

ShuffleBuffer: microseconds per served token when `--stream-tokens` tokens arrive in chunks of
`--chunk` tokens (a harvest batch: 16 windows of 128 tokens), at each buffer size, with tokens of
shape (L, d) = (--layers, --d). The old buffer concatenated its whole store for every chunk; it is
measured only up to --max-before tokens (beyond, a single run takes hours).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import activations  # noqa: E402
from support import batches  # noqa: E402


def module_at(rev: str, name: str):
    """Import `name`.py as it was at git revision `rev` (as a separate module)."""
    src = subprocess.run(["git", "show", f"{rev}:{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod                       # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def time_batch_indices(fn, n: int, batch: int, steps: int) -> float:
    fn(1, batch, n, 0)                                    # warm: the epoch's permutation, if cached
    t = time.perf_counter()
    for s in range(1, 1 + steps):
        fn(s, batch, n, 0)
    return (time.perf_counter() - t) / steps


def time_buffer(cls, size: int, n_tokens: int, chunk: int, L: int, d: int, batch: int) -> float:
    x = torch.randn(chunk, L, d)
    chunks = (x for _ in range(n_tokens // chunk))
    t = time.perf_counter()
    served = sum(len(b) for b in cls(chunks, size, batch, seed=0))
    return (time.perf_counter() - t) / served * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=None, help="git revision to compare with (e.g. 14a29d2)")
    p.add_argument("--sizes", default="1000000,10000000,100000000", help="training-region sizes in tokens")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--buffers", default="16384,65536,262144,1048576", help="shuffle-buffer sizes in tokens")
    p.add_argument("--stream-tokens", type=int, default=2_097_152)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--max-before", type=int, default=262144, help="largest buffer the old code is run at")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    old_train = module_at(a.before, "train") if a.before else None
    old_acts = module_at(a.before, "activations") if a.before else None

    print(f"batch order: seconds per step at batch {a.batch} ({a.steps} steps), torch {torch.__version__}, "
          f"{a.threads} thread(s)\n")
    print("| training tokens | now: per step | now: permutation per epoch (amortised per step) |"
          + (" before: per step |" if old_train else ""))
    print("|---:|---:|---:|" + ("---:|" if old_train else ""))
    for n in map(int, a.sizes.split(",")):
        now = time_batch_indices(batches.batch_indices, n, a.batch, a.steps)
        t = time.perf_counter()
        batches.epoch_permutation.__wrapped__(n, 0, 0)
        perm = time.perf_counter() - t
        row = f"| {n:,} | {now * 1e3:.3f} ms | {perm:.2f} s ({perm / (n // a.batch) * 1e3:.3f} ms) |"
        if old_train:
            before = time_batch_indices(old_train.batch_indices, n, a.batch, max(3, a.steps // 50))
            row += f" {before * 1e3:.1f} ms |"
        print(row, flush=True)

    print(f"\nshuffle buffer: µs per served token, max({a.stream_tokens:,}, 8 x buffer) tokens of shape ({a.layers}, "
          f"{a.d}) in chunks of {a.chunk}, batches of {a.batch} (a stream several times the buffer, so that filling\n"
          f"the freshly allocated store, whose pages the OS maps on first touch, and the final drain do not dominate)\n")
    print("| buffer tokens | streamed tokens | now | before |")
    print("|---:|---:|---:|---:|")
    for size in map(int, a.buffers.split(",")):
        n_tok = max(a.stream_tokens, 8 * size)
        now = time_buffer(activations.ShuffleBuffer, size, n_tok, a.chunk, a.layers, a.d, a.batch)
        before = "-"
        if old_acts and size <= a.max_before:
            before = f"{time_buffer(old_acts.ShuffleBuffer, size, n_tok, a.chunk, a.layers, a.d, a.batch):.2f}"
        print(f"| {size:,} | {n_tok:,} | {now:.2f} | {before} |", flush=True)


if __name__ == "__main__":
    main()

"""Where a run's training batches come from: an activation cache, or the LM streaming.

Both give the same `Data` (batches from a step on, held-out reader, sample for b_dec, scales, a
description of the run), so train.py's loop does not know which it has.

  cache (default)  activation_cache.build_cache runs the LM once and keeps the residual stream after
                   the chosen blocks in a float16 memmap (reused by later runs with the same model,
                   layers and data); the LM is loaded only if the cache must be built, and freed
                   right after. The last eval_tokens tokens are held out, never trained on.
                   Step s of epoch e reads the tokens perm_e[s·B : (s+1)·B] of the training region,
                   perm_e a seeded permutation made once per epoch (`batch_indices`: O(B) per step,
                   whatever the cache size), so a run resumed at step s sees exactly the batches it
                   would have.
  --cache none     the LM stays loaded and streams: the first --eval-tokens tokens are held out, the
                   rest goes through a shuffle buffer (activations.ShuffleBuffer). A resumed run
                   replays its (seeded) stream to step s: the LM runs again over the tokens already
                   trained on, without training.

One normalising scale per layer so that E‖s_l x_l‖² = d. `Prefetch` produces the batches in a
background thread, so cache reads or harvesting overlap with training.
"""
from __future__ import annotations

import hashlib
import itertools
import queue
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import torch

import activations
import core
from support import cache as activation_cache
from support import corpora
from support.distributed import Ranks

SAMPLE_TOKENS = 4096          # tokens for the b_dec init (and, streamed, the scale)


def cache_path(cache: str | None, model: str, layers_spec, multi: bool, dataset, context: int, cache_dtype: str,
               drop_outliers: float | None, lm_dtype: str) -> Path | None:
    """--cache: None → the default folder for these settings, "none" → no cache (streaming), else that folder."""
    if cache == "none":
        return None
    return Path(cache) if cache else activation_cache.default_cache_path(
        model, layers_spec, multi, dataset, "train", context, cache_dtype, drop_outliers or None, lm_dtype)


@dataclass
class Data:
    batches: Callable[[int], Iterator[torch.Tensor]]  # batches(s): this rank's raw (B/world, L, d) batches from step s on
    steps: int                                         # optimiser steps planned
    scale_L: torch.Tensor                              # (L,) normalising scale, E‖s_l x_l‖² = d
    sample: torch.Tensor                               # raw (N, L, d) tokens for the b_dec init
    read_eval: Callable[[int, int], torch.Tensor]      # raw held-out tokens [lo, hi) as (n, L, d)
    n_eval: int
    run: dict                                          # saved with the model: hooks, cache, token counts
    identity: dict                                     # kept in checkpoints: what a resumed run must find again


def fingerprint(cache: activation_cache.ActivationCache, n_rows: int = 64) -> str:
    """sha1 of n_rows tokens spread evenly over the cache's view (and of its size): a rebuilt cache whose
    tokens differ changes it, at the cost of reading n_rows rows."""
    idx = torch.linspace(0, cache.n_tokens - 1, min(n_rows, cache.n_tokens)).long()
    h = hashlib.sha1(str(cache.n_tokens).encode())
    h.update(cache.take(idx, as_stored=True).numpy().tobytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def epoch_permutation(n_train: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of the training tokens in one epoch (made once per epoch, int32 when it fits)."""
    dtype = torch.int32 if n_train < 2**31 else torch.int64
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch), dtype=dtype)


def batch_indices(step: int, batch: int, n_train: int, seed: int) -> torch.Tensor:
    """Token indices of step `step`: a slice of its epoch's permutation (cost O(batch) per step)."""
    epoch, i = divmod(step, n_train // batch)
    return epoch_permutation(n_train, seed, epoch)[i * batch:(i + 1) * batch].long()


def open_cache(path: Path, *, model: str, layers: list[int], multi: bool, dataset, context: int, n_tokens: int,
               tokens: int, eval_tokens: int, batch_size: int, seed: int, harvest_batch: int, cache_dtype: str,
               lm_dtype: str, drop_outliers: float | None, ranks: Ranks, device: torch.device) -> Data:
    """The cache at `path` holding `n_tokens` tokens (rank 0 harvests it first if it is missing: the LM is
    loaded for that only, and freed after; the other ranks wait, then open it); `tokens` training tokens
    in batches of `batch_size` from its first n_tokens − eval_tokens, the last eval_tokens held out."""
    build = dict(model_name=model, layers=layers, dataset=dataset, n_tokens=n_tokens, lm_dtype=lm_dtype,
                 context=context, batch_size=harvest_batch, device=device, dtype=cache_dtype,
                 drop_outliers=drop_outliers or None, multi=multi)
    if ranks.main:
        cache = activation_cache.build_cache(path, **build)
    ranks.barrier()
    if not ranks.main:
        cache = activation_cache.build_cache(path, **build)    # complete now: opened, never harvested again
    n_eval, B = eval_tokens, batch_size
    n_train = cache.n_tokens - n_eval
    if n_train < B:
        raise ValueError(f"the cache {str(path)!r} holds {cache.n_tokens:,} tokens: after the {n_eval:,} held out by "
                         f"--eval-tokens, {max(n_train, 0):,} are left, fewer than one batch (--batch-size {B})")
    steps = tokens // B
    if cache.meta.get("exhausted") and steps > n_train // B:
        print(f"warning: the corpus ran out at {cache.n_tokens:,} tokens: training {n_train // B} steps (one pass "
              f"over its {n_train:,} training tokens) instead of the {steps} --tokens asks for", file=sys.stderr)
        steps = n_train // B
    elif steps * B > n_train:
        print(f"warning: --tokens {tokens:,} is {steps * B / n_train:.1f} passes over the cache's {n_train:,} training "
              f"tokens ({cache.n_tokens:,} cached, {n_eval:,} of them held out); --cache-tokens "
              f"{steps * B + n_eval:,} would give one pass", file=sys.stderr)
    pin = device.type == "cuda"

    def batches(start: int):
        for step in range(start, steps):
            idx = batch_indices(step, B, n_train, seed)[ranks.rank::ranks.world]
            yield cache.take(idx, as_stored=True, pin_memory=pin)   # converted to float32 on the device

    identity = {"cache": str(cache.path), "n_tokens": cache.n_tokens, "fingerprint": fingerprint(cache),
                "scale": cache.scale.tolist()}
    run = {"hooks": cache.meta.get("hooks"), "cache": str(cache.path), "train_tokens": n_train, "eval_tokens": n_eval,
           "cache_tokens": cache.n_tokens, "cache_fingerprint": identity["fingerprint"]}   # (heldout.cache_changed)
    return Data(batches, steps, cache.scale, cache.read(0, min(n_train, SAMPLE_TOKENS)),
                lambda lo, hi: cache.read(n_train + lo, n_train + hi), n_eval, run, identity)


def split_stream(chunks, n_first: int):
    """Take the first n_first tokens of an iterator of (N, L, d) chunks; return them and an
    iterator over the rest."""
    first, got, it = [], 0, iter(chunks)
    for x in it:
        first.append(x[:n_first - got])
        got += len(first[-1])
        if got >= n_first:
            rest = x[len(first[-1]):]
            return torch.cat(first), itertools.chain([rest] if len(rest) else [], it)
    raise ValueError(f"the corpus gave only {got:,} tokens, fewer than the {n_first:,} needed to hold out and estimate scales")


def open_stream(*, model: str, layers: list[int], dataset, context: int, tokens: int, eval_tokens: int,
                batch_size: int, seed: int, harvest_batch: int, cache_dtype: str, lm_dtype: str,
                drop_outliers: float | None, passes: int, ranks: Ranks, device: torch.device) -> Data:
    """--cache none: each rank harvests its own documents (r, r + world, ...) with the LM on `device`;
    the first eval_tokens tokens are held out, the next SAMPLE_TOKENS set the scale and b_dec (and are
    trained on), everything after goes through a shuffle buffer on `device`, `passes` times over a
    finite corpus."""
    corpora.check_dataset(dataset, activations.load_tokenizer(model))    # before the LM's weights
    lm, tok = activations.load_lm(model, device=device, dtype=lm_dtype)
    n_eval = eval_tokens

    def one_pass():
        batches = corpora.dataset_batches(tok, dataset, "train", context, harvest_batch, ranks.rank, ranks.world)
        return activations.harvest_batches(lm, batches, layers, device, drop_outliers or None, out_device=device)

    def later_passes():                        # over a finite corpus, skipping the held-out tokens each time
        for _ in range(passes - 1):
            yield from split_stream(one_pass(), n_eval)[1]

    held, rest = split_stream(one_pass(), n_eval + SAMPLE_TOKENS)
    rest = itertools.chain(rest, later_passes())
    sq_L = core.all_reduce(held.double().pow(2).sum(-1).mean(0), "sum") / ranks.world
    scale_L = (held.shape[-1] / sq_L).sqrt().float().cpu()          # the same on every rank
    local_batch, steps = batch_size // ranks.world, tokens // batch_size
    sample = held[n_eval:]
    store_dtype = activations.LM_DTYPES[cache_dtype]

    def batches(start: int):   # resuming replays the (seeded) stream up to `start`
        buffer = activations.ShuffleBuffer(itertools.chain([sample], rest), max(64 * local_batch, 2 ** 16),
                                           local_batch, seed + ranks.rank, store_dtype, device)
        for step, x in enumerate(buffer):
            if step >= steps or len(x) < local_batch:
                return
            if step >= start:
                yield x

    run = {"hooks": [activations.block_paths(lm)[l] for l in layers], "cache": None,
           "train_tokens": tokens, "eval_tokens": n_eval}
    identity = {"cache": None, "scale": scale_L.tolist()}
    return Data(batches, steps, scale_L, sample, lambda lo, hi: held[lo:hi], n_eval, run, identity)


_END = object()


class Prefetch:
    """Iterate `source` in a background thread, `depth` items ahead: the next batches are read from
    the cache (or harvested) while the dictionary trains on this one. `busy` = seconds spent in the
    source, `waited` = seconds the consumer waited for it. Exceptions reach the consumer."""

    def __init__(self, source: Iterator, depth: int = 2, device: torch.device | None = None):
        self.q, self.stop = queue.Queue(depth), threading.Event()
        self.busy = self.waited = 0.0
        self.thread = threading.Thread(target=self._run, args=(source, device), daemon=True)
        self.thread.start()

    def _run(self, source, device) -> None:
        try:
            if device is not None and device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)                  # the current device is per thread
            while not self.stop.is_set():
                t = time.perf_counter()
                item = next(source, _END)
                self.busy += time.perf_counter() - t
                self._put(item)
                if item is _END:
                    return
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, which raises it)
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                return self.q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def next(self):
        """The next item, or None at the end."""
        t = time.perf_counter()
        item = self.q.get()
        self.waited += time.perf_counter() - t
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

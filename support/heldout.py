"""The held-out activations of a trained run, as metrics.py (and anything else evaluating a run) reads them.

A cached run holds out the last eval_tokens tokens of its cache, [train_tokens, train_tokens + eval_tokens):
read from the cache while it holds the tokens the run used (its config.json records the cache's size and
fingerprint: `cache_changed`). Otherwise (a streamed run, a cache deleted or rebuilt since) the held-out text
windows of the run's stream (support/corpora.py heldout_text: the windows after the training tokens, or a
hub dataset's "test" split) are harvested again with the LM, exactly as the harvest reads them.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

import activations
from support import cache as activation_cache
from support.corpora import heldout_text, heldout_windows


def check_held_out(run_dir, run: dict) -> None:
    """ValueError naming the run when it held out no tokens (train.py --eval-tokens 0): every token of its
    data was trained on, so there is nothing to evaluate it on."""
    if "eval_tokens" in run and not run["eval_tokens"] and heldout_text(run, None)[0] != "test":   # (a hub test split)
        raise ValueError(f"{str(run_dir)!r} holds out no tokens: it was trained with --eval-tokens 0, so every token "
                         f"of its data was trained on; train it again with --eval-tokens N (N > 0) to evaluate it")


def cache_changed(run: dict, cache: activation_cache.ActivationCache) -> str | None:
    """How the run's activation cache changed since it was trained (another run rebuilt that folder), or None:
    fewer tokens than the run used, or, for runs that recorded it, other tokens (the fingerprint of the view it
    trained and held out on, support.batches.fingerprint)."""
    from support.batches import fingerprint

    used = run.get("cache_tokens") or int(run.get("train_tokens") or 0) + int(run.get("eval_tokens") or 0)
    if cache.n_tokens < used:
        return f"it holds {cache.n_tokens:,} tokens, the run used {used:,}"
    if run.get("cache_fingerprint") and fingerprint(activation_cache.ActivationCache(cache.path, used)) \
            != run["cache_fingerprint"]:
        return f"its first {used:,} tokens are not those the run used"
    return None


class Held:
    """The held-out activations of a run: raw (B, L_all, d) batches over `layers`."""

    def __init__(self, run: dict, layers: list[int], eval_tokens: int | None, batch_size: int, device, lm_loader):
        self.batch_size, self.device = batch_size, device
        cache_path = run.get("cache")
        self.cache = activation_cache.ActivationCache(cache_path) if cache_path and Path(cache_path, "meta.json").exists() else None
        changed = cache_changed(run, self.cache) if self.cache is not None else None
        if changed:                       # rebuilt by another run: harvest the held-out tokens, as for a stream
            print(f"note: the activation cache {cache_path!r} was rebuilt since this run was trained ({changed}): its "
                  f"held-out tokens are harvested again from the text, as for a streamed run", file=sys.stderr)
            self.cache = None
        if self.cache is not None:
            self.layers = self.cache.layers
            self.start = int(run["train_tokens"])
            n = int(run["eval_tokens"]) if eval_tokens is None else min(eval_tokens, int(run["eval_tokens"]))
            self.stop = min(self.start + n, self.cache.n_tokens)
            self.scale = self.cache.scale
            self.source = f"cache {self.cache.path} tokens [{self.start:,}, {self.stop:,})"
            if run.get("drop_outliers"):
                self.source += " (drop_outliers: the LM-loss windows follow the training tokens only approximately)"
            return
        lm, tok = lm_loader()
        self.layers = sorted(layers)
        split, skip, limit = heldout_text(run, None)
        n = min(eval_tokens or int(run.get("eval_tokens") or 20_000), limit or math.inf)
        chunks, got = [], 0
        for w in heldout_windows(tok, run.get("dataset"), split, run.get("context", 128), skip):
            h = activations.hidden_states(lm, w["input_ids"], w["attention_mask"], self.layers)
            x = h[w["keep"].to(h.device)].float().cpu()
            chunks.append(activations.drop_outlier_tokens(x, run["drop_outliers"]) if run.get("drop_outliers") else x)
            got += len(chunks[-1])
            if got >= n:
                break
        if not chunks:
            raise ValueError(f"no held-out tokens in dataset {run.get('dataset')!r} split {split!r} after "
                             f"skipping {skip:,} tokens")
        self.x = torch.cat(chunks)[:n]
        self.scale = activations.estimate_scale(self.x)
        ds = run.get("dataset") or "bbc"
        where = f"after the first {skip:,} tokens" if skip else "the first tokens"
        self.source = (f"harvested {len(self.x):,} tokens of {ds} split {split} ({where}; "
                       + ("a streamed run" if cache_path is None else f"the cache {cache_path!r} rebuilt since: "
                          f"{changed}" if changed else f"no cache at {cache_path!r}") + ")")

    def batches(self, max_tokens: int | None = None, desc: str | None = None) -> Iterator[Tensor]:
        """Raw (B, L_all, d) batches of the first max_tokens held-out tokens (default all); with `desc`, a
        progress bar of that name."""
        from tqdm import tqdm

        stop = self.stop if self.cache is not None else len(self.x)
        start = self.start if self.cache is not None else 0
        if max_tokens is not None:
            stop = min(stop, start + max_tokens)
        bar = tqdm(total=stop - start, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, disable=desc is None)
        for lo in range(start, stop, self.batch_size):
            hi = min(lo + self.batch_size, stop)
            x = self.cache.read(lo, hi) if self.cache is not None else self.x[lo:hi]
            yield x.to(self.device)
            bar.update(hi - lo)
        bar.close()

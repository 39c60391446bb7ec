"""Harvest throughput against bare forward passes of the language model on the same windows.

    python bench/bench_harvest.py                       # SmolLM2-135M (offline), layers 11-18, CPU
    python bench/bench_harvest.py --device cuda --batches 50 --batch-size 64
    python bench/bench_harvest.py --lm-dtype bfloat16   # the LM in bfloat16 (train.py --lm-dtype)

Three things are timed on the same token windows (BBC news, context 128, `--batch-size` windows
per batch), interleaved batch by batch so a shared machine slows them alike:
  harvest    activations.harvest(...) for the layers (hooks, early stop after the deepest layer,
             special tokens dropped, float32 copy to the CPU; its own tokenisation included)
  full       model(input_ids, attention_mask): every block, the final norm and the LM head
  truncated  the base model with its block list cut after the deepest harvested layer, no hooks:
             the forward pass the early stop needs, the floor for harvesting
tokens/s counts window positions (batch × context, padding included) for all three.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import activations  # noqa: E402
from support import corpora  # noqa: E402


def truncated_forward(model, deepest: int):
    """A function (ids, mask) → last hidden state, running blocks 0..deepest only."""
    paths = activations.block_paths(model)
    parent_path, _ = paths[0].rsplit(".", 1)
    modules = dict(model.named_modules())
    parent_of_list, list_name = parent_path.rsplit(".", 1)
    base, blocks = modules[parent_of_list], modules[parent_path]

    @torch.no_grad()
    def run(ids, mask):
        setattr(base, list_name, nn.ModuleList(list(blocks)[:deepest + 1]))
        try:
            return base(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            setattr(base, list_name, blocks)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=activations.DEFAULT_MODEL)
    p.add_argument("--layers", default=None, help="as train.py --layers; default: 8 middle blocks")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch")
    p.add_argument("--batches", type=int, default=8, help="timed batches (after one warm-up batch)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lm-dtype", default="float32", choices=list(activations.LM_DTYPES), help="LM weights")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared "
                                                          "machine fewer threads than cores avoids spin-wait collapse")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = activations.load_lm(a.model, device=a.device, dtype=a.lm_dtype)
    n_blocks = len(activations.block_paths(model))
    layers = activations.parse_layers(a.layers, n_blocks, multi=True)
    deepest = max(layers)
    texts = list(itertools.islice(corpora.load_texts(None), 400))
    windows = list(itertools.islice(corpora.windows(tok, texts, a.context), (a.batches + 1) * a.batch_size))
    if len(windows) < (a.batches + 1) * a.batch_size:
        raise ValueError(f"only {len(windows)} windows in the first 400 texts, "
                         f"{(a.batches + 1) * a.batch_size} asked for: lower --batches or --batch-size")
    truncated = truncated_forward(model, deepest)
    gen = activations.harvest(model, tok, texts, layers, context=a.context, batch_size=a.batch_size, device=a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    times = {"harvest": 0.0, "full": 0.0, "truncated": 0.0}
    harvested = 0
    for b in range(a.batches + 1):
        batch = corpora.collate(tok, windows[b * a.batch_size:(b + 1) * a.batch_size], a.context)
        ids, mask = batch["input_ids"].to(a.device), batch["attention_mask"].to(a.device)
        runs = {"harvest": lambda: next(gen),
                "full": lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
                "truncated": lambda: truncated(ids, mask)}
        for name, fn in runs.items():
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                out = fn()
            sync()
            if b > 0:
                times[name] += time.perf_counter() - t
                if name == "harvest":
                    harvested += len(out)
    n_tok = a.batches * a.batch_size * a.context
    print(f"{a.model} ({n_blocks} blocks) on {a.device}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads); layers {layers[0]}-{layers[-1]} ({len(layers)}), {a.batches} batches of {a.batch_size} "
          f"windows x {a.context} tokens = {n_tok:,} positions ({harvested:,} harvested after dropping special tokens)")
    print("\n| pass | tokens/s | s/batch | vs full forward |")
    print("|---|---:|---:|---:|")
    labels = {"harvest": f"activations.harvest, layers {layers[0]}-{layers[-1]}",
              "full": "bare model(input_ids), all blocks + LM head",
              "truncated": f"bare forward, blocks 0-{deepest} only"}
    for name, t in times.items():
        print(f"| {labels[name]} | {n_tok / t:,.0f} | {t / a.batches:.3f} | {times['full'] / t:.2f}x |")
    print(f"harvest / truncated forward time: {times['harvest'] / times['truncated']:.2f} "
          f"(1.00 = the early stop costs nothing beyond the forward pass it needs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

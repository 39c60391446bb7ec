"""Harvest throughput against bare forward passes of the language model on the same windows, and against
the FLOP-rate bound of the forward pass the harvest needs.

    python bench/bench_harvest.py                       # SmolLM2-135M (offline), layers 11-18, CPU
    python bench/bench_harvest.py --dataset offline-large --device cuda --lm-dtype bfloat16 --batch-size 256
    python bench/bench_harvest.py --lm-dtype bfloat16   # the LM in bfloat16 (train.py --lm-dtype)

Three things are timed on the same token windows (`--dataset`, context 128, `--batch-size` windows per batch),
interleaved batch by batch so a shared machine slows them alike:
  harvest    activations.harvest_batches over support.corpora.dataset_batches, as train.py harvests: the
             batches built (a text corpus tokenised on the fly, a pre-tokenised one sliced into whole
             windows), hooks, early stop after the deepest harvested layer, special tokens dropped, the
             activations as float32 on the device (train.py --cache none) or copied to the CPU (a cache)
  full       model(input_ids, attention_mask): every block, the final norm and the LM head
  truncated  the base model with its block list cut after the deepest harvested layer, no hooks:
             the forward pass the early stop needs, the floor for harvesting
tokens/s counts window positions (batch × context, padding included) for all three.

The bound: the truncated forward's FLOPs per token, 2 × (the weights of blocks 0..deepest) + the causal
attention's 2 × 2 × (T + 1)/2 × d per block (QKᵀ and AV over the (T + 1)/2 keys a token sees on average),
at the best n × n × n matmul rate of the LM's dtype measured at the start of the run (n 4096 on CUDA, 2048
on a CPU): what no harvest of this model can beat on this machine.
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
from bench_train import matmul_peak  # noqa: E402  (the same measurement as the training benchmark's)
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


def flops_per_token(model, deepest: int, context: int) -> float:
    """2 × the block weights up to `deepest` + causal attention (see the module docstring)."""
    paths = activations.block_paths(model)
    modules = dict(model.named_modules())
    weights = sum(p.numel() for l in range(deepest + 1) for n, p in modules[paths[l]].named_parameters()
                  if p.ndim == 2)
    d = model.config.get_text_config().hidden_size
    return 2 * weights + (deepest + 1) * 4 * (context + 1) / 2 * d


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=activations.DEFAULT_MODEL)
    p.add_argument("--layers", default=None, help="as train.py --layers; default: 8 middle blocks")
    p.add_argument("--dataset", default=None, help="as train.py --dataset (default: the offline BBC news); "
                   "offline-large is pre-tokenised")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch")
    p.add_argument("--batches", type=int, default=8, help="timed batches (after one warm-up batch)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lm-dtype", default="float32", choices=list(activations.LM_DTYPES), help="LM weights")
    p.add_argument("--to-cpu", action="store_true", help="copy the harvest to the CPU (as building a cache does)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared "
                                                          "machine fewer threads than cores avoids spin-wait collapse")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = activations.load_lm(a.model, device=a.device, dtype=a.lm_dtype)
    n_blocks = len(activations.block_paths(model))
    layers = activations.parse_layers(a.layers, n_blocks, multi=True)
    deepest = max(layers)
    need = a.batches + 1
    batches = list(itertools.islice(corpora.dataset_batches(tok, a.dataset, "train", a.context, a.batch_size), need))
    if len(batches) < need or len(batches[-1]["input_ids"]) < a.batch_size:
        raise ValueError(f"the corpus gave fewer than {need} batches of {a.batch_size} windows: lower --batches or "
                         f"--batch-size")
    truncated = truncated_forward(model, deepest)
    fresh = corpora.dataset_batches(tok, a.dataset, "train", a.context, a.batch_size)    # built as it is timed
    gen = activations.harvest_batches(model, fresh, layers, a.device, out_device="cpu" if a.to_cpu else a.device)
    times = {"harvest": 0.0, "full": 0.0, "truncated": 0.0}
    harvested = 0
    for b, batch in enumerate(batches):
        ids, mask = batch["input_ids"].to(a.device), batch["attention_mask"].to(a.device)
        runs = {"harvest": lambda: next(gen),
                "full": lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
                "truncated": lambda: truncated(ids, mask)}
        for name, fn in runs.items():
            sync(a.device)
            t = time.perf_counter()
            with torch.no_grad():
                out = fn()
            sync(a.device)
            if b > 0:
                times[name] += time.perf_counter() - t
                if name == "harvest":
                    harvested += len(out)
    n_tok = a.batches * a.batch_size * a.context
    peak = matmul_peak(torch.device(a.device), activations.LM_DTYPES[a.lm_dtype]) * 1e9     # FLOP/s
    bound = peak / flops_per_token(model, deepest, a.context)
    print(f"{a.model} ({n_blocks} blocks, attention {model.config._attn_implementation}) on {a.device}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), LM {a.lm_dtype}; dataset {a.dataset or 'bbc'}"
          f"{' (pre-tokenised)' if corpora.is_token_corpus(a.dataset) else ''}; layers {layers[0]}-{layers[-1]} "
          f"({len(layers)}), {a.batches} batches of {a.batch_size} windows x {a.context} tokens = {n_tok:,} "
          f"positions ({harvested:,} harvested after dropping special tokens)")
    print(f"bound: {flops_per_token(model, deepest, a.context) / 1e9:.3f} GFLOP per token for blocks 0-{deepest} at "
          f"the measured {a.lm_dtype} matmul peak {peak / 1e12:.2f} TFLOP/s = {bound:,.0f} tokens/s")
    print("\n| pass | tokens/s | s/batch | vs full forward | of the bound |")
    print("|---|---:|---:|---:|---:|")
    labels = {"harvest": f"harvest, layers {layers[0]}-{layers[-1]}" + (" (to the CPU)" if a.to_cpu else ""),
              "full": "bare model(input_ids), all blocks + LM head",
              "truncated": f"bare forward, blocks 0-{deepest} only"}
    for name, t in times.items():
        print(f"| {labels[name]} | {n_tok / t:,.0f} | {t / a.batches:.3f} | {times['full'] / t:.2f}x | "
              f"{n_tok / t / bound:.1%} |")
    print(f"harvest / truncated forward time: {times['harvest'] / times['truncated']:.3f} "
          f"(1.00 = the harvest costs nothing beyond the forward pass it needs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Harvest multi-layer activations from a language model and train any dictionary on them.

    python train.py                                     # offline default: SmolLM2-135M, fmxcoder (TR)
    python train.py --model gpt2 --dict fmxcoder --rank 64
    python train.py --dict sae --layers 10-17           # one TopK SAE per layer (the baseline)
    python train.py --dict crosscoder --mask-prob 0.05  # the "crosscoder + masking" ablation
    python train.py --dict polysae --layers 15 --ranks 576,64,64

Pipeline (each step is a few visible lines below):
  1. activations.build_cache: run the LM once, keep the residual stream after the chosen blocks
     for every non-special token in a memmap cache (reused by later runs with the same model,
     layers, data and size), with one normalising scale per layer so that E‖s_l x_l‖² = d.
     The last `--eval-tokens` tokens are held out for evaluation and never trained on.
  2. Build the dictionary (or one per layer for `--dict sae|polysae` over several layers: the
     per-layer baselines, all trained on the same batches in one pass).
  3. A nanoGPT-style loop: Adam, optional linear warm-up and cosine/linear decay, gradient
     clipping, the dictionary's `before_step`/`after_step` upkeep (decoder-norm projection and
     renormalisation; PolySAE's re-orthonormalisation of U), a tqdm bar with loss, L0, FVU, dead
     fraction and tokens/s, periodic checkpoints that resume exactly (`--resume`), and Ctrl-C
     saves.
  4. `--out` receives config.json + model.safetensors (`layer_<l>/` for per-layer sets), with the
     training config, the run description (model, layers, hook modules, cache) and a metrics
     summary on the held-out tokens. `sae.load_run(out)` loads it back.

Batches: step s of epoch e reads the tokens perm_e[s·B : (s+1)·B] of the training region, where
perm_e is a seeded permutation, so a run resumed at step s sees exactly the batches it would have.

Paper scale (fmxcoders §1.4 / PolySAE §2.2 of ../shared/design/papers.md), on a GPU:
    --model gpt2 --layers 2-9 --n-latents 16384 --k 64 --sparsity batchtopk --batch-size 4096
    --lr 3e-4 --tokens 300000000 --cache none --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import math
import os
import re
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import activations
import metrics
import sae as sae_mod

DICTS = ("sae", "crosscoder", "fmxcoder", "polysae")


@dataclass
class TrainConfig:
    """Every flag of train.py (`--n-latents` sets n_latents, and so on)."""
    model: str = activations.DEFAULT_MODEL  # short name, hub name (gpt2, EleutherAI/pythia-410m-deduped) or folder
    dict: str = "fmxcoder"                  # sae | crosscoder | fmxcoder | polysae
    layers: str | None = None               # "4,5,6,7" or "4-7"; default 8 middle blocks (1 for sae/polysae)
    dataset: str | None = None              # hub dataset, local text files, or None: offline BBC news
    context: int = 128                      # tokens per context window
    n_latents: int = 2048                   # dictionary size F   (paper: 16384)
    k: int = 32                             # active latents per token (paper: 64)
    sparsity: str = "batchtopk"             # topk | batchtopk | relu
    l1_coeff: float = 0.0                   # for --sparsity relu
    aux_coeff: float = 1 / 32               # AuxK weight (0 disables)
    dead_tokens: int = 100_000              # tokens without firing before a latent counts as dead
    mask_prob: float | None = None          # layer masking p; default 0.05 for fmxcoder, 0 otherwise
    norm_every: int | None = None           # crosscoders: refresh the selection's decoder norms every N steps (default 1; fmxcoder 10)
    factorization: str = "tr"               # fmxcoder: cp | tr
    rank: str = "32"                        # fmxcoder rank: "R" or "R1,R2,R3" (TR)
    ranks: str | None = None                # polysae "R1,R2,R3" (default d,64,64)
    order: int = 3                          # polysae polynomial order
    b_dec_init: str = "median"              # median | mean | zero
    tokens: int = 100_000                   # training tokens (paper: 3e8–5e8); ~4 min on 2 CPU cores
    eval_tokens: int = 10_000               # held-out tokens at the end of the cache
    batch_size: int = 512                   # tokens per step (paper: 4096)
    lr: float = 1e-3                        # Adam learning rate (paper: 3e-4 at batch 4096)
    warmup_steps: int = 0
    decay: str = "none"                     # none | cosine | linear (to 0 over the run)
    grad_clip: float = 1.0
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    dtype: str = "float32"                  # float32 | bfloat16 (autocast on CUDA)
    seed: int = 0
    out: str = "runs/latest"
    cache: str | None = None                # activation cache folder (default under ~/.cache/fmxcoders/acts); "none" streams
    cache_dtype: str = "float16"
    cache_tokens: int | None = None         # tokens to harvest into the cache (default tokens + eval-tokens); one big cache can serve many runs
    lm_dtype: str = "float32"               # LM weights when harvesting and evaluating: float32 | bfloat16 | float16
    harvest_batch: int = 16                 # texts per LM forward pass when harvesting
    drop_outliers: float | None = 10.0      # drop tokens whose norm > this × median (attention sinks; 0 keeps all)
    ckpt_every: int = 200                   # steps between resumable checkpoints (0: only at the end)
    resume: bool = False                    # continue from out/checkpoint.pt
    fold_scale: bool = False                # fold the input scale into the weights on export


# ----------------------------------------------------------------------------------------
# CLI derived from the dataclass
# ----------------------------------------------------------------------------------------


def field_help() -> dict[str, str]:
    """The comment after each TrainConfig field, used as its --help text."""
    src = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, flags=re.M))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    hints, helps = typing.get_type_hints(TrainConfig), field_help()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag, typ = "--" + f.name.replace("_", "-"), hints[f.name]
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
            continue
        base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)
        p.add_argument(flag, type=base, default=f.default, help=f"{helps.get(f.name, '')} (default: {f.default})")
    return TrainConfig(**vars(p.parse_args(argv)))


def fail(msg: str) -> typing.NoReturn:
    raise ValueError(msg)


def check_config(cfg: TrainConfig) -> None:
    """Reject bad flags before any expensive work."""
    if cfg.dict not in DICTS:
        fail(f"--dict must be one of {', '.join(DICTS)}, got {cfg.dict!r}")
    if cfg.k >= cfg.n_latents:
        fail(f"--k must be smaller than --n-latents, got k={cfg.k} >= n_latents={cfg.n_latents}")
    for name in ("tokens", "batch_size", "context", "n_latents", "k"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_tokens < 0:
        fail(f"--eval-tokens must be >= 0, got {cfg.eval_tokens}")
    if cfg.decay not in ("none", "cosine", "linear"):
        fail(f"--decay must be none, cosine or linear, got {cfg.decay!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        fail(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.lm_dtype not in activations.LM_DTYPES:
        fail(f"--lm-dtype must be one of {', '.join(activations.LM_DTYPES)}, got {cfg.lm_dtype!r}")
    if cfg.cache_tokens is not None:
        if cfg.cache == "none":
            fail("--cache-tokens sizes the activation cache, but --cache none streams without one")
        if cfg.cache_tokens <= cfg.eval_tokens:
            fail(f"--cache-tokens must exceed --eval-tokens {cfg.eval_tokens} (the held-out end of the cache), "
                 f"got {cfg.cache_tokens}")
    if cfg.mask_prob is not None and not 0 <= cfg.mask_prob < 1:
        fail(f"--mask-prob must be in [0, 1), got {cfg.mask_prob}")
    check_writable(Path(cfg.out))


def check_writable(out: Path) -> None:
    probe = out / f".write-test-{os.getpid()}"  # per process: torchrun ranks check at once
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail(f"--out {str(out)!r} is not writable ({e.strerror or e})")


def int_list(spec: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in str(spec).replace(" ", "").split(",") if v]
    except ValueError:
        fail(f"{flag} must be an integer or comma-separated integers, got {spec!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name!r} requested but CUDA is not available")
    return torch.device(name)


# ----------------------------------------------------------------------------------------
# Building the dictionaries
# ----------------------------------------------------------------------------------------


def dictionary_configs(cfg: TrainConfig, d: int, layers: list[int], scale: list[float]) -> dict:
    """{key: (class, config)}: per-layer sets (sae, polysae) are keyed by layer index, a
    multi-layer model by "all". Building the configs validates every flag (ranks, k, ...),
    so train.py calls this before harvesting anything."""
    common = dict(d_in=d, n_latents=cfg.n_latents, k=cfg.k, sparsity=cfg.sparsity, l1_coeff=cfg.l1_coeff,
                  aux_coeff=cfg.aux_coeff, dead_tokens=cfg.dead_tokens)
    if cfg.dict == "sae":
        return {l: (sae_mod.SAE, sae_mod.SAEConfig(**common, input_scale=[s])) for l, s in zip(layers, scale)}
    if cfg.dict == "polysae":
        import polysae
        extra = {"ranks": int_list(cfg.ranks, "--ranks")} if cfg.ranks else {}
        return {l: (polysae.PolySAE, polysae.PolySAEConfig(**common, input_scale=[s], order=cfg.order, **extra))
                for l, s in zip(layers, scale)}
    mask_prob = cfg.mask_prob if cfg.mask_prob is not None else (0.05 if cfg.dict == "fmxcoder" else 0.0)
    common.update(n_layers=len(layers), mask_prob=mask_prob, input_scale=list(scale))
    if cfg.norm_every is not None:
        common["norm_every"] = cfg.norm_every
    if cfg.dict == "crosscoder":
        import crosscoder
        return {"all": (crosscoder.CrossCoder, crosscoder.CrossCoderConfig(**common))}
    import fmxcoder
    rank = int_list(cfg.rank, "--rank")
    return {"all": (fmxcoder.FMXCoder, fmxcoder.FMXCoderConfig(
        **common, rank=rank[0] if len(rank) == 1 else rank, factorization=cfg.factorization))}


def model_input(key, x_BLD: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """The slice of the (B, L, d) batch a dictionary reads."""
    return x_BLD if key == "all" else x_BLD[:, layers.index(key)]


# ----------------------------------------------------------------------------------------
# Data: deterministic shuffled batches from the cache
# ----------------------------------------------------------------------------------------


def batch_indices(step: int, batch: int, n_train: int, seed: int) -> torch.Tensor:
    """Token indices of step `step`: a slice of the seeded permutation of its epoch."""
    per_epoch = n_train // batch
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch:(i + 1) * batch]


def get_lr(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.decay == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.decay == "linear":
        return cfg.lr * (1 - frac)
    return cfg.lr


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def save_checkpoint(path: Path, models, opts, step: int, cfg: TrainConfig) -> None:
    state = {"models": {str(k): m.state_dict() for k, m in models.items()},
             "opts": {str(k): o.state_dict() for k, o in opts.items()},
             "step": step, "config": dataclasses.asdict(cfg),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path: Path, models, opts, cfg: TrainConfig) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in ("resume", "device", "ckpt_every")}
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved}
    diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now[k]}
    if diff:
        fail(f"cannot resume {str(path)!r}: flags differ from the checkpoint's (saved, now): {diff}")
    for k, m in models.items():
        m.load_state_dict(state["models"][str(k)])
    for k, o in opts.items():
        o.load_state_dict(state["opts"][str(k)])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


# ----------------------------------------------------------------------------------------
# Evaluation summary on held-out tokens
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(models, read, n: int, layers, scale_L1, device, batch: int = 2048) -> dict:
    """FVU, MSE (normalised units), L0 and dead fractions of every model on held-out tokens
    read(lo, hi) -> raw (N, L, d), accumulated with metrics.ReconStats (divided once)."""
    stats = {}
    for key, model in models.items():
        model.eval()
        acc = metrics.ReconStats()
        for lo in range(0, n, batch):
            x = model_input(key, read(lo, min(lo + batch, n)).to(device) * scale_L1, layers)
            acc.update(x, model(x))
        model.train()
        if acc.n:
            ones = torch.ones(len(layers) if key == "all" else 1)   # normalised units throughout
            r = acc.result(ones, ones)
            stats[str(key)] = {"fvu": r["fvu"], "mse": r["mse_norm"], "l0": r["l0"],
                               "dead_eval": r["dead_eval"], "dead_counter": model.dead_fraction()}
    return stats


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


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
    fail(f"the corpus gave only {got:,} tokens, fewer than the {n_first:,} needed to hold out and estimate scales")


def train(cfg: TrainConfig) -> dict:
    check_config(cfg)
    out, device = Path(cfg.out), resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    multi = cfg.dict in ("crosscoder", "fmxcoder")
    streaming = cfg.cache == "none"

    # --- data parallel (torchrun sets WORLD_SIZE/RANK/LOCAL_RANK): rank r trains on rows r::world
    # of every global batch; DDP all-reduces the gradients, sae.py reduces the BatchTopK selection,
    # threshold and dead counters, so every rank holds the same model; rank 0 alone writes.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if cfg.batch_size % world:
            fail(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks {world}")
    main_rank = rank == 0
    local_batch = cfg.batch_size // world

    # 1. the language model's shape, and every dictionary flag checked before any harvesting
    cache_path = None if streaming else Path(cfg.cache) if cfg.cache else None
    lm = tok = None
    if cache_path is not None and (cache_path / "meta.json").exists():
        meta = json.loads((cache_path / "meta.json").read_text())
        d, n_blocks = meta["d"], meta["n_blocks"]
    else:
        lm, tok = activations.load_lm(cfg.model, device=device, dtype=cfg.lm_dtype)
        d, n_blocks = lm.config.get_text_config().hidden_size, len(activations.block_paths(lm))
    layers = activations.parse_layers(cfg.layers, n_blocks, multi)
    dictionary_configs(cfg, d, layers, [1.0] * len(layers))

    # 2. activations: a memmap cache (default), or streamed from the LM through a shuffle buffer
    steps = cfg.tokens // cfg.batch_size
    if not streaming:
        if world > 1 and not main_rank:
            torch.distributed.barrier()      # rank 0 harvests (or checks) the cache first ...
        cache = activations.build_cache(
            cache_path, cfg.model, layers, dataset=cfg.dataset,
            n_tokens=cfg.cache_tokens or cfg.tokens + cfg.eval_tokens, lm_dtype=cfg.lm_dtype,
            context=cfg.context, batch_size=cfg.harvest_batch, device=device, dtype=cfg.cache_dtype,
            drop_outliers=cfg.drop_outliers or None, multi=multi, model=lm, tokenizer=tok)
        if world > 1 and main_rank:
            torch.distributed.barrier()      # ... then the others open the finished cache
        n_eval = min(cfg.eval_tokens, cache.n_tokens // 10)
        n_train = cache.n_tokens - n_eval
        if n_train < cfg.batch_size:
            fail(f"only {n_train:,} training tokens in the cache, fewer than --batch-size {cfg.batch_size}")
        steps = min(steps, n_train // cfg.batch_size) if cache.meta.get("exhausted") else steps
        scale_L = cache.scale
        hooks, cache_dir = cache.meta.get("hooks"), str(cache.path)
        read_eval = lambda lo, hi: cache.read(n_train + lo, n_train + hi)  # noqa: E731
        x0 = cache.read(0, min(n_train, 4096))

        def batches(start: int):
            for step in range(start, steps):
                idx = batch_indices(step, cfg.batch_size, n_train, cfg.seed)[rank::world]
                yield cache.take(idx)
    else:  # every rank harvests its own texts (rank r takes documents r, r + world, ...)
        texts = itertools.islice(activations.load_texts(cfg.dataset), rank, None, world)
        stream = activations.harvest(lm, tok, texts, layers, cfg.context, cfg.harvest_batch, device,
                                     cfg.drop_outliers or None)
        n_eval, n_train = cfg.eval_tokens, cfg.tokens
        held, rest = split_stream(stream, n_eval + 4096)  # held out, then 4,096 for the scale and b_dec
        sq = sae_mod.all_reduce(held.double().pow(2).sum(-1).mean(0).to(device), "sum") / world
        scale_L = (d / sq).sqrt().float().cpu()  # E‖s x‖² = d, the same on every rank
        hooks = [activations.block_paths(lm)[l] for l in layers]
        cache_dir, read_eval, x0 = None, lambda lo, hi: held[lo:hi], held[n_eval:]
        rest = itertools.chain([x0], rest)                # ... which are trained on as well
        buffer_tokens = max(64 * cfg.batch_size, 2 ** 16)

        def batches(start: int):  # resuming replays the (seeded) stream up to `start`
            for step, x in enumerate(activations.ShuffleBuffer(rest, buffer_tokens, local_batch, cfg.seed)):
                if step >= steps or len(x) < local_batch:
                    return
                if step >= start:
                    yield x

    scale = scale_L.tolist()
    scale_L1 = scale_L.to(device)[:, None]

    # 3. dictionaries and optimisers --------------------------------------------------------
    models = {k: cls(c).to(device) for k, (cls, c) in dictionary_configs(cfg, d, layers, scale).items()}
    opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(0.9, 0.999)) for k, m in models.items()}
    # the modules that run forward: DDP wrappers under torchrun (buffers are reduced in sae.py)
    fwd = {k: torch.nn.parallel.DistributedDataParallel(
        m, broadcast_buffers=False, find_unused_parameters=cfg.dict == "polysae" and cfg.order < 3) if world > 1 else m
           for k, m in models.items()}
    ckpt = out / "checkpoint.pt"
    start = 0
    if cfg.resume and ckpt.exists():
        start = load_checkpoint(ckpt, models, opts, cfg)
        if main_rank:
            print(f"resumed from {ckpt} at step {start}")
    else:
        x0 = x0.to(device) * scale_L1
        for key, m in models.items():
            m.init_b_dec(model_input(key, x0, layers), cfg.b_dec_init)

    run = {"dict": cfg.dict, "model": cfg.model, "layers": layers, "hooks": hooks, "dataset": cfg.dataset,
           "context": cfg.context, "cache": cache_dir, "train_tokens": n_train, "eval_tokens": n_eval,
           "drop_outliers": cfg.drop_outliers or None, "lm_dtype": cfg.lm_dtype}
    sizes = {str(k): sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    if main_rank:
        print(f"{cfg.dict} on {cfg.model} layers {layers} (d={d}): {steps} steps of {cfg.batch_size} tokens, "
              f"{sum(sizes.values()):,} parameters on {device}" + (f" x {world} ranks" if world > 1 else ""))
        if hasattr(next(iter(models.values())), "cost_report"):
            print(next(iter(models.values())).cost_report())

    # 4. the loop ---------------------------------------------------------------------------
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    stop_requested = False

    def on_sigint(*_):
        nonlocal stop_requested
        stop_requested = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    bar = tqdm(total=steps, initial=start, desc=cfg.dict, dynamic_ncols=True, disable=not main_rank)
    t0, done = time.time(), start
    try:
        for step, x_raw in enumerate(batches(start), start=start):
            lr = get_lr(step, cfg, steps)
            x = x_raw.to(device, non_blocking=True) * scale_L1
            logs = []
            for key, m in models.items():
                for g in opts[key].param_groups:
                    g["lr"] = lr
                xi = model_input(key, x, layers)
                o = sae_mod.train_step(m, opts[key], xi, cfg.grad_clip, forward=fwd[key], autocast=autocast)
                logs.append((o.loss.item(), (o.latents > 0).float().sum(-1).mean().item(),
                             sae_mod.fvu(xi.float(), o.recon.float()).item(), m.dead_fraction()))
            loss, l0, fvu, dead = (sum(v) / len(v) for v in zip(*logs))
            done = step + 1
            if not math.isfinite(loss):
                fail(f"the loss became {loss} at step {step}: lower --lr or check the activations")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3g}", L0=f"{l0:.1f}", FVU=f"{fvu:.3f}", dead=f"{dead:.2f}",
                            tok_s=f"{(done - start) * cfg.batch_size / (time.time() - t0):,.0f}")
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < steps and main_rank:
                save_checkpoint(ckpt, models, opts, done, cfg)
            if world > 1:  # every rank must stop at the same step
                flag = torch.tensor(float(stop_requested), device=device)
                stop_requested = bool(sae_mod.all_reduce(flag, "max").item())
            if stop_requested:
                if main_rank:
                    print(f"\ninterrupted at step {done}: saving")
                break
    finally:
        bar.close()
        signal.signal(signal.SIGINT, old_handler)
    elapsed = time.time() - t0
    if done < steps and not stop_requested and main_rank:
        print(f"note: the data ran out after {done} of {steps} steps")
    if world > 1:
        fwd.clear()                      # DDP reducers must go before their process group
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if not main_rank:
            return {"steps": done}
    save_checkpoint(ckpt, models, opts, done, cfg)

    # 5. export -----------------------------------------------------------------------------
    metrics = evaluate(models, read_eval, n_eval, layers, scale_L1, device)
    summary = {"steps": done, "tokens": done * cfg.batch_size,
               "tokens_per_s": (done - start) * cfg.batch_size / max(elapsed, 1e-9),
               "parameters": sizes, "eval": metrics}
    for key, m in models.items():
        if cfg.fold_scale:
            m.fold_input_scale()
        extra = {"run": {**run, "layers": layers if key == "all" else [key]},
                 "train": dataclasses.asdict(cfg), "metrics": {**summary, "eval": metrics.get(str(key))}}
        sae_mod.save(m, out if key == "all" else out / f"layer_{key}", extra)
    (out / "summary.json").write_text(json.dumps({"run": run, **summary}, indent=2))
    for key, s in metrics.items():
        name = "all layers" if key == "all" else f"layer {key}"
        print(f"held-out {name}: FVU {s['fvu']:.4f}  MSE {s['mse']:.4g}  L0 {s['l0']:.1f}  dead {s['dead_eval']:.3f}")
    print(f"wrote {out} ({summary['tokens_per_s']:,.0f} tokens/s)")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

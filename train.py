"""Harvest multi-layer activations from a language model and train any dictionary on them.

    python train.py                                     # offline default: SmolLM2-135M, fmxcoder (TR)
    python train.py --model gpt2 --dict fmxcoder --rank 64
    python train.py --dict sae --layers 10-17           # one TopK SAE per layer (the baseline)
    python train.py --dict crosscoder --mask-prob 0.05  # the "crosscoder + masking" ablation
    python train.py --dict polysae --layers 15 --ranks 576,64,64

Pipeline (`train` below reads top to bottom):
  1. Check every flag (`check_config`, then the layers and dictionary configs against the model's
     config or the cache's metadata) before anything expensive; lock the --out folder (runs.py).
  2. Activations (batches.py: `open_cache` or `open_stream`, the same `Data` either way): a float16
     activation cache harvested once and read in seeded per-epoch permutations, or (--cache none)
     the LM streaming through a shuffle buffer; a background thread (`Prefetch`) makes the batches.
  3. The dictionary (or one per layer for --dict sae|polysae over several layers: the per-layer
     baselines, all trained on the same batches in one pass), b_dec from data, optimisers.
  4. A nanoGPT-style loop (`fit`): Adam, optional warm-up and cosine/linear decay, clipping, the
     dictionary's before/after-step upkeep (sae.train_step), a tqdm bar whose loss, L0, FVU, dead
     fraction and tokens/s are read every --log-every steps (the loop's only host-device syncs),
     checkpoints that resume exactly (--resume), Ctrl-C saves.
  5. Export into --out as a whole (runs.RunFolder): config.json + model.safetensors (layer_<l>/ per
     layer for per-layer sets), summary.json (held-out FVU/MSE/L0/dead, timing, "complete"), and
     checkpoint.pt. `runs.load_run(out)` loads it back.

Exact resume: a cached run reads the batches of step s from step s's own permutation slice, a
streamed run replays its seeded stream (batches.py); the masks of a step are seeded from (--seed,
rank, step) (distributed.step_seed), so nothing but the models and optimisers needs saving.
Data parallel (torchrun --nproc_per_node N train.py ...): distributed.py.

Paper scale (fmxcoders arXiv 2605.09438 §4; PolySAE arXiv 2602.01322 §5), on a GPU:
    --model gpt2 --layers 2-9 --n-latents 16384 --k 64 --sparsity batchtopk --batch-size 4096
    --lr 3e-4 --tokens 300000000 --cache none --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
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
import activation_cache
import metrics
import runs
import sae as sae_mod
from batches import Data, Prefetch, cache_path, open_cache, open_stream
from distributed import Ranks, assert_ranks_agree, ddp, setup_ranks, step_seed

DICTS = ("sae", "crosscoder", "fmxcoder", "polysae")
MULTI_LAYER = ("crosscoder", "fmxcoder")   # one model over all --layers (the others: one per layer)


@dataclass
class TrainConfig:
    """Every flag of train.py (`--n-latents` sets n_latents, and so on)."""
    model: str = activations.DEFAULT_MODEL  # short name, hub name (gpt2, EleutherAI/pythia-410m-deduped) or folder
    dictionary: str = "fmxcoder"            # sae | crosscoder | fmxcoder | polysae (flag: --dict)
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
    decoder_norm: str = "unit"              # sae: unit (rows kept at norm 1) | free (SAELens, the PolySAE code's baseline)
    decoder_init_norm: float = 1.0          # sae with --decoder-norm free: row norm at init (SAELens: 0.1)
    untied_init: bool = False               # polysae: W_enc initialised as the official code does (untied)
    tokens: int = 100_000                   # training tokens (paper: 3e8–5e8); ~4 min on 2 CPU cores
    eval_tokens: int = 10_000               # held-out tokens (the end of the cache; the start of a stream)
    batch_size: int = 512                   # tokens per step (paper: 4096)
    lr: float = 1e-3                        # Adam learning rate (paper: 3e-4 at batch 4096)
    warmup_steps: int = 0
    decay: str = "none"                     # none | cosine | linear (to 0 over the run)
    grad_clip: float = 1.0                  # gradient-norm clipping (0: off)
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    dtype: str = "float32"                  # float32 | bfloat16 (autocast)
    seed: int = 0
    out: str = "runs/latest"                # the run folder (refused if it holds another run: see --resume, --overwrite)
    cache: str | None = None                # activation cache folder (default under ~/.cache/fmxcoders/acts); "none" streams
    cache_dtype: str = "float16"            # float16 | float32: cache (and streaming buffer) storage
    passes: int = 1                         # --cache none: passes over a finite corpus (the held-out tokens never trained on)
    cache_tokens: int | None = None         # tokens to harvest into the cache (default tokens + eval-tokens); one big cache can serve many runs
    lm_dtype: str = "float32"               # LM weights when harvesting and evaluating: float32 | bfloat16 | float16
    harvest_batch: int = 16                 # texts per LM forward pass when harvesting
    drop_outliers: float | None = 10.0      # drop tokens whose norm > this × median (attention sinks; 0 keeps all)
    ckpt_every: int = 200                   # steps between resumable checkpoints (0: only at the end)
    log_every: int = 25                     # steps between progress-bar readings of loss, L0, FVU (host syncs)
    eval_every: int = 0                     # steps between held-out evaluations appended to --out/curve.jsonl (0: off)
    eval_panel: int = 8192                  # held-out tokens of those evaluations (FVU, L0, dead; FC for crosscoders)
    resume: bool = False                    # continue the run in --out from its checkpoint.pt
    overwrite: bool = False                 # delete the run already in --out and start a new one
    fold_scale: bool = False                # fold the input scale into the weights on export


# ----------------------------------------------------------------------------------------
# CLI derived from the dataclass, and every check that needs no model
# ----------------------------------------------------------------------------------------


def field_help() -> dict[str, str]:
    """The comment after each TrainConfig field, used as its --help text."""
    src = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, flags=re.M))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    hints, helps = typing.get_type_hints(TrainConfig), field_help()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        name, typ = flag(f.name), hints[f.name]
        if typ is bool:
            p.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=helps.get(f.name))
            continue
        base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)
        p.add_argument(name, dest=f.name, type=base, default=f.default,
                       help=f"{helps.get(f.name, '')} (default: {f.default})")
    return TrainConfig(**vars(p.parse_args(argv)))


def fail(msg: str) -> typing.NoReturn:
    raise ValueError(msg)


FLAG_NAMES = {"dictionary": "dict"}    # the design card's --dict (a field named dict would shadow the builtin)


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


CHOICES = {"dictionary": DICTS, "sparsity": sae_mod.SPARSITIES, "decay": ("none", "cosine", "linear"),
           "decoder_norm": ("unit", "free"),
           "dtype": ("float32", "bfloat16"), "lm_dtype": tuple(activations.LM_DTYPES),
           "cache_dtype": tuple(activation_cache.DTYPES), "b_dec_init": ("median", "mean", "zero"),
           "factorization": ("cp", "tr")}
POSITIVE = ("n_latents", "k", "tokens", "batch_size", "context", "dead_tokens", "harvest_batch", "log_every",
            "eval_panel", "passes")
NON_NEGATIVE = ("eval_tokens", "warmup_steps", "ckpt_every", "eval_every", "l1_coeff", "aux_coeff", "grad_clip")


def check_config(cfg: TrainConfig) -> None:
    """Reject bad flags before any expensive work (the model-dependent checks follow in `train`)."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            fail(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            fail(f"{flag(name)} must be a positive integer, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < 0:
            fail(f"{flag(name)} must be a finite number >= 0, got {v}")
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        fail(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.k >= cfg.n_latents:
        fail(f"--k must be smaller than --n-latents, got k={cfg.k} >= n_latents={cfg.n_latents}")
    if cfg.tokens < cfg.batch_size:
        fail(f"--tokens {cfg.tokens:,} is less than one batch (--batch-size {cfg.batch_size:,}): it would train 0 steps")
    if cfg.context < 2:
        fail(f"--context must be at least 2 (BOS + one token), got {cfg.context}")
    if cfg.mask_prob is not None and not 0 <= cfg.mask_prob < 1:
        fail(f"--mask-prob must be in [0, 1), got {cfg.mask_prob}")
    if cfg.norm_every is not None and cfg.norm_every < 1:
        fail(f"--norm-every must be a positive integer, got {cfg.norm_every}")
    if cfg.order not in (1, 2, 3):
        fail(f"--order must be 1, 2 or 3, got {cfg.order}")
    if cfg.drop_outliers is not None and not (cfg.drop_outliers == 0 or 1 < cfg.drop_outliers < math.inf):
        fail(f"--drop-outliers must be 0 (keep all tokens) or a multiple of the median norm > 1, got {cfg.drop_outliers}")
    if cfg.passes > 1 and cfg.cache != "none":
        fail(f"--passes {cfg.passes} repeats a streamed corpus (--cache none); a cached run already draws "
             f"--tokens from its cache in as many epochs as it takes")
    if cfg.cache_tokens is not None:
        if cfg.cache == "none":
            fail("--cache-tokens sizes the activation cache, but --cache none streams without one")
        if cfg.cache_tokens <= cfg.eval_tokens:
            fail(f"--cache-tokens must exceed --eval-tokens {cfg.eval_tokens} (the held-out end of the cache), "
                 f"got {cfg.cache_tokens}")
    runs.resolve_device(cfg.device)
    int_list(cfg.rank, "--rank")
    if cfg.ranks is not None:
        int_list(cfg.ranks, "--ranks")
    if cfg.resume and cfg.overwrite:
        fail("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    runs.check_writable(Path(cfg.out))


def int_list(spec: str, name: str) -> list[int]:
    try:
        return [int(v) for v in str(spec).replace(" ", "").split(",") if v]
    except ValueError:
        fail(f"{name} must be an integer or comma-separated integers, got {spec!r}")


# ----------------------------------------------------------------------------------------
# The model's shape (without its weights) and the dictionaries
# ----------------------------------------------------------------------------------------


def model_shape(cfg: TrainConfig, multi: bool) -> tuple[int, int]:
    """(d, number of blocks), from an existing cache's metadata or the model's config (no weights);
    checks --context against the model's maximum positions."""
    path = cache_path(cfg, multi)
    if path is not None and (path / "meta.json").exists():
        meta = activation_cache.read_meta(path)            # a damaged cache fails here, naming the folder
        return meta["d"], meta["n_blocks"]
    config = activations.lm_config(cfg.model)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos is not None and cfg.context > max_pos:
        fail(f"--context {cfg.context} exceeds the {max_pos} positions of model {cfg.model!r}")
    return config.hidden_size, config.num_hidden_layers


def dictionary_configs(cfg: TrainConfig, d: int, layers: list[int], scale: list[float]) -> dict:
    """{key: (class, config)}: per-layer sets (sae, polysae) are keyed by layer index, a
    multi-layer model by "all". Building the configs validates every flag (ranks, k, ...),
    so train.py calls this before harvesting anything."""
    common = dict(d_in=d, n_latents=cfg.n_latents, k=cfg.k, sparsity=cfg.sparsity, l1_coeff=cfg.l1_coeff,
                  aux_coeff=cfg.aux_coeff, dead_tokens=cfg.dead_tokens)
    if cfg.dictionary != "sae" and (cfg.decoder_norm, cfg.decoder_init_norm) != ("unit", 1.0):
        fail(f"--decoder-norm and --decoder-init-norm apply to --dict sae, not {cfg.dictionary}")
    if cfg.dictionary != "polysae" and cfg.untied_init:
        fail(f"--untied-init applies to --dict polysae, not {cfg.dictionary}")
    if cfg.dictionary == "sae":
        norms = dict(decoder_norm=cfg.decoder_norm, decoder_init_norm=cfg.decoder_init_norm)
        return {l: (sae_mod.SAE, sae_mod.SAEConfig(**common, **norms, input_scale=[s])) for l, s in zip(layers, scale)}
    if cfg.dictionary == "polysae":
        import polysae
        if cfg.ranks is None and d > cfg.n_latents:
            fail(f"--dict polysae: the default --ranks {d},64,64 (R1 = d) needs R1 <= --n-latents {cfg.n_latents}; "
                 f"pass --ranks {cfg.n_latents},64,64 or more latents")
        extra = {"ranks": int_list(cfg.ranks, "--ranks")} if cfg.ranks else {}
        return {l: (polysae.PolySAE, polysae.PolySAEConfig(**common, input_scale=[s], order=cfg.order,
                                                                untied_init=cfg.untied_init, **extra))
                for l, s in zip(layers, scale)}
    mask_prob = cfg.mask_prob if cfg.mask_prob is not None else (0.05 if cfg.dictionary == "fmxcoder" else 0.0)
    common.update(n_layers=len(layers), mask_prob=mask_prob, input_scale=list(scale))
    if cfg.norm_every is not None:
        common["norm_every"] = cfg.norm_every
    if cfg.dictionary == "crosscoder":
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
# The loop
# ----------------------------------------------------------------------------------------


def get_lr(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.decay == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.decay == "linear":
        return cfg.lr * (1 - frac)
    return cfg.lr


class Logs:
    """Loss, L0 and FVU summed on the device every step; read (one sync) every --log-every steps."""

    def __init__(self, horizon_tokens: int):
        self.sums, self.n, self.horizon = None, 0, horizon_tokens

    def add(self, out: sae_mod.Output, x: torch.Tensor) -> None:
        """One model's step (no sync: the sums stay on the device)."""
        v = torch.stack([out.loss.detach().float(), (out.latents > 0).float().sum(-1).mean(),
                         sae_mod.fvu(x.float(), out.recon.detach().float())])
        self.sums = v if self.sums is None else self.sums + v
        self.n += 1

    def read(self, models: dict, step: int) -> dict:
        loss, l0, fvu = (self.sums / self.n).tolist()          # means over steps and models
        if not math.isfinite(loss):
            fail(f"the loss became {loss} by step {step}: lower --lr or check the activations")
        self.sums, self.n = None, 0
        dead = sum(m.dead_fraction() for m in models.values()) / len(models)
        for m in models.values():       # while the host waits anyway: how many latents AuxK may need
            sae_mod.refresh_dead_mirror(m, self.horizon)
        return {"loss": f"{loss:.3g}", "L0": f"{l0:.1f}", "FVU": f"{fvu:.3f}", "dead": f"{dead:.2f}"}


class StopOnSigint:
    """Ctrl-C sets `requested`; the loop ends after the current step and saves."""

    def __enter__(self):
        self.requested = False
        self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)


def fit(cfg, models, opts, fwd, data: Data, start: int, layers, device, ranks: Ranks, folder) -> dict:
    """Train from step `start` to data.steps (or until Ctrl-C, or the data run out on any rank)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    scale_L1 = data.scale_L.to(device)[:, None]
    feed = Prefetch(data.batches(start), device=device)
    bar = tqdm(total=data.steps, initial=start, desc=cfg.dictionary, dynamic_ncols=True, disable=not ranks.main)
    logs, done, t0 = Logs(cfg.log_every * cfg.batch_size), start, time.perf_counter()
    if start % cfg.log_every == 0:      # as at every log reading: a resumed run refreshes where the first run did
        for m in models.values():
            sae_mod.refresh_dead_mirror(m, cfg.log_every * cfg.batch_size)
    interrupted = exhausted = False
    if cfg.eval_every and start == 0 and ranks.main:
        folder.append_curve({"step": 0, "tokens": 0, "eval": evaluate(models, data, layers, device, cfg.eval_panel)})
    with StopOnSigint() as sigint:
        try:
            for step in range(start, data.steps):
                x_raw = feed.next()
                exhausted, interrupted = ranks.any(x_raw is None, sigint.requested)
                if exhausted or interrupted:
                    break
                torch.manual_seed(step_seed(cfg.seed, ranks.rank, step))
                lr = get_lr(step, cfg, data.steps)
                x = x_raw.to(device, non_blocking=True).float() * scale_L1
                for key, m in models.items():
                    for g in opts[key].param_groups:
                        g["lr"] = lr
                    xi = model_input(key, x, layers)
                    out = sae_mod.train_step(m, opts[key], xi, cfg.grad_clip, forward=fwd[key], autocast=autocast)
                    logs.add(out, xi)
                done = step + 1
                bar.update(1)
                if done % cfg.log_every == 0 or done == data.steps:
                    tok_s = (done - start) * cfg.batch_size / (time.perf_counter() - t0)
                    bar.set_postfix(**logs.read(models, done), tok_s=f"{tok_s:,.0f}")
                if cfg.eval_every and done % cfg.eval_every == 0 and ranks.main:
                    folder.append_curve({"step": done, "tokens": done * cfg.batch_size,
                                         "eval": evaluate(models, data, layers, device, cfg.eval_panel)})
                if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < data.steps and ranks.main:
                    folder.save_checkpoint(runs.checkpoint_state(models, opts, done, cfg))
        finally:
            feed.close()
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"steps": done, "steps_planned": data.steps, "interrupted": interrupted,
            "data_exhausted": exhausted and not interrupted,
            "tokens_per_s": (done - start) * cfg.batch_size / max(seconds, 1e-9),
            "time": {"loop_s": seconds, "data_s": feed.busy, "waited_for_data_s": feed.waited}}


@torch.no_grad()
def evaluate(models, data: Data, layers, device, n_tokens: int | None = None, batch: int = 2048) -> dict:
    """FVU, MSE (normalised units), L0 and dead fractions of every model on the first n_tokens
    held-out tokens (default all), accumulated with metrics.ReconStats (divided once); with
    n_tokens (the --eval-every panel) also the functional coherence and decoder-norm spread of
    multi-layer dictionaries (metrics.functional_coherence)."""
    stats, scale_L1 = {}, data.scale_L.to(device)[:, None]
    n = data.n_eval if n_tokens is None else min(n_tokens, data.n_eval)
    panel = lambda key: (model_input(key, data.read_eval(lo, min(lo + batch, n)).to(device).float() * scale_L1,
                                     layers) for lo in range(0, n, batch))
    for key, model in models.items():
        model.eval()
        acc = metrics.ReconStats()
        for x in panel(key):
            acc.update(x, model(x))
        if acc.n:
            ones = torch.ones(len(layers) if key == "all" else 1)   # normalised units throughout
            r = acc.result(ones, ones)
            stats[str(key)] = {"fvu": r["fvu"], "mse": r["mse_norm"], "l0": r["l0"],
                               "dead_eval": r["dead_eval"], "dead_counter": model.dead_fraction()}
            if n_tokens is not None and key == "all":
                fc = metrics.functional_coherence(model, panel(key))
                stats[str(key)].update({k: fc[k] for k in ("fc_mean", "fc_median", "fc_frac_ge2", "fc_latents",
                                                           "norm_spread_mean", "norm_spread_mean_all")})
        model.train()
    return stats


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def export(folder: runs.RunFolder, models: dict, cfg: TrainConfig, run: dict, summary: dict) -> None:
    """Write every dictionary and summary.json into a fresh folder that replaces --out as a whole."""
    with folder.export() as new:
        for key, m in models.items():
            if cfg.fold_scale:
                m.fold_input_scale()
            extra = {"run": {**run, "layers": run["layers"] if key == "all" else [key]},
                     "train": dataclasses.asdict(cfg), "metrics": {**summary, "eval": summary["eval"].get(str(key))}}
            sae_mod.save(m, new if key == "all" else new / f"layer_{key}", extra)
        sae_mod.write_atomic(new / "summary.json", json.dumps({"run": run, **summary}, indent=2))


def train(cfg: TrainConfig) -> dict:
    """Check, harvest or stream, train, evaluate, export; returns the summary (see the module docstring)."""
    check_config(cfg)
    device = runs.resolve_device(cfg.device)
    multi, streaming = cfg.dictionary in MULTI_LAYER, cfg.cache == "none"
    d, n_blocks = model_shape(cfg, multi)
    layers = activations.parse_layers(cfg.layers, n_blocks, multi)
    dictionary_configs(cfg, d, layers, [1.0] * len(layers))          # every dictionary flag, before any work
    ranks, device = setup_ranks(cfg.batch_size, device)
    folder = runs.RunFolder(cfg.out, cfg.resume, cfg.overwrite) if ranks.main else None
    try:
        with folder or contextlib.nullcontext():
            return _train(cfg, device, layers, d, multi, streaming, ranks, folder)
    finally:
        if ranks.owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg, device, layers, d, multi, streaming, ranks: Ranks, folder) -> dict:
    finished = runs.read_summary(cfg.out) if cfg.resume else None
    if finished is not None and finished.get("complete"):
        if ranks.main:
            print(f"{cfg.out} already finished its {finished['steps']} steps: nothing to resume")
        return finished
    torch.manual_seed(cfg.seed)
    t_setup = time.perf_counter()
    data = open_stream(cfg, layers, ranks, device) if streaming else open_cache(cfg, layers, multi, ranks, device)
    models = {k: cls(c).to(device) for k, (cls, c) in dictionary_configs(cfg, d, layers, data.scale_L.tolist()).items()}
    # fused Adam: one kernel per step, and its step count stays on the device (the plain one reads it back)
    opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True) for k, m in models.items()}
    start = 0
    if cfg.resume:   # every rank reads the checkpoint (rank 0 checked that it exists)
        start = runs.load_checkpoint(Path(cfg.out) / "checkpoint.pt", models, opts, cfg)
        if ranks.main:
            folder.truncate_curve(start)
            print(f"resumed from {cfg.out}/checkpoint.pt at step {start}")
    else:
        x0 = data.sample.to(device).float() * data.scale_L.to(device)[:, None]
        for key, m in models.items():
            m.init_b_dec(model_input(key, x0, layers), cfg.b_dec_init)
    ranks.broadcast(models)     # after init/resume: every rank starts from rank 0's model
    fwd = {k: ddp(m, find_unused_parameters=cfg.dictionary == "polysae" and cfg.order < 3) if ranks.world > 1 else m
           for k, m in models.items()}
    run = {"dict": cfg.dictionary, "model": cfg.model, "layers": layers, "dataset": cfg.dataset, "context": cfg.context,
           "drop_outliers": cfg.drop_outliers or None, "lm_dtype": cfg.lm_dtype, **data.run}
    sizes = {str(k): sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    if ranks.main:
        print(f"{cfg.dictionary} on {cfg.model} layers {layers} (d={d}): {data.steps} steps of {cfg.batch_size} tokens, "
              f"{sum(sizes.values()):,} parameters on {device}" + (f" x {ranks.world} ranks" if ranks.world > 1 else ""))
        if hasattr(next(iter(models.values())), "cost_report"):
            print(next(iter(models.values())).cost_report())
    setup_s = time.perf_counter() - t_setup

    result = fit(cfg, models, opts, fwd, data, start, layers, device, ranks, folder)
    fwd.clear()                                            # DDP reducers go before their process group
    assert_ranks_agree(models, ranks)
    if not ranks.main:
        return result
    folder.save_checkpoint(runs.checkpoint_state(models, opts, result["steps"], cfg))
    summary = {**result, "complete": not result["interrupted"], "tokens": result["steps"] * cfg.batch_size,
               "parameters": sizes, "eval": evaluate(models, data, layers, device)}
    summary["time"]["setup_s"] = setup_s
    export(folder, models, cfg, run, summary)
    if result["interrupted"]:
        print(f"\ninterrupted at step {result['steps']} of {result['steps_planned']}: saved {cfg.out} (incomplete; "
              f"continue with the same flags and --resume)")
    elif result["data_exhausted"]:
        print(f"note: the data ran out after {result['steps']} of {result['steps_planned']} steps")
    for key, s in summary["eval"].items():
        name = "all layers" if key == "all" else f"layer {key}"
        print(f"held-out {name}: FVU {s['fvu']:.4f}  MSE {s['mse']:.4g}  L0 {s['l0']:.1f}  dead {s['dead_eval']:.3f}")
    t = summary["time"]
    print(f"wrote {cfg.out} ({summary['tokens_per_s']:,.0f} tokens/s; {t['loop_s']:.0f} s training, of which "
          f"{t['waited_for_data_s']:.0f} s waiting for data; data produced in {t['data_s']:.0f} s beside it)")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        summary = train(parse_args(argv))
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())

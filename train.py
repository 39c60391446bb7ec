"""Harvest multi-layer activations from a language model and train any dictionaries on them.

    python train.py                                     # offline default: SmolLM2-135M, fmxcoder (TR)
    python train.py --model gpt2 --dict fmxcoder --rank 64
    python train.py --dict sae --layers 10-17           # one TopK SAE per layer (the baseline)
    python train.py --dict crosscoder --mask-prob 0.05  # the "crosscoder + masking" ablation
    python train.py --dict polysae --layers 15 --ranks 576,64,64
    python train.py --k 64 --dict crosscoder --dict crosscoder --mask-prob 0.05 --name masked \\
                    --dict fmxcoder --dict fmxcoder --factorization cp --rank 576 --out runs/cmp

Flags. Run flags (model, data, optimisation, --out) are TrainConfig's. Each `--dict KIND` starts a
dictionary; the dictionary flags after it are fields of that kind's config class (sae.SAEConfig,
crosscoder.CrossCoderConfig, fmxcoder.FMXCoderConfig, polysae.PolySAEConfig: their defaults and checks),
and `--name` names it (default: the kind, then kind-2, ...). Dictionary flags before the first --dict apply
to every dictionary that has them. `--dict a,b` is `--dict a --dict b`; `--dict KIND --help` lists KIND's
options. Several dictionaries train on the same batches of one harvest, each with its own optimiser, and
each is exported to --out/<name>/ (one dictionary: --out itself).

Pipeline (`train` reads top to bottom):
  1. Check every flag, then the dictionaries' configs against the model's config or the cache's metadata,
     before anything expensive; lock --out (support/runs.py).
  2. Activations (support/batches.py, the same `Data` either way): a float16 cache harvested once and read
     in seeded per-epoch permutations, or (--cache none) the LM streaming through a shuffle buffer; a
     background thread (`Prefetch`) makes the batches.
  3. The dictionaries (sae / polysae over several layers: one per layer, the per-layer baseline), b_dec from
     data, fused Adam per model.
  4. The loop (`fit`): warm-up and cosine/linear decay, core.train_step (forward with the losses, backward,
     the model's upkeep, clipping), a tqdm bar of loss, L0, FVU, dead fraction and tokens/s read every
     --log-every steps (the loop's only host-device syncs), checkpoints that resume exactly, Ctrl-C saves.
  5. Export into --out as a whole (runs.RunFolder): config.json + model.safetensors (layer_<l>/ per layer),
     summary.json (held-out FVU/MSE/L0/dead, timing, "complete"), checkpoint.pt. support.saved.load_run
     loads it back.

Exact resume: a cached run reads step s's batch from step s's own permutation slice, a streamed run replays
its seeded stream; the masks of a step are seeded from (--seed, rank, step), so the models and optimisers
are all a checkpoint holds (with the data's identity: a cache rebuilt since is refused). Each dictionary of
a set is initialised from --seed and draws its masks from the step's seed, exactly as if trained alone. Data parallel: torchrun --nproc_per_node N train.py ... (support/distributed.py).

Paper scale (fmxcoders arXiv 2605.09438 pp. 13-14; PolySAE arXiv 2602.01322, its README's commands), GPU:
    --model gpt2 --layers 2-9 --n-latents 16384 --k 64 --sparsity batchtopk --batch-size 4096
    --lr 3e-4 --tokens 3e8 --cache none --device cuda --dead-tokens 10000000
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import activations
import core
import metrics
from core import opt
from support import cache as activation_cache
from support import cli, notes, progress, runs, saved, tracking
from support.batches import Data, Prefetch, cache_path, open_cache, open_stream
from support.distributed import Ranks, assert_ranks_agree, ddp, setup_ranks, step_seed


# ----------------------------------------------------------------------------------------
# Config: the run flags (TrainConfig) and, per --dict, the dictionary's own (its kind's config)
# ----------------------------------------------------------------------------------------


DEFAULT_DICT = "fmxcoder"


@dataclass
class TrainConfig:
    """The run flags of train.py (the dictionary flags are the dictionary configs' fields)."""
    model: str = opt(activations.DEFAULT_MODEL, "short name, hub name (gpt2, EleutherAI/pythia-410m-deduped) or folder")
    layers: str | None = opt(None, "4,5,6,7 or 4-7; default 8 middle blocks (1 for sae/polysae alone)")
    dataset: str | None = opt(None, "hub dataset, local text files, or none: the offline BBC news")
    context: int = opt(128, "tokens per context window")
    b_dec_init: str = opt("median", "median | mean | zero")
    tokens: int = opt(100_000, "training tokens (paper: 3e8-5e8); ~1 min on 2 CPU cores by default")
    eval_tokens: int = opt(10_000, "held-out tokens (the end of the cache; the start of a stream)")
    batch_size: int = opt(512, "tokens per step (paper: 4096)")
    lr: float = opt(1e-3, "Adam learning rate (paper: 3e-4 at batch 4096)")
    warmup_steps: int = opt(0, "linear warm-up steps")
    decay: str = opt("none", "none | cosine | linear (to 0 over the run)")
    grad_clip: float = opt(1.0, "gradient-norm clipping (0: off)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = opt("float32", "float32 | bfloat16 (autocast)")
    seed: int = opt(0, "seed of the init, the batch order and the masks")
    out: str = opt("runs/latest", "the run folder (refused if it holds another run: see --resume, --overwrite)")
    cache: str | None = opt(None, "activation cache folder (default under ~/.cache/fmxcoders/acts); none streams")
    cache_dtype: str = opt("float16", "float16 | float32: cache (and streaming buffer) storage")
    passes: int = opt(1, "--cache none: passes over a finite corpus (the held-out tokens never trained on)")
    cache_tokens: int | None = opt(None, "tokens to harvest into the cache (default tokens + eval-tokens)")
    lm_dtype: str = opt("float32", "LM weights when harvesting and evaluating: float32 | bfloat16 | float16")
    harvest_batch: int | None = opt(None, "context windows per LM forward pass when harvesting (default 16 on a "
                                          "CPU, 256 on a GPU)")
    drop_outliers: float | None = opt(activations.DROP_OUTLIERS, "drop tokens whose norm > this x median (attention "
                                                                 "sinks; 0 keeps all)")
    ckpt_every: int = opt(200, "steps between resumable checkpoints (0: only at the end)")
    log_every: int = opt(25, "steps between progress-bar readings of loss, L0, FVU (host syncs)")
    eval_every: int = opt(0, "steps between held-out evaluations appended to --out/curve.jsonl (0: off)")
    eval_panel: int = opt(8192, "held-out tokens of those evaluations (FVU, L0, dead; FC for crosscoders)")
    resume: bool = opt(False, "continue the run in --out from its checkpoint.pt")
    overwrite: bool = opt(False, "delete the run already in --out and start a new one")
    fold_scale: bool = opt(False, "fold the input scale into the weights on export")
    time_limit: float = opt(0.0, "seconds of training after which the run ends, complete, at the step it reached "
                                 "(0: none; a budget for a lent GPU; at least one step is trained)")
    wandb: str | None = opt(None, "W&B project: log the config, the bar's figures per dictionary, the --eval-every "
                                  "curve and the summary (support/tracking.py; needs pip install wandb)")
    # [{"kind", "name", "options"}], one per --dict (its flags); not a flag itself
    dictionaries: list[dict] = field(default_factory=lambda: [{"kind": DEFAULT_DICT, "name": DEFAULT_DICT, "options": {}}])

    def check(self, name=str) -> None:
        """Everything that needs no model (the dictionaries' configs are checked once d is known)."""
        choices = {"decay": ("none", "cosine", "linear"), "dtype": ("float32", "bfloat16"),
                   "lm_dtype": tuple(activations.LM_DTYPES), "cache_dtype": ("float16", "float32"),
                   "b_dec_init": ("median", "mean", "zero")}
        for f, allowed in choices.items():
            if getattr(self, f) not in allowed:
                raise ValueError(f"{name(f)} must be one of {', '.join(allowed)}, got {getattr(self, f)!r}")
        for f in ("tokens", "batch_size", "context", "harvest_batch", "log_every", "eval_panel", "passes"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"{name(f)} must be a positive integer, got {getattr(self, f)}")
        for f in ("eval_tokens", "warmup_steps", "ckpt_every", "eval_every", "grad_clip", "time_limit"):
            if not math.isfinite(getattr(self, f)) or getattr(self, f) < 0:
                raise ValueError(f"{name(f)} must be a finite number >= 0, got {getattr(self, f)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"{name('lr')} must be a finite number > 0, got {self.lr}")
        if self.tokens < self.batch_size:
            raise ValueError(f"{name('tokens')} {self.tokens:,} is less than one batch ({name('batch_size')} "
                             f"{self.batch_size:,}): it would train 0 steps")
        if self.context < 2:
            raise ValueError(f"{name('context')} must be at least 2 (BOS + one token), got {self.context}")
        if self.drop_outliers is not None and not (self.drop_outliers == 0 or 1 < self.drop_outliers < math.inf):
            raise ValueError(f"{name('drop_outliers')} must be 0 (keep all tokens) or a multiple of the median norm > 1, "
                             f"got {self.drop_outliers}")
        if self.passes > 1 and self.cache != "none":
            raise ValueError(f"{name('passes')} {self.passes} repeats a streamed corpus ({name('cache')} none); a cached "
                             f"run already draws {name('tokens')} from its cache in as many epochs as it takes")
        if self.cache_tokens is not None:
            if self.cache == "none":
                raise ValueError(f"{name('cache_tokens')} sizes the activation cache, but {name('cache')} none streams")
            if self.cache_tokens <= self.eval_tokens:
                raise ValueError(f"{name('cache_tokens')} must exceed {name('eval_tokens')} {self.eval_tokens} (the "
                                 f"held-out end of the cache), got {self.cache_tokens}")
        if self.resume and self.overwrite:
            raise ValueError(f"{name('resume')} continues the run in {name('out')} and {name('overwrite')} deletes it: "
                             f"pass one of them")
        cli.resolve_device(self.device)
        runs.check_out(self.out)
        cli.check_writable(Path(self.out), "the run folder")
        if self.cache not in (None, "none"):
            activation_cache.check_folder(Path(self.cache))
        if self.wandb:
            tracking.require(name("wandb"))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line: the run flags, and one dictionary per --dict with its own flags
    (the grammar: support/cli.py parse_dicts); ValueError for a bad flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    run, specs = cli.parse_dicts(argv, TrainConfig, saved.KINDS, lambda kind: saved.kind_classes(kind)[1],
                                 DEFAULT_DICT, __doc__)
    runs.check_member_names([s["name"] for s in specs])
    return cli.build(TrainConfig, **run, dictionaries=specs)


# ----------------------------------------------------------------------------------------
# Data: the model's shape (without its weights), then the activations, cached or streamed
# ----------------------------------------------------------------------------------------


def multi_layer(cfg: TrainConfig) -> bool:
    """Does any dictionary read several layers at once? (Then the default layers are 8 middle blocks.)"""
    return any("n_layers" in {f.name for f in dataclasses.fields(saved.kind_classes(s["kind"])[1])}
               for s in cfg.dictionaries)


def cache_folder(cfg: TrainConfig) -> Path | None:
    return cache_path(cfg.cache, cfg.model, cfg.layers, multi_layer(cfg), cfg.dataset, cfg.context, cfg.cache_dtype,
                      cfg.drop_outliers, cfg.lm_dtype)


def model_shape(cfg: TrainConfig) -> tuple[int, int]:
    """(d, number of blocks), from an existing cache's metadata or the model's config (no weights);
    checks --context against the model's maximum positions."""
    path = cache_folder(cfg)
    if path is not None and (path / "meta.json").exists():
        from support.cache import read_meta
        meta = read_meta(path)                              # a damaged cache fails here, naming the folder
        return meta["d"], meta["n_blocks"]
    config = activations.lm_config(cfg.model)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos is not None and cfg.context > max_pos:
        raise ValueError(f"--context {cfg.context} exceeds the {max_pos} positions of model {cfg.model!r}")
    return config.hidden_size, config.num_hidden_layers


def open_data(cfg: TrainConfig, layers, ranks: Ranks, device) -> Data:
    """The activations of `layers` (support/batches.py): the cache (harvested once) read in seeded
    permutations, or (--cache none) the LM streaming through a shuffle buffer."""
    common = dict(model=cfg.model, layers=layers, dataset=cfg.dataset, context=cfg.context, tokens=cfg.tokens,
                  eval_tokens=cfg.eval_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                  harvest_batch=cfg.harvest_batch or (256 if device.type == "cuda" else 16),
                  cache_dtype=cfg.cache_dtype, lm_dtype=cfg.lm_dtype, drop_outliers=cfg.drop_outliers, ranks=ranks,
                  device=device)
    if cfg.cache == "none":
        return open_stream(**common, passes=cfg.passes)
    return open_cache(cache_folder(cfg), **common, multi=multi_layer(cfg),
                      n_tokens=cfg.cache_tokens or cfg.tokens + cfg.eval_tokens)


# ----------------------------------------------------------------------------------------
# The dictionaries: one config each (checked before anything expensive), the models' keys
# ----------------------------------------------------------------------------------------


def dictionary_configs(cfg: TrainConfig, d: int, layers: list[int]) -> dict:
    """{(name, "all" | layer): (class, config)}: a multi-layer dictionary reads every layer, a single-layer
    one is trained once per layer. Building the configs checks every dictionary flag (cli.build: the
    messages name the flags), so train builds them once, before harvesting anything; their input_scale
    (ones here) comes from the data (`set_input_scale`)."""
    out = {}
    for spec in cfg.dictionaries:
        if spec["options"].get("sparsity") in core.INFERENCE_ONLY:
            raise ValueError(f"--sparsity {core.inference_only(spec['options']['sparsity'])}; train with --sparsity "
                             f"{' | '.join(core.SPARSITIES)}")
        cls, config_cls = saved.kind_classes(spec["kind"])
        if "n_layers" in {f.name for f in dataclasses.fields(config_cls)}:
            out[(spec["name"], "all")] = (cls, cli.build(config_cls, d_in=d, n_layers=len(layers), **spec["options"]))
        else:
            for l in layers:
                out[(spec["name"], l)] = (cls, cli.build(config_cls, d_in=d, **spec["options"]))
    return out


def state_bytes(configs: dict) -> tuple[int, int, int]:
    """(checkpoint.pt, exported weights, training memory) in bytes of dictionary_configs' dictionaries, from
    models built on the meta device (nothing allocated): a checkpoint holds every state dict and Adam's two
    moments per parameter; training also holds the gradients."""
    weights = params = 0
    for cls, c in configs.values():
        with torch.device("meta"):
            m = cls(c)
        weights += runs.tensor_bytes(m.state_dict())
        params += sum(p.numel() * p.element_size() for p in m.parameters())
    return weights + 2 * params, weights, weights + 3 * params


def set_input_scale(configs: dict, layers: list[int], scale: list[float]) -> None:
    """Each config's input_scale from the data's per-layer scale s_l (x_model = s_l · x_raw): every layer's
    for a multi-layer dictionary, its own layer's for a per-layer one. Before any model is built."""
    for (_, layer), (_, c) in configs.items():
        c.input_scale = [float(s) for s in scale] if layer == "all" else [float(scale[layers.index(layer)])]


def model_input(key, x_BLD: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """The slice of the (B, L, d) batch the dictionary of `key` = (name, "all" | layer) reads."""
    return x_BLD if key[1] == "all" else x_BLD[:, layers.index(key[1])]


def key_str(key, single: bool) -> str:
    """How a model is named in checkpoints and curves: "all" / "<layer>", or "<name>/…" in a set."""
    return str(key[1]) if single else f"{key[0]}/{key[1]}"


def key_names(cfg: TrainConfig):
    """key → key_str for this run's dictionaries."""
    single = len(cfg.dictionaries) == 1
    return lambda key: key_str(key, single)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(models, data: Data, layers, device, n_tokens: int | None = None, batch: int = 2048) -> dict:
    """{key_str: FVU, MSE (normalised units), L0, dead fractions} on the first n_tokens held-out tokens
    (default all), accumulated with metrics.ReconStats (divided once); with n_tokens (the --eval-every
    panel) also the functional coherence and decoder-norm spread of multi-layer dictionaries."""
    stats, scale_L1 = {}, data.scale_L.to(device)[:, None]
    n = data.n_eval if n_tokens is None else min(n_tokens, data.n_eval)
    single = len({name for name, _ in models}) == 1
    panel = lambda key: (model_input(key, data.read_eval(lo, min(lo + batch, n)).to(device).float() * scale_L1,  # noqa: E731
                                     layers) for lo in range(0, n, batch))
    for key, model in models.items():
        model.eval()
        acc = metrics.ReconStats()
        for x in panel(key):
            acc.update(x, model(x))
        if acc.n:
            ones = torch.ones(len(layers) if key[1] == "all" else 1)   # normalised units throughout
            r = acc.result(ones, ones)
            s = stats[key_str(key, single)] = {"fvu": r["fvu"], "mse": r["mse_norm"], "l0": r["l0"],
                                               "dead_eval": r["dead_eval"], "dead_counter": core.dead_fraction(model)}
            if n_tokens is not None and key[1] == "all":
                fc = metrics.functional_coherence(model, panel(key), variants=True)
                s.update({k: fc[k] for k in ("fc_mean", "fc_median", "fc_frac_ge2", "fc_latents",
                                             "norm_spread_mean", "norm_spread_mean_all", "fc_readings")})
        model.train()
    return stats


def get_lr(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.decay == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.decay == "linear":
        return cfg.lr * (1 - frac)
    return cfg.lr


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
    names = ",".join(s["name"] for s in cfg.dictionaries)
    bar = tqdm(total=data.steps, initial=start, desc=names, dynamic_ncols=True, disable=not ranks.main)
    logs, done, t0 = progress.Logs(cfg.log_every * cfg.batch_size), start, time.perf_counter()
    if start % cfg.log_every == 0:      # as at every log reading: a resumed run refreshes where the first run did
        for m in models.values():
            m.dead.refresh(m.tokens_since_fired, m.config.dead_tokens, cfg.log_every * cfg.batch_size)
    interrupted = exhausted = out_of_time = False
    if cfg.eval_every and start == 0 and ranks.main:
        folder.append_curve({"step": 0, "tokens": 0, "eval": evaluate(models, data, layers, device, cfg.eval_panel)})
    with StopOnSigint() as sigint:
        try:
            for step in range(start, data.steps):
                x_raw = feed.next()
                late = cfg.time_limit > 0 and step > start and time.perf_counter() - t0 > cfg.time_limit
                exhausted, interrupted, out_of_time = ranks.any(x_raw is None, sigint.requested, late)
                if exhausted or interrupted or out_of_time:
                    break
                lr = get_lr(step, cfg, data.steps)
                x = x_raw.to(device, non_blocking=True).float() * scale_L1
                for key, m in models.items():
                    torch.manual_seed(step_seed(cfg.seed, ranks.rank, step))   # each model's masks as if alone
                    for g in opts[key].param_groups:
                        g["lr"] = lr
                    xi = model_input(key, x, layers)
                    # forward with the losses, backward, the model's upkeep, clipping, the optimiser step
                    out = core.train_step(m, opts[key], xi, cfg.grad_clip, forward=fwd[key], autocast=autocast)
                    logs.add(key, out, xi)             # device-side sums, read on the host every --log-every steps
                done = step + 1
                bar.update(1)
                if done % cfg.log_every == 0 or done == data.steps:
                    tok_s = (done - start) * cfg.batch_size / (time.perf_counter() - t0)
                    figures = logs.read(models, done)          # per dictionary name
                    bar.set_postfix(progress.postfix(figures, tok_s))
                    if folder is not None and folder.tracker:
                        folder.tracker.log(done, figures, tok_s)
                if cfg.eval_every and done % cfg.eval_every == 0 and ranks.main:
                    folder.append_curve({"step": done, "tokens": done * cfg.batch_size,
                                         "eval": evaluate(models, data, layers, device, cfg.eval_panel)})
                if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < data.steps and ranks.main:
                    folder.save_checkpoint(runs.checkpoint_state(models, opts, done, cfg, key_names(cfg), data.identity))
        finally:
            feed.close()
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"steps": done, "steps_planned": data.steps, "interrupted": interrupted,
            "data_exhausted": exhausted and not interrupted, "time_limit_reached": out_of_time and not interrupted,
            "tokens_per_s": (done - start) * cfg.batch_size / max(seconds, 1e-9),
            "time": {"loop_s": seconds, "data_s": feed.busy, "waited_for_data_s": feed.waited}}


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------


def export(folder: runs.RunFolder, models: dict, cfg: TrainConfig, run: dict, summary: dict) -> None:
    """Every dictionary, its summary.json and curve into a fresh folder that replaces --out as a whole:
    one dictionary in --out itself, several in --out/<name>/ (and the set's summary.json in --out)."""
    single = len(cfg.dictionaries) == 1
    with folder.export() as new:
        for spec in cfg.dictionaries:
            base = new if single else new / spec["name"]
            keys = [k for k in models if k[0] == spec["name"]]
            ev = {str(k[1]): summary["eval"].get(key_str(k, single)) for k in keys}
            info = {**run, "dict": spec["kind"], "name": spec["name"]}
            for key in keys:
                m = models[key]
                if cfg.fold_scale:
                    m.fold_input_scale()
                extra = {"run": {**info, "layers": run["layers"] if key[1] == "all" else [key[1]]},
                         "train": dataclasses.asdict(cfg), "metrics": {**summary, "eval": ev[str(key[1])]}}
                saved.save(m, base if key[1] == "all" else base / f"layer_{key[1]}", extra)
            own = {**summary, "eval": ev, "parameters": {str(k[1]): summary["parameters"][key_str(k, single)]
                                                          for k in keys}}
            runs.write_json(base / "summary.json", {"run": info, **own})
            if not single:
                folder.split_curve(base / "curve.jsonl", spec["name"])
        if not single:
            runs.write_json(new / "summary.json", {"run": run, "dictionaries": [s["name"] for s in cfg.dictionaries],
                                                   **summary})


# ----------------------------------------------------------------------------------------
# The run: check, data, dictionaries, loop, export (train), and the command line
# ----------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Check, harvest or stream, train, evaluate, export; returns the summary (see the module docstring)."""
    cfg.check(cli.flag)
    device = cli.resolve_device(cfg.device)
    d, n_blocks = model_shape(cfg)
    layers = activations.parse_layers(cfg.layers, n_blocks, multi_layer(cfg))
    configs = dictionary_configs(cfg, d, layers)     # checks every dictionary flag
    ckpt, weights, memory = state_bytes(configs)
    ranks, device = setup_ranks(cfg.batch_size, device)
    cli.check_memory(device, memory, "the dictionaries (weights, gradients and Adam's two moments)",
                     "lower --n-latents, or train fewer dictionaries at once")
    folder = runs.RunFolder(cfg.out, cfg.resume, cfg.overwrite) if ranks.main else None
    try:
        with folder or contextlib.nullcontext():
            if folder:                           # before the harvest: what the run will write must fit
                folder.check_space(ckpt, weights, 0 < cfg.ckpt_every < cfg.tokens // cfg.batch_size)
            return _train(cfg, device, layers, d, configs, ranks, folder)
    finally:
        if ranks.owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, device, layers, d, configs: dict, ranks: Ranks, folder) -> dict:
    names = key_names(cfg)
    state = None
    if cfg.resume:            # the flags are compared with the checkpoint's, whether the run finished or not
        state = runs.read_checkpoint(Path(cfg.out) / "checkpoint.pt", cfg)
        finished = runs.read_summary(cfg.out)
        if finished is not None and saved.marked_complete(finished):
            if ranks.main:
                print(f"{cfg.out} already finished its {finished['steps']} steps with these flags: nothing to resume")
            return finished
    torch.manual_seed(cfg.seed)
    t_setup = time.perf_counter()
    data = open_data(cfg, layers, ranks, device)
    if state is not None:
        runs.check_data(state, data, Path(cfg.out))
    set_input_scale(configs, layers, data.scale_L.tolist())
    models = {}
    for k, (cls, c) in configs.items():
        if k[1] in ("all", layers[0]):
            torch.manual_seed(cfg.seed)        # each dictionary (a per-layer set: its first) initialised as if alone
        models[k] = cls(c).to(device)
    # fused Adam: one kernel per step, and its step count stays on the device (the plain one reads it back)
    opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True) for k, m in models.items()}
    start = 0
    if cfg.resume:   # every rank reads the checkpoint (rank 0 checked that it exists)
        start = runs.restore(state, models, opts, names)
        if ranks.main:
            folder.saved_step, folder.fvu_start = start, state.get("fvu_start")
            folder.truncate_curve(start)
            print(f"resumed from {cfg.out}/checkpoint.pt at step {start}")
    else:
        x0 = data.sample.to(device).float() * data.scale_L.to(device)[:, None]
        for key, m in models.items():
            m.init_b_dec(model_input(key, x0, layers), cfg.b_dec_init)
        if ranks.main:                          # where each started: a run that ends worse has diverged
            folder.fvu_start = {k: s["fvu"] for k, s in evaluate(models, data, layers, device).items()}
    ranks.broadcast(models)     # after init/resume: every rank starts from rank 0's model
    fwd = {k: ddp(m, find_unused_parameters=getattr(m.config, "order", 3) < 3) if ranks.world > 1 else m
           for k, m in models.items()}
    run = {"model": cfg.model, "layers": layers, "dataset": cfg.dataset, "context": cfg.context,
           "drop_outliers": cfg.drop_outliers or None, "lm_dtype": cfg.lm_dtype, **data.run}
    sizes = {names(k): sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    if ranks.main:
        kinds = ", ".join(f"{s['name']} ({s['kind']})" if s["name"] != s["kind"] else s["kind"] for s in cfg.dictionaries)
        print(f"{kinds} on {cfg.model} layers {layers} (d={d}): {data.steps} steps of {cfg.batch_size} tokens, "
              f"{sum(sizes.values()):,} parameters on {device}" + (f" x {ranks.world} ranks" if ranks.world > 1 else ""))
        for m in models.values():
            if hasattr(m, "cost_report"):
                print(m.cost_report())
    if ranks.main and cfg.wandb:            # the W&B run (--resume: the same one), closed with the folder
        folder.tracker = tracking.Tracker(cfg.wandb, folder.path, {"train": dataclasses.asdict(cfg), "dictionaries": {
            names(k): dataclasses.asdict(m.config) for k, m in models.items()}}, cfg.resume)
    setup_s = time.perf_counter() - t_setup

    result = fit(cfg, models, opts, fwd, data, start, layers, device, ranks, folder)
    fwd.clear()                                            # DDP reducers go before their process group
    assert_ranks_agree({names(k): m for k, m in models.items()}, ranks)
    if not ranks.main:
        return result
    try:                                      # a (second) Ctrl-C while saving: say what is saved
        folder.save_checkpoint(runs.checkpoint_state(models, opts, result["steps"], cfg, names, data.identity))
        summary = {**result, "complete": not result["interrupted"], "tokens": result["steps"] * cfg.batch_size,
                   "parameters": sizes, "eval": evaluate(models, data, layers, device)}
        summary["time"]["setup_s"] = setup_s
        summary["fvu_start"] = folder.fvu_start
        failed = None if result["interrupted"] else runs.failure(summary)
        if failed:                            # saved (nothing is lost) but marked: the evaluators refuse it
            summary.update(complete=False, failed=failed)
        export(folder, models, cfg, run, summary)
        if folder.tracker:
            folder.tracker.summary(summary)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted while saving: {folder.saved_note(result['steps_planned'])}") from None
    if result["interrupted"]:
        print(f"\ninterrupted at step {result['steps']} of {result['steps_planned']}: saved {cfg.out} (incomplete; "
              f"continue with the same flags and --resume)")
    elif result["data_exhausted"]:
        print(f"note: the data ran out after {result['steps']} of {result['steps_planned']} steps")
    elif result["time_limit_reached"]:
        print(f"note: --time-limit {cfg.time_limit:g} s reached after {result['steps']} of {result['steps_planned']} steps")
    for key, s in summary["eval"].items():
        where = "all layers" if key.endswith("all") else f"layer {key.rsplit('/', 1)[-1]}"
        who = "" if len(cfg.dictionaries) == 1 else f"{key.rsplit('/', 1)[0]} "
        print(f"held-out {who}{where}: FVU {s['fvu']:.4f}  MSE {s['mse']:.4g}  L0 {s['l0']:.1f}  dead {s['dead_eval']:.3f}")
    l0s = {k[0]: [] for k in models}
    for k in models:
        l0s[k[0]].append((summary["eval"].get(names(k)) or {}).get("l0"))
    for line in [] if result["interrupted"] else notes.run_notes(summary["tokens"], summary["steps"],
                                                                 {k[0]: m.config for k, m in models.items()}, l0s):
        print(line)
    t = summary["time"]
    print(f"wrote {cfg.out} ({summary['tokens_per_s']:,.0f} tokens/s; {t['loop_s']:.0f} s training, of which "
          f"{t['waited_for_data_s']:.0f} s waiting for data; data produced in {t['data_s']:.0f} s beside it)")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except cli.USER_ERRORS as e:
        return cli.cli_error(e)
    except KeyboardInterrupt as e:      # Ctrl-C before the loop (which saves instead), or while saving
        print("\n" + (str(e) or "interrupted before training started: nothing was saved (a partial cache is removed)"),
              file=sys.stderr)
        return 130
    if summary.get("failed"):           # saved, marked incomplete: a run of no use never looks like a result
        return cli.cli_error(ValueError(f"the run in {cfg.out!r} failed: {summary['failed']} (it is saved, "
                                        f"marked incomplete)"), code=1)
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())

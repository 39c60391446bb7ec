"""Evaluating a run folder: every metric of metrics.py on the run's held-out tokens, into eval.json.

`evaluate_run(RUN_DIR)` (what `python metrics.py RUN_DIR` runs: `main` below, with its flags MetricsConfig) opens the run (support.saved.open_run,
under a shared lock: support.runs.reading), makes a `Record` per dictionary, runs one function per metric
over the held-out tokens (support.heldout.Held: the cache's held-out end, or harvested again), each with a
progress bar, and writes eval.json with the digests of the weights it read. The metrics themselves, their
definitions and the papers' sections, are in metrics.py.
"""
from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch
from torch import Tensor

import activations
import core
import metrics
from core import opt
from metrics import (ReconStats, ce_recovered_all, class_wasserstein, functional_coherence,
                     interaction_vs_cooccurrence)
from probe import pool
from support import cache as activation_cache
from support import cli, runs, saved, tasks
from support.corpora import heldout_text, heldout_windows, take_tokens
from support.files import json_text, write_atomic
from support.heldout import Held, check_held_out

QUICK = {"ce_tokens": 4096, "fc_tokens": 10_000, "wasserstein_texts": 200}
"""The defaults of metrics.py: a few minutes on a laptop CPU for the default run. --thorough uses THOROUGH."""
THOROUGH = {"ce_tokens": 10_000, "fc_tokens": 10_000, "wasserstein_texts": 4000}
"""The settings of the papers' protocols (SAEBench's 4000 probe texts for W1) and of the README's results."""


@dataclass
class Record:
    """One dictionary of a run as the metrics read it, and its row of eval.json (`result`)."""

    layers: list[int]
    model: torch.nn.Module
    meta: dict                    # its config.json
    cols: list[int]               # its layers' positions in the held-out batches (Held.layers)
    s_model: Tensor               # (L,) its input scale: it reads x_model = s_model · x_raw
    s_norm: Tensor                # (L,) the normalising scale of the MSE reported as mse_norm
    stats: ReconStats = field(default_factory=ReconStats)
    result: dict = field(default_factory=dict)

    @property
    def multi(self) -> bool:
        """A multi-layer dictionary (crosscoder, fmxcoder): inputs (B, L, d), else (B, d)."""
        return core.is_multilayer(self.model)

    def inputs(self, x_raw: Tensor) -> Tensor:
        """A held-out batch (B, L_all, d), raw, as this dictionary reads it."""
        x = x_raw[:, self.cols] * self.s_model.to(x_raw.device)[:, None]
        return x if self.multi else x[:, 0]


def record(layers: list[int], model, meta: dict, held: Held) -> Record:
    """The Record of one (layers, model, config.json) entry of saved.open_run, in eval mode."""
    model.eval()
    cols = [held.layers.index(l) for l in layers]
    s_model = torch.tensor(model.config.input_scale, dtype=torch.float32)
    folded = meta.get("train", {}).get("fold_scale", False)
    # the normalising scale: the cache's; else the run's own (unless folded into the weights)
    s_norm = held.scale[cols] if held.cache is not None or folded else s_model
    return Record(layers, model, meta, cols, s_model, s_norm)


def reconstruction(records: list[Record], held: Held, progress: bool = False) -> None:
    """MSE, FVU, L0, dead into each record's result: one pass over the held-out tokens for all."""
    for x_raw in held.batches(desc="reconstruction" if progress else None):
        for r in records:
            x = r.inputs(x_raw)
            r.stats.update(x, r.model(x))
    for r in records:
        name = f"layers {r.layers[0]}-{r.layers[-1]}" if r.multi else f"layer {r.layers[0]}"
        r.result.update({"name": name, "dict": saved.meta_kind(r.meta), "layers": r.layers,
                         **r.stats.result(r.s_model, r.s_norm), "dead_counter": core.dead_fraction(r.model)})


def reconstruction_of_set(records: list[Record]) -> dict:
    """A per-layer set as a whole, comparable with one crosscoder over the same layers."""
    res = [r.result for r in records]
    sse = torch.cat([r.result["_sse_raw_L"] * r.s_norm.double() ** 2 for r in records])
    sst = torch.cat([r.result["_sst_raw_L"] * r.s_norm.double() ** 2 for r in records])
    return {"name": f"set of {len(records)}", "dict": res[0]["dict"], "tokens": res[0]["tokens"],
            "mse_raw": sum(r["mse_raw"] for r in res), "mse_norm": sum(r["mse_norm"] for r in res),
            "fvu": (sse.sum() / sst.sum()).item(), "l0": sum(r["l0"] for r in res),
            "dead_eval": float(np.mean([r["dead_eval"] for r in res]))}


def lm_loss_of(records: list[Record], lm, tok, run: dict, held: Held, ce_tokens: int, lm_batch: int,
               progress: bool = False) -> None:
    """CE increase and fraction recovered with each single-layer record's reconstruction spliced into the
    LM, into its result: the same held-out windows for all of them, one clean pass (ce_recovered_all)."""
    split, skip, limit = heldout_text(run, held.cache.meta if held.cache is not None else None)

    def reconstruct(r):
        s = r.s_model.to(held.device)
        return lambda h_ND: r.model(h_ND.float() * s).recon / s

    windows = take_tokens(heldout_windows(tok, run.get("dataset"), split, run.get("context", 128), skip, lm_batch),
                          min(ce_tokens, limit or ce_tokens))
    splices = [(r.layers[0], reconstruct(r), r.result["_mean_raw_LD"][0].float()) for r in records]
    for r, res in zip(records, ce_recovered_all(lm, windows, splices, progress)):
        r.result.update(res)


def functional_coherence_of(r: Record, held: Held, fc_tokens: int, min_fires: int, progress: bool = False,
                            variants: bool = False, artefacts: bool = False) -> dict:
    """FC and decoder-norm spread of a multi-layer dictionary on the first fc_tokens held-out tokens, each
    layer zeroed and (with the held-out mean from `reconstruction`, in the model's input units) replaced by
    its mean."""
    batches = held.batches(fc_tokens, desc=f"functional coherence ({2 * r.model.config.n_layers + 1} passes)"
                           if progress else None)
    mean_LD = r.result["_mean_raw_LD"].float() * r.s_model[:, None] if "_mean_raw_LD" in r.result else None
    return functional_coherence(r.model, (r.inputs(x) for x in batches), min_fires=min_fires, bins=10,
                                variants=variants, artefacts=artefacts,
                                mean_LD=None if mean_LD is None else mean_LD.to(held.device))


def interaction_of(r: Record, held: Held, cooc_tokens: int | None, n_pairs: int, progress: bool = False) -> dict:
    """PolySAE: the interaction weights against the co-occurrence of the n_pairs most frequent latents."""
    zs = (r.model.encode(r.inputs(x)) for x in held.batches(cooc_tokens, desc="co-occurrence" if progress else None))
    return interaction_vs_cooccurrence(r.model, zs, r.stats.fire_count_F, n_pairs)


def wasserstein_of(records: list[Record], lm, tok, texts: list[str], labels, run: dict, device,
                   progress: bool = False) -> None:
    """The class-conditional W1 of each record's latents, mean-pooled over each text, into its result: one LM
    pass over the texts for all the records (probe.pool)."""
    layers = sorted({l for r in records for l in r.layers})
    feats, _ = pool(lm, tok, texts, layers, [(r.model, r.layers, None) for r in records], run.get("context", 128),
                          device=device, raw=False, progress=progress)
    for r, f in zip(records, feats):
        w = class_wasserstein(f, labels)
        r.result.update({"wasserstein_mean": w["mean"], "wasserstein_median": w["median"],
                         "wasserstein_per_class": w["per_class"]})


@torch.no_grad()
def evaluate_run(run_dir, device="cpu", eval_tokens: int | None = None, ce_tokens: int = QUICK["ce_tokens"],
                 fc_tokens: int = QUICK["fc_tokens"], cooc_tokens: int | None = None, n_pairs: int = 512,
                 min_fires: int = 10, wasserstein_task: str | None = "bbc_topic",
                 wasserstein_texts: int = QUICK["wasserstein_texts"], batch_size: int = 1024,
                 lm_batch: int = 8, allow_incomplete: bool = False, progress: bool = False,
                 fc_variants: bool = False, fc_artefacts: bool = False) -> dict:
    """All metrics of one run folder (see the module docstring); also writes run_dir/eval.json.
    ValueError (one line, naming the file and the fix) for a folder that holds no usable run, an
    interrupted one (unless allow_incomplete) or a damaged activation cache. `progress`: a tqdm bar
    per phase (reconstruction, LM loss, functional coherence, co-occurrence, Wasserstein). The folder is
    locked (shared) meanwhile, so train.py cannot replace it (support.runs.reading)."""
    with runs.reading(run_dir):
        entries = saved.open_run(run_dir, device, allow_incomplete)
        digests = runs.model_digests(run_dir)         # of the weights read now, not of whatever is there at the end
        cached = isinstance(entries[0][2].get("run"), dict) and entries[0][2]["run"].get("cache")
        run = saved.run_entry(run_dir, entries[0][2], ("model", "train_tokens", "eval_tokens") if cached else ("model",))
        check_held_out(run_dir, run)
        cli.check_writable(Path(run_dir))

        @functools.cache
        def lm_tok():                         # loaded once, and only when a metric needs it
            return activations.load_lm(run["model"], device=device, dtype=run.get("lm_dtype", "float32"))

        held = Held(run, sorted({l for ls, _, _ in entries for l in ls}), eval_tokens, batch_size, device, lm_tok)
        records = [record(layers, model, meta, held) for layers, model, meta in entries]
        reconstruction(records, held, progress)
        results = [r.result for r in records] + ([reconstruction_of_set(records)] if len(records) > 1 else [])
        single = [r for r in records if not r.multi]
        if ce_tokens and single:
            lm_loss_of(single, *lm_tok(), run, held, ce_tokens, lm_batch, progress)
        for r in records:
            if fc_tokens and r.multi:
                r.result.update(functional_coherence_of(r, held, fc_tokens, min_fires, progress, fc_variants, fc_artefacts))
            if hasattr(r.model, "interaction_matrix") and r.model.config.order >= 2:
                r.result.update(interaction_of(r, held, cooc_tokens, n_pairs, progress))
        if wasserstein_task:
            texts, labels = tasks.load_task(wasserstein_task, "train", n_train=wasserstein_texts)
            wasserstein_of(records, *lm_tok(), texts, labels, run, device, progress)
            for r in records:
                r.result.update({"wasserstein_task": wasserstein_task, "wasserstein_texts": len(texts)})

        out = {"run": str(run_dir), "data": held.source, "model": run.get("model"),
               "drop_outliers": run.get("drop_outliers"),      # the outlier rule: two numbers of one model compare
               "weights_sha256": digests,
               "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]}
        write_atomic(Path(run_dir, "eval.json"), json_text(out, indent=2))
        return out


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

COLUMNS = [("FVU", "fvu", ".4f"), ("MSE raw", "mse_raw", ".4g"), ("MSE norm", "mse_norm", ".4g"),
           ("L0", "l0", ".1f"), ("dead", "dead_eval", ".3f"), ("dead ctr", "dead_counter", ".3f"),
           ("ΔCE", "ce_increase", ".4f"), ("rec0", "frac_recovered_zero", ".3f"),
           ("recμ", "frac_recovered_mean", ".3f"), ("FC", "fc_mean", ".2f"), ("FCμ", "fc_mean_ablation", ".2f"),
           ("FC≥2", "fc_frac_ge2", ".3f"),
           ("normspr", "norm_spread_mean", ".2f"), ("W1", "wasserstein_mean", ".4g"),
           ("r(Θ,co)", "r_interaction_cooc", ".3f"), ("r(cov,co)", "r_covariance_cooc", ".3f")]


def format_table(evals: list[dict]) -> str:
    head = ["run", "dictionary"] + [c[0] for c in COLUMNS]
    rows = []
    for e in evals:
        for r in e["results"]:
            cells = [Path(e["run"]).name, f"{r['dict'].split('.')[-1]} {r['name']}"]
            for _, key, fmt in COLUMNS:
                v = r.get(key)
                cells.append("-" if v is None else format(v, fmt))
            rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in [head, *rows]]
    notes = []
    for e in evals:
        rule = e.get("drop_outliers")
        notes.append(f"{e['run']}: {e['data']}; " + (f"tokens with a norm > {rule:g} x the median dropped" if rule
                                                      else "every token kept (no outlier rule)"))
        for r in e["results"]:
            if len(r.get("mse_raw_per_layer", [])) > 1:
                per = ", ".join(f"{m:.4g}/{f:.3f}" for m, f in zip(r["mse_raw_per_layer"], r["fvu_per_layer"]))
                notes.append(f"  {r['name']} per layer MSE raw/FVU: {per}")
            if "fc_hist" in r:
                notes.append(f"  {r['name']} FC histogram over [1, {len(r['layers'])}] ({r['fc_latents']} latents "
                             f"fired >= {r['min_fires']}x): {r['fc_hist']}")
            for key, what in (("fc_by_spread", "FC"), ("fc_mean_ablation_by_spread", "FC (mean ablation)")):
                if key in r:
                    b = r[key]
                    cells = ", ".join(f"[{lo},{lo + 1}) {fc:.2f} (n {n})" for lo, fc, n in
                                      zip(b["edges"], b["fc_mean"], b["latents"]) if n)
                    notes.append(f"  {r['name']} {what} by decoder-norm spread: {cells}")
            for name, a in r.get("fc_artefacts", {}).items():
                notes.append(f"  {r['name']} artefact reading {name}: FC {a['mean']:.2f}, "
                             f"{a['off_token_share']:.1%} of its sum from tokens where the latent is off")
    return "\n".join(lines + [""] + notes)


# ----------------------------------------------------------------------------------------
# The command line of metrics.py (`python metrics.py RUN ...` runs this main)
# ----------------------------------------------------------------------------------------


@dataclass
class MetricsConfig:
    """The flags of metrics.py (QUICK fills the unset ones, THOROUGH with --thorough)."""
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    thorough: bool = opt(False, "the papers' settings, as the README's results use them: --ce-tokens 10000 "
                                "--fc-tokens 10000 --wasserstein-texts 4000 (flags given explicitly still win)")
    eval_tokens: int | None = opt(None, "held-out tokens for reconstruction (default: all the run's held-out "
                                        "tokens; 20,000 when harvesting)")
    ce_tokens: int | None = opt(None, f"tokens for the spliced LM loss, 0 skips (default {QUICK['ce_tokens']})")
    fc_tokens: int | None = opt(None, f"tokens for functional coherence, 0 skips (default {QUICK['fc_tokens']})")
    cooc_tokens: int | None = opt(None, "tokens for co-occurrence (default: all)")
    pairs: int = opt(512, "most frequent latents for interaction vs co-occurrence")
    min_fires: int = opt(10, "latents firing fewer times get no FC")
    fc_variants: bool = opt(False, "FC also under the other readings of the paper's description (FC_READINGS)")
    fc_artefacts: bool = opt(False, "also the two all-token mean-of-ratio readings (ARTEFACT_READINGS: they divide "
                                    "by eps where the latent is off; artefacts, not readings) with their off-token share")
    wasserstein: str = opt("bbc_topic", "probe.py task for the class-conditional Wasserstein distance ('' skips)")
    wasserstein_texts: int | None = opt(None, "n_train of tasks.load_task: its train split, n/2 texts per class at "
                                              f"most (default {QUICK['wasserstein_texts']}; SAEBench: 4000)")
    batch_size: int = opt(1024, "held-out tokens per batch")
    allow_incomplete: bool = opt(False, "evaluate a run whose training was interrupted (summary.json: complete false)")
    quiet: bool = opt(False, "no progress bars")

    def check(self, name=str) -> None:
        cli.check_min((name("eval_tokens"), self.eval_tokens, 1), (name("ce_tokens"), self.ce_tokens, 0),
                      (name("fc_tokens"), self.fc_tokens, 0), (name("cooc_tokens"), self.cooc_tokens, 1),
                      (name("pairs"), self.pairs, 3), (name("min_fires"), self.min_fires, 1),
                      (name("wasserstein_texts"), self.wasserstein_texts, 2), (name("batch_size"), self.batch_size, 1))
        if self.wasserstein:
            tasks.get_task(self.wasserstein)

    def __post_init__(self):
        for key, value in (THOROUGH if self.thorough else QUICK).items():
            if getattr(self, key) is None:
                setattr(self, key, value)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgParser(prog="metrics.py", description=metrics.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by train.py (a set of dictionaries: each of them)")
    cli.add_flags(p, MetricsConfig)
    try:
        a = p.parse_args(argv)
        c = cli.build(MetricsConfig, **cli.values(a, MetricsConfig))
        device = cli.resolve_device(c.device)
        a.runs = [m for r in a.runs for m in (saved.set_members(r) or [r])]   # a set: each of its dictionaries
        for r in a.runs:                  # every run (and its cache) checked before the first is evaluated
            runs.recover_export(r)
            cache = (saved.check_run(r, c.allow_incomplete)[0].get("run") or {}).get("cache")
            if cache and Path(cache, "meta.json").exists():
                activation_cache.read_meta(Path(cache))
        evals = [evaluate_run(r, device, c.eval_tokens, c.ce_tokens, c.fc_tokens, c.cooc_tokens, c.pairs, c.min_fires,
                              c.wasserstein or None, c.wasserstein_texts, c.batch_size,
                              allow_incomplete=c.allow_incomplete, progress=not c.quiet, fc_variants=c.fc_variants,
                              fc_artefacts=c.fc_artefacts)
                 for r in a.runs]
    except cli.USER_ERRORS as e:
        return cli.cli_error(e)
    except KeyboardInterrupt:
        return cli.interrupted("each run's eval.json")
    print(format_table(evals))
    return 0

"""Sparse probing: can k latents of a dictionary tell the classes of a labelled text set apart?

The SAEBench sparse-probing protocol (Karvonen et al. 2025) as the official PolySAE code runs it
(its SAEBench fork, sae_bench/evals/sparse_probing/: the evaluation behind Table 1 of PolySAE,
arXiv 2602.01322); fmxcoders (arXiv 2605.09438) report the same "mean probing F1". For a labelled dataset with classes c = 1..C:

  1. features. Each text is cut to `context` tokens ([BOS] + its first context−1 tokens) and run
     through the LM; the residual stream after the run's blocks is encoded token by token and
     the latents are mean-pooled over the text's real tokens (BOS, EOS, pad and other special
     tokens excluded):
         z̄_n = (1/|T_n|) Σ_{t ∈ T_n} encode(s ⊙ h_{n,t})           z̄: (N, F)
     with h_{n,t} (L, d) the hidden states at the dictionary's layers and s (L,) its input scale.
     A crosscoder/fmxcoder reads all L layers at once, an SAE/PolySAE one layer. The reference
     features are the mean-pooled raw residual streams x̄_n (N, L, d), probed one layer at a time.
  2. one-vs-rest tasks with balanced negatives. For class c, the positives are all its texts
     (n_train/2 per class by default), the negatives the same number drawn as evenly as possible
     from the other C−1 classes. Train and test splits are built the same way.
  3. top-k selection on the train split: the k features with the largest |mean_pos − mean_neg|.
  4. an L2 logistic regression on those k features, the exact sklearn objective
         min_{w,b}  ½‖w‖² + C Σ_n [log(1 + e^{m_n}) − y_n m_n],   m_n = w·x_n + b,  C = 1
     (intercept unpenalised), solved in torch in float64: Newton's method with a backtracking
     line search when the dimension is small (≤ NEWTON_MAX_DIM), full-batch L-BFGS otherwise.
     tests/test_probe.py checks it against sklearn's LogisticRegression.
  5. score: binary F1 of the positive class on the test split; mean over classes, then over
     datasets (tasks sharing a `group`, the three bias_in_bios class sets, are averaged first,
     as the SAEBench/PolySAE wandb summary does). k ∈ {1, 2, 5} by default (SAEBench's k_values).
     "full" is the same probe on all F latents (all d dims for the raw streams); SAEBench trains
     that one with AdamW for 100 epochs, here it is the exact L2 objective again.

Tasks: tasks.py (the SAEBench hub datasets and three offline ones).

Run:  python probe.py RUN_DIR --task all|offline|saebench|NAME[,NAME] --k 1,2,5 --device cuda
writes RUN_DIR/probe.json and prints one table (rows: task × feature set; columns: top-k, full).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import activations
import core
from core import opt
from support import cli, runs, saved
from support.corpora import tokenize
from support.files import json_text, write_atomic
from support.tasks import TASKS, TaskUnavailable, load_splits, resolve_tasks

NEWTON_MAX_DIM = 64        # Newton (exact Hessian) up to this many features (the top-k probes), L-BFGS above

QUICK = {"n_train": 200, "n_test": 100, "full": False, "raw": False, "bootstrap": 200}
"""The defaults of probe.py: about the training time of the default run on a laptop CPU (see the README). Nearly
all of it is the LM passes over the texts (measured: 500 + 250 texts per task took 6:55 on 2 cores, 5:20 of it
bbc_topic's long texts; the probes and the bootstrap took under a second each), so the cost scales with n_train
+ n_test.
--thorough uses THOROUGH; a flag given explicitly wins over either."""
THOROUGH = {"n_train": 4000, "n_test": 1000, "full": True, "raw": True, "bootstrap": 1000}
"""SAEBench's sizes (4,000 + 1,000 texts per task, the full-width probes, the raw references, 1,000 resamples):
the settings of experiments/README.md's probe numbers (with the flags it names)."""


# ----------------------------------------------------------------------------------------
# Features: mean-pooled latents and activations, batched over texts
# ----------------------------------------------------------------------------------------



@torch.no_grad()
def pool(lm, tokenizer, texts: list[str], layers: list[int], readers=(), context: int = 128,
         batch_size: int = 32, device="cpu", raw: bool = True, progress: bool = False,
         desc: str = "pooled latents") -> tuple[list[Tensor], Tensor | None]:
    """One LM pass over `texts` (one row per text, [BOS] + first context−1 tokens), mean-pooled
    over each text's real tokens. `readers`: (dictionary, its layers ⊆ `layers`, input scale (L_m,)
    or None for its config's) triples. Returns ([(N, F_i) per reader], (N, L, d) raw or None),
    float32 on the CPU. Memory: one batch of hidden states at a time (never (N, T, L, d)). `progress`:
    a tqdm bar over the texts."""
    from tqdm import tqdm

    readers = [(m.to(device).eval(), [layers.index(l) for l in ls],
                torch.as_tensor(m.config.input_scale if s is None else s, dtype=torch.float32, device=device))
               for m, ls, s in readers]
    batch = tokenize(tokenizer, list(texts), context, pack=False)
    n_tok = batch["attention_mask"].sum(1)
    order = torch.argsort(n_tok, descending=True, stable=True)      # similar lengths per batch
    lat = [None] * len(readers)
    acts = None
    bar = tqdm(total=len(texts), desc=desc, unit="text", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        t = int(n_tok[rows].max())                                   # drop all-pad columns
        ids, mask, keep = (batch[k][rows, :t] for k in ("input_ids", "attention_mask", "keep"))
        h_BTLD = activations.hidden_states(lm, ids, mask, layers)
        keep = keep.to(h_BTLD.device)
        x_NLD = h_BTLD[keep].float()                                 # kept tokens only
        row_N = keep.nonzero()[:, 0]
        count_B1 = keep.sum(1, keepdim=True).clamp_min(1).float()
        for i, (m, pos, s_L) in enumerate(readers):
            x = x_NLD[:, pos].to(device) * s_L[:, None]
            z_NF = m.encode(x if core.is_multilayer(m) else x[:, 0]).float()
            sum_BF = z_NF.new_zeros(len(rows), z_NF.shape[1]).index_add_(0, row_N.to(device), z_NF)
            if lat[i] is None:
                lat[i] = torch.zeros(len(texts), z_NF.shape[1])
            lat[i][rows] = (sum_BF / count_B1.to(device)).cpu()
        if raw:
            sum_BLD = x_NLD.new_zeros(len(rows), *x_NLD.shape[1:]).index_add_(0, row_N, x_NLD)
            if acts is None:
                acts = torch.zeros(len(texts), *x_NLD.shape[1:])
            acts[rows] = (sum_BLD / count_B1[:, :, None]).cpu()
        bar.update(len(rows))
    bar.close()
    return lat, acts


def pooled_latents(model, input_scale, lm, tokenizer, texts: list[str], layers: list[int],
                   context: int = 128, batch_size: int = 32, device="cpu") -> Tensor:
    """(N, F) mean-pooled latents of one dictionary reading blocks `layers` (its run's layers);
    input_scale (L,) multiplies the raw hidden states (None: model.config.input_scale)."""
    return pool(lm, tokenizer, texts, layers, [(model, layers, input_scale)], context, batch_size,
                device, raw=False)[0][0]


# ----------------------------------------------------------------------------------------
# The probe: balanced one-vs-rest tasks, top-k by mean difference, L2 logistic regression, F1
# ----------------------------------------------------------------------------------------


def even_quota(available: list[int], total: int, generator: torch.Generator) -> list[int]:
    """Split `total` draws over groups as evenly as possible, capped by what each group has
    (water filling; ties broken at random). Sum = min(total, sum(available))."""
    quota = [0] * len(available)
    remaining = min(total, sum(available))
    open_ = [c for c, a in enumerate(available) if a > 0]
    while remaining > 0 and open_:
        share, extra = divmod(remaining, len(open_))
        perm = torch.randperm(len(open_), generator=generator).tolist()
        for rank, j in enumerate(perm):
            c = open_[j]
            take = min(share + (rank < extra), available[c] - quota[c])
            quota[c] += take
            remaining -= take
        open_ = [c for c in open_ if quota[c] < available[c]]
    return quota


def balanced_binary(y_N: Tensor, cls: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One-vs-rest examples for class `cls`: all positives and as many negatives, drawn as evenly as
    possible from the other classes (SAEBench prepare_probe_data). If the negatives run short, the
    positives are subsampled to match. Returns (indices into y, binary labels), shuffled."""
    pos = (y_N == cls).nonzero()[:, 0]
    others = [c for c in torch.unique(y_N).tolist() if c != cls]
    pools = [(y_N == c).nonzero()[:, 0] for c in others]
    quota = even_quota([len(p) for p in pools], len(pos), generator)
    neg = torch.cat([p[torch.randperm(len(p), generator=generator)[:q]] for p, q in zip(pools, quota)]
                    + [pos.new_zeros(0)])
    pos = pos[torch.randperm(len(pos), generator=generator)[:len(neg)]]
    idx = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    perm = torch.randperm(len(idx), generator=generator)
    return idx[perm], y[perm]


def top_k_by_mean_diff(x_ND: Tensor, y_N: Tensor, k: int) -> Tensor:
    """(k,) indices of the features with the largest |mean over positives − mean over negatives|."""
    diff_D = (x_ND[y_N == 1].mean(0) - x_ND[y_N == 0].mean(0)).abs()
    return torch.argsort(diff_D, descending=True, stable=True)[:k]


def logistic_objective(beta: Tensor, xa_ND1: Tensor, y_N: Tensor, C: float) -> Tensor:
    """½‖w‖² + C Σ_n softplus(m_n) − y_n m_n with m = [x, 1]·β, β = (w, b); b is not penalised."""
    m_N = xa_ND1 @ beta
    return 0.5 * beta[:-1].pow(2).sum() + C * (F.softplus(m_N) - y_N * m_N).sum()


def fit_logistic(x_ND: Tensor, y_N: Tensor, C: float = 1.0, solver: str = "auto", max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression (sklearn's objective, see module docstring), in float64 on
    x's device. solver: "newton" (exact Hessian, backtracking), "lbfgs" (torch L-BFGS, strong Wolfe),
    "auto" (newton up to NEWTON_MAX_DIM features). Returns (w (D,), b ())."""
    if solver == "auto":
        solver = "newton" if x_ND.shape[1] <= NEWTON_MAX_DIM else "lbfgs"
    if solver not in ("newton", "lbfgs"):
        raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs', got {solver!r}")
    x = x_ND.double()
    y = y_N.to(x)
    N, D = x.shape
    xa = torch.cat([x, x.new_ones(N, 1)], 1)
    beta = x.new_zeros(D + 1)
    if solver == "newton":
        reg = torch.ones(D + 1, dtype=x.dtype, device=x.device)
        reg[-1] = 0
        f = logistic_objective(beta, xa, y, C)
        for _ in range(max_iter):
            p = torch.sigmoid(xa @ beta)
            g = reg * beta + C * (xa.T @ (p - y))
            H = (xa.T * (C * p * (1 - p))) @ xa + torch.diag(reg + 1e-12)
            step = torch.linalg.solve(H, g)
            decrement = g @ step                          # Newton decrement²: ≈ 2 (f − f*)
            if decrement <= tol * (1 + f.abs()):
                break
            t = 1.0
            while True:                                   # Armijo backtracking
                f_new = logistic_objective(beta - t * step, xa, y, C)
                if f_new <= f - 1e-4 * t * decrement or t < 1e-10:
                    break
                t *= 0.5
            beta, f = beta - t * step, f_new
    else:
        beta.requires_grad_(True)
        opt = torch.optim.LBFGS([beta], lr=1, max_iter=max_iter * 10, history_size=20, tolerance_grad=tol,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = logistic_objective(beta, xa, y, C) / (C * N)     # same minimiser, O(1) scale
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        beta = beta.detach()
    return beta[:-1], beta[-1]


def f1_binary(y_true: Tensor, y_pred: Tensor) -> float:
    """F1 of the positive class: 2TP / (2TP + FP + FN); 0 when there is no positive at all."""
    tp = ((y_pred == 1) & (y_true == 1)).sum().item()
    fp = ((y_pred == 1) & (y_true == 0)).sum().item()
    fn = ((y_pred == 0) & (y_true == 1)).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def binary_tasks(y_train: Tensor, y_test: Tensor, n_classes: int, seed: int) -> list:
    """Per class c: (train idx, train y, test idx, test y) of its balanced one-vs-rest task,
    drawn once so that every feature set is probed on the same examples."""
    out = []
    for c in range(n_classes):
        g = torch.Generator().manual_seed(seed * 1009 + c)
        out.append((*balanced_binary(y_train, c, g), *balanced_binary(y_test, c, g)))
    return out


def probe(x_train: Tensor, x_test: Tensor, tasks: list, ks=(1, 2, 5), full: bool = True, C: float = 1.0,
          device="cpu", max_iter: int = 100) -> dict:
    """Probe one feature set: {"top_<k>" | "full": {"f1": [per class], "accuracy": [per class],
    "pred": [per class: (test idx, test y, prediction)]}}. x_*: (N, D) features; tasks from
    binary_tasks. A class with no positive or negative is None. The predictions feed bootstrap_f1."""
    res = {name: {"f1": [], "accuracy": [], "pred": []}
           for name in [f"top_{k}" for k in ks] + (["full"] if full else [])}
    for tr_idx, tr_y, te_idx, te_y in tasks:
        ok = min(tr_y.sum().item(), (1 - tr_y).sum().item(), te_y.sum().item(), (1 - te_y).sum().item()) > 0
        xtr, xte = x_train[tr_idx].to(device), x_test[te_idx].to(device)
        ytr, yte = tr_y.to(device), te_y.to(device)
        for name in res:
            if not ok:
                for key in ("f1", "accuracy", "pred"):
                    res[name][key].append(None)
                continue
            cols = None if name == "full" else top_k_by_mean_diff(xtr, ytr, int(name[4:]))
            a, b = (xtr, xte) if cols is None else (xtr[:, cols], xte[:, cols])
            w, b0 = fit_logistic(a, ytr, C=C, max_iter=max_iter)
            pred = ((b.double() @ w + b0) > 0).double()
            res[name]["f1"].append(f1_binary(yte, pred))
            res[name]["accuracy"].append((pred == yte).double().mean().item())
            res[name]["pred"].append((te_idx, te_y, pred.cpu()))
    return res


def f1_weighted(y_true: Tensor, y_pred: Tensor, w: Tensor) -> float:
    """F1 of the positive class when example n counts w_n times (a bootstrap resample)."""
    tp = (w * ((y_pred == 1) & (y_true == 1))).sum().item()
    fp = (w * ((y_pred == 1) & (y_true == 0))).sum().item()
    fn = (w * ((y_pred == 0) & (y_true == 1))).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def bootstrap_f1(per_task: dict, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of the mean probe F1 over resamples of the test texts.

    per_task: {task: (group, number of test texts, [per class (test idx, y, pred) or None])}. Each
    resample draws every task's test texts with replacement (tasks independently), weights each
    one-vs-rest example by how often its text was drawn, and aggregates exactly as `summarise`
    does: F1 per class, mean over classes, mean over the tasks of a group, mean over groups."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_boot):
        groups: dict[str, list] = {}
        for group, n, classes in per_task.values():
            counts = torch.bincount(torch.randint(n, (n,), generator=g), minlength=n).double()
            groups.setdefault(group, []).append(mean(f1_weighted(y, p, counts[idx]) for idx, y, p in
                                                     (c for c in classes if c is not None)))
        values.append(mean(mean(v) for v in groups.values()))
    return percentile_interval(values, level)


def percentile_interval(values, level: float = 0.95) -> list[float]:
    """[lo, hi]: the (1 − level)/2 and (1 + level)/2 quantiles of bootstrap replicates (finite ones)."""
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    if not len(v):
        return [math.nan, math.nan]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(v, q).tolist()


def mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def probe_run(run_dir, task_names: list[str], ks=(1, 2, 5), n_train: int = QUICK["n_train"],
              n_test: int = QUICK["n_test"], seed: int = 42, device="cpu", batch_size: int = 32,
              context: int | None = None, full: bool = QUICK["full"], raw: bool = QUICK["raw"], C: float = 1.0,
              out: str | None = None, allow_incomplete: bool = False, n_boot: int = QUICK["bootstrap"],
              progress: bool = False, preset: str | None = None) -> dict:
    """Probe every dictionary of a run folder (saved.open_run) on the named tasks; writes probe.json
    (atomically; the tasks of an earlier probe.json with the same settings are kept). ValueError
    naming the file and the fix for an unusable or interrupted run (see saved.open_run) and an
    earlier probe.json that is not JSON, before any work. The folder is locked (shared) meanwhile
    (support.runs.reading); probe.json records the digests of the weights it probed and the preset
    (`preset`, else the one whose values these are: "quick", "thorough" or "custom"). `progress`: a tqdm
    bar per phase (each LM pass, the probes and the bootstrap of each task, the bootstrap of the means)."""
    run_dir = Path(run_dir)
    values = {"n_train": n_train, "n_test": n_test, "full": full, "raw": raw, "bootstrap": n_boot}
    preset = preset or next((n for n, v in (("quick", QUICK), ("thorough", THOROUGH)) if v == values), "custom")
    with runs.reading(run_dir):
        entries = saved.open_run(run_dir, device, allow_incomplete)
        digests = runs.model_digests(run_dir)     # of the weights read now
        meta = saved.run_entry(run_dir, entries[0][2], ("model",))
        out = Path(out) if out else run_dir / "probe.json"
        old = {}
        if out.exists():                          # keep other tasks probed with the same settings
            try:
                old = json.loads(out.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{str(out)!r} is not valid JSON ({e}): delete it (its earlier tasks are lost) or "
                                 f"pass another --out") from e
        cli.check_writable(out.parent)
        kind = meta.get("dict") or type(entries[0][1]).__name__.lower()
        layers = sorted({l for ls, _, _ in entries for l in ls})
        readers = {(kind if len(entries) == 1 else f"{kind}@{ls[0]}"): (m, ls, None) for ls, m, _ in entries}
        context = context or meta.get("context") or 128

        data, skipped, hub_down = {}, {}, None
        for name in task_names:                   # data first: fail (or skip) before loading the LM (no bar: an
            # offline task's texts load in seconds, a hub task's download shows its own; an error stays one line)
            if hub_down and not TASKS[name].offline:
                skipped[name] = hub_down
                continue
            try:
                data[name] = load_splits(name, n_train, n_test, seed)
            except TaskUnavailable as e:
                if len(task_names) == 1:
                    raise
                skipped[name] = str(e)
                print(f"skipping {name}: {e}", file=sys.stderr)
                if "hub" in str(e) and any(w in str(e).lower() for w in ("reach", "connect", "offline", "resolve")):
                    hub_down = "the Hugging Face hub is unreachable"
        if not data:
            raise TaskUnavailable("no task could be loaded: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

        lm, tokenizer = activations.load_lm(meta["model"], device, meta.get("lm_dtype", "float32"))
        results, preds = {}, {}
        for name, splits in data.items():
            t0 = time.time()
            classes = list(TASKS[name].classes)
            feats, ys = {}, {}
            for split, (texts, labels) in splits.items():
                lat, acts = pool(lm, tokenizer, texts, layers, list(readers.values()), context, batch_size,
                                 device, raw, progress=progress, desc=f"LM pass {name} {split}")
                feats[split] = dict(zip(readers, lat))
                if raw:
                    feats[split].update({f"raw@{l}": acts[:, i] for i, l in enumerate(layers)})
                ys[split] = torch.tensor([classes.index(l) for l in labels])
            per_set, preds[name] = probe_task(name, feats, ys, seed, ks, full, C, device, n_boot,
                                              (["raw"] if raw else []) + ([kind] if len(entries) > 1 else []),
                                              progress)
            results[name] = {"dataset": TASKS[name].source, "group": TASKS[name].group, "classes": classes,
                             "n_texts": {s: len(splits[s][0]) for s in splits}, "features": per_set,
                             "seconds": round(time.time() - t0, 1)}
            print(f"{name}: {sum(len(s[0]) for s in splits.values())} texts in {time.time() - t0:.0f} s", file=sys.stderr)

        report = {"run": str(run_dir), "dict": kind, "model": meta["model"], "layers": layers,
                  "weights_sha256": digests,
                  "drop_outliers": None,          # every real token of a text is pooled (SAEBench): no outlier rule
                  "preset": preset,
                  "settings": {"k": list(ks), "n_train": n_train, "n_test": n_test, "seed": seed, "context": context,
                               "C": C, "full": full, "raw": raw, "bootstrap": n_boot},
                  "tasks": results, "skipped": skipped}
        if isinstance(old, dict) and old.get("settings") == report["settings"] \
                and old.get("weights_sha256") == report["weights_sha256"]:      # not the tasks of a replaced model
            report["tasks"] = {**old.get("tasks", {}), **results}
        report["mean"] = summarise(report["tasks"])
        if n_boot and report["tasks"].keys() == preds.keys():     # an interval needs every task's predictions
            report["mean_ci"] = mean_intervals(report["tasks"], preds, n_boot, seed, progress)
        write_atomic(out, json_text(report, indent=2))
        return report


def probe_task(name: str, feats: dict, ys: dict, seed: int, ks, full: bool, C: float, device, n_boot: int,
               prefixes=(), progress: bool = False) -> tuple[dict, dict]:
    """Probe every feature set of one task: (per_set, preds). per_set[fs][col] holds the mean F1
    and accuracy over classes, per-class F1 and, with n_boot, "f1_ci" (bootstrap_f1 over this task's
    test texts); "<prefix>@mean" adds the mean over the layers of a per-layer set. feats[split][fs]:
    (N, D) features, ys[split]: (N,) class indices. `progress`: a bar for the probes, one for the bootstrap."""
    from tqdm import tqdm

    classes = list(TASKS[name].classes)
    tasks = binary_tasks(ys["train"], ys["test"], len(classes), seed)
    per_set, preds, fits = {}, {}, {}
    for fs in tqdm(feats["train"], desc=f"probes {name}", unit="feature set", dynamic_ncols=True,
                   disable=not progress):
        fits[fs] = r = probe(feats["train"][fs], feats["test"][fs], tasks, ks, full, C, device)
        preds[fs] = {col: v["pred"] for col, v in r.items()}
        per_set[fs] = {col: {"f1": mean(v["f1"]), "accuracy": mean(v["accuracy"]),
                             "per_class_f1": dict(zip(classes, v["f1"]))} for col, v in r.items()}
    if n_boot:
        for fs, col in tqdm([(fs, col) for fs, r in fits.items() for col in r], desc=f"bootstrap {name}",
                            unit="probe", dynamic_ncols=True, disable=not progress):
            per_set[fs][col]["f1_ci"] = bootstrap_f1({name: ("", len(ys["test"]), fits[fs][col]["pred"])}, n_boot, seed)
    for prefix in prefixes:
        layer_sets = [fs for fs in per_set if fs.startswith(prefix + "@")]
        if len(layer_sets) > 1:
            per_set[f"{prefix}@mean"] = {col: {"f1": mean(per_set[fs][col]["f1"] for fs in layer_sets)}
                                         for col in per_set[layer_sets[0]]}
    return per_set, preds


def mean_intervals(tasks: dict, preds: dict, n_boot: int, seed: int, progress: bool = False) -> dict:
    """{feature set: {col: [lo, hi]}}: bootstrap_f1 of `summarise`'s mean over every task."""
    from tqdm import tqdm

    out: dict = {}
    pairs = [(fs, col) for fs in dict.fromkeys(fs for p in preds.values() for fs in p)
             for col in dict.fromkeys(c for p in preds.values() if fs in p for c in p[fs])]
    for fs, col in tqdm(pairs, desc="bootstrap of the means", unit="probe", dynamic_ncols=True, disable=not progress):
        per_task = {t: (tasks[t]["group"], tasks[t]["n_texts"]["test"], p[fs][col])
                    for t, p in preds.items() if fs in p and col in p[fs]}
        out.setdefault(fs, {})[col] = bootstrap_f1(per_task, n_boot, seed)
    return out


def summarise(tasks: dict) -> dict:
    """Per feature set and column: mean F1 over datasets, tasks of one group averaged first."""
    summary: dict = {}
    sets = dict.fromkeys(fs for t in tasks.values() for fs in t["features"])
    for fs in sets:
        cols = dict.fromkeys(c for t in tasks.values() if fs in t["features"] for c in t["features"][fs])
        summary[fs] = {}
        for col in cols:
            groups: dict[str, list] = {}
            for t in tasks.values():
                if fs in t["features"] and col in t["features"][fs]:
                    groups.setdefault(t["group"], []).append(t["features"][fs][col]["f1"])
            summary[fs][col] = mean(mean(v) for v in groups.values())
    return summary


def table(report: dict) -> str:
    cols = [f"top_{k}" for k in report["settings"]["k"]] + (["full"] if report["settings"]["full"] else [])
    fmt = lambda v: f"{v:7.3f}" if isinstance(v, (int, float)) else f"{'-':>7}"
    lines = [f"{'task':<28}{'features':<18}" + "".join(f"{c:>8}" for c in cols)]
    for name, t in list(report["tasks"].items()) + [("mean", {"features": {fs: {c: {"f1": v} for c, v in r.items()}
                                                                      for fs, r in report["mean"].items()}})]:
        for i, (fs, r) in enumerate(t["features"].items()):
            lines.append(f"{(name if i == 0 else ''):<28}{fs:<18}" + "".join(" " + fmt((r.get(c) or {}).get("f1"))
                                                                             for c in cols))
    for fs, cis in report.get("mean_ci", {}).items():
        lines.append(f"{'95% interval':<28}{fs:<18}" + "".join(
            f" {cis[c][0]:.2f}-{cis[c][1]:.2f}".rjust(8) if c in cis else f"{'-':>8}" for c in cols))
    return "\n".join(lines)


@dataclass
class ProbeConfig:
    """The flags of probe.py (QUICK fills the unset ones, THOROUGH with --thorough)."""
    task: str = opt("all", "all | offline | saebench | comma-separated names: " + ", ".join(TASKS))
    thorough: bool = opt(False, "SAEBench's sizes, as experiments/README.md's numbers use them: --n-train 4000 "
                                "--n-test 1000 --full --raw --bootstrap 1000 (flags given explicitly still win)")
    k: list[int] = opt((1, 2, 5), "top-k latents per probe, comma-separated")
    n_train: int | None = opt(None, f"train texts per one-vs-rest task (n/2 per class; default {QUICK['n_train']}, "
                                    f"SAEBench {THOROUGH['n_train']})")
    n_test: int | None = opt(None, f"test texts per one-vs-rest task (default {QUICK['n_test']}, SAEBench "
                                   f"{THOROUGH['n_test']})")
    seed: int = opt(42, "sampling seed (SAEBench's)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    batch_size: int = opt(32, "texts per LM forward pass")
    context: int | None = opt(None, "tokens per text (default: the run's context)")
    C: float = opt(1.0, "inverse L2 strength of the logistic regression")
    full: bool | None = opt(None, "also the probe on all latents / all dims (default off; on with --thorough)")
    raw: bool | None = opt(None, "also the raw-activation reference probes, one per layer (default off; on with "
                                 "--thorough)")
    out: str | None = opt(None, "output json (default RUN/probe.json)")
    allow_incomplete: bool = opt(False, "probe a run whose training was interrupted (summary.json: complete false)")
    bootstrap: int | None = opt(None, "resamples of the test texts for the 95% intervals of the F1s (0: none; "
                                      f"default {QUICK['bootstrap']}, with --thorough {THOROUGH['bootstrap']})")
    quiet: bool = opt(False, "no progress bars")

    def check(self, name=str) -> None:
        if any(not isinstance(k, int) or k < 1 for k in self.k):
            raise ValueError(f"{name('k')} must be positive integers like 1,2,5, got {self.k!r}")
        cli.check_min((name("n_train"), self.n_train, 2), (name("n_test"), self.n_test, 2),
                      (name("batch_size"), self.batch_size, 1), (name("context"), self.context, 2),
                      (name("bootstrap"), self.bootstrap, 0))
        if not self.C > 0:
            raise ValueError(f"{name('C')} must be positive, got {self.C}")

    def __post_init__(self):
        for key, value in (THOROUGH if self.thorough else QUICK).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def preset(self) -> str:
        return "thorough" if self.thorough else "quick"


def parse_args(argv=None) -> tuple[str, ProbeConfig]:
    """(run folder, flags), checked (ValueError with a one-line message)."""
    p = cli.ArgParser(description="Sparse probing (SAEBench protocol) of a trained run folder.")
    p.add_argument("run", help="run folder written by train.py (config.json or layer_*/config.json)")
    cli.add_flags(p, ProbeConfig)
    a = p.parse_args(argv)
    vals = cli.values(a, ProbeConfig)
    vals["k"] = list(vals["k"]) if isinstance(vals["k"], (list, tuple)) else [vals["k"]]
    return a.run, cli.build(ProbeConfig, **vals)


def main(argv=None) -> int:
    try:
        run, c = parse_args(argv)
        report = probe_run(run, resolve_tasks(c.task), c.k, c.n_train, c.n_test, c.seed, cli.resolve_device(c.device),
                           c.batch_size, c.context, c.full, c.raw, c.C, c.out, c.allow_incomplete, c.bootstrap,
                           progress=not c.quiet, preset=c.preset)
    except cli.USER_ERRORS as e:
        return cli.cli_error(e)
    except KeyboardInterrupt:
        return cli.interrupted("probe.json")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

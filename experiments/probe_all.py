"""Sparse probing of several run folders with ONE language-model pass per task (probe.py's protocol).

    python experiments/probe_all.py RUN [RUN ...] --task offline --n-train 300 --n-test 150 [--no-full]

`python probe.py RUN` runs the LM over the probe texts once per run; on a 2-core CPU that pass
dominates (about 250 tokens/s for SmolLM2-135M), so this script pools every dictionary of every run
in the same pass (probe.pool accepts several readers) and then applies exactly probe.py's probe
(probe.binary_tasks, probe.probe, probe.summarise). Each RUN/probe.json has probe.py's format.

Every F1 gets a 95% bootstrap interval over the test texts (probe.bootstrap_f1). It also adds the
class-conditional Wasserstein distance of metrics.py on the pooled latents of the bbc_topic train
split, raw and with each latent multiplied by the norm of what it writes (decoder_norm_per_latent),
with paired bootstrap intervals (metrics.wasserstein_intervals: the same resampled texts for every
dictionary, whose replicates are kept so that experiments/ can take intervals of ratios), as
report["wasserstein"][feature_set].
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import activations  # noqa: E402
import metrics  # noqa: E402
import probe  # noqa: E402
from support.saved import load_run  # noqa: E402
from support import tasks  # noqa: E402
from support.files import write_atomic  # noqa: E402


def decoder_norm_per_latent(model) -> torch.Tensor:
    """(F,) the size of what each latent writes: ‖W_dec[i]‖ (SAE), the polynomial decoder's norm
    at unit activation (PolySAE), Σ_l ‖W_dec[i, l]‖ (crosscoders). W1 of z_i · this does not depend
    on how a dictionary splits a feature's scale between its activation and its decoder."""
    with torch.no_grad():
        n = model.decoder_norms().float().cpu()
    return n.sum(-1) if n.ndim == 2 else n


def probe_runs(run_dirs, task_names, ks=(1, 2, 5), n_train=300, n_test=150, seed=42, device="cpu",
               batch_size=32, full=False, raw=True, C=1.0, n_boot=1000, n_boot_w1=200) -> dict:
    runs = {}
    for rd in run_dirs:
        entries = load_run(rd, device)
        meta = entries[0][2].get("run", {})
        kind = meta.get("dict") or type(entries[0][1]).__name__.lower()
        readers = {(kind if len(entries) == 1 else f"{kind}@{ls[0]}"): (m, ls, None) for ls, m, _ in entries}
        runs[str(rd)] = {"kind": kind, "meta": meta, "readers": readers, "n": len(entries),
                         "layers": sorted({l for ls, _, _ in entries for l in ls})}
    models = {r["meta"].get("model") for r in runs.values()}
    contexts = {r["meta"].get("context") or 128 for r in runs.values()}
    lm_dtypes = {r["meta"].get("lm_dtype", "float32") for r in runs.values()}
    if len(models) != 1 or len(contexts) != 1 or len(lm_dtypes) != 1:
        raise ValueError(f"all runs must share one LM, LM dtype and context, got models {models}, "
                         f"LM dtypes {lm_dtypes}, contexts {contexts}")
    context = contexts.pop()
    all_layers = sorted({l for r in runs.values() for l in r["layers"]})
    flat = [(rd, key, rdr) for rd, r in runs.items() for key, rdr in r["readers"].items()]

    lm, tok = activations.load_lm(models.pop(), device, lm_dtypes.pop())
    results, preds, wass = {rd: {} for rd in runs}, {rd: {} for rd in runs}, {rd: {} for rd in runs}
    for name in task_names:
        t0 = time.time()
        splits = tasks.load_splits(name, n_train, n_test, seed)
        classes = list(tasks.TASKS[name].classes)
        feats, ys = {}, {}
        for split, (texts, labels) in splits.items():
            lat, acts = probe.pool(lm, tok, texts, all_layers, [r for _, _, r in flat], context, batch_size,
                                   device, raw)
            feats[split] = {(rd, key): z for (rd, key, _), z in zip(flat, lat)}
            if raw:
                feats[split].update({("raw", l): acts[:, i] for i, l in enumerate(all_layers)})
            ys[split] = torch.tensor([classes.index(l) for l in labels])
        for rd, run in runs.items():            # probe.py's probe_task on this run's feature sets
            mine = {s: {k: f for (r, k), f in feats[s].items() if r == rd} for s in feats}
            if raw:
                for s in feats:
                    mine[s].update({f"raw@{l}": feats[s][("raw", l)] for l in run["layers"]})
            per_set, preds[rd][name] = probe.probe_task(
                name, mine, ys, seed, ks, full, C, device, n_boot,
                (["raw"] if raw else []) + ([run["kind"]] if run["n"] > 1 else []))
            results[rd][name] = {"dataset": tasks.TASKS[name].source, "group": tasks.TASKS[name].group,
                                 "classes": classes, "n_texts": {s: len(splits[s][0]) for s in splits},
                                 "features": per_set, "seconds": round(time.time() - t0, 1)}
        if name == "bbc_topic":                 # W1 of every dictionary on the same resampled texts
            sets = {}
            for rd, key, (model, _, _) in flat:
                z = feats["train"][(rd, key)]
                sets[f"{rd}|{key}"] = z
                sets[f"{rd}|{key}|dnorm"] = z * decoder_norm_per_latent(model)
            w = metrics.wasserstein_intervals(sets, splits["train"][1], n_boot_w1, seed, keep_replicates=True)
            for rd, key, _ in flat:
                wass[rd][key] = {"raw": w[f"{rd}|{key}"], "decoder_norm_scaled": w[f"{rd}|{key}|dnorm"],
                                 "task": name, "texts": len(splits["train"][0])}
        print(f"{name}: {sum(len(s[0]) for s in splits.values())} texts, {len(flat)} dictionaries "
              f"in {time.time() - t0:.0f} s", file=sys.stderr)

    reports = {}
    for rd, run in runs.items():
        report = {"run": rd, "dict": run["kind"], "model": run["meta"]["model"], "layers": run["layers"],
                  "settings": {"k": list(ks), "n_train": n_train, "n_test": n_test, "seed": seed,
                               "context": context, "C": C, "full": full},
                  "tasks": results[rd], "skipped": {}, "wasserstein": wass[rd],
                  "note": "experiments/probe_all.py: one LM pass shared by all runs"}
        report["mean"] = probe.summarise(report["tasks"])
        if n_boot:
            report["mean_ci"] = probe.mean_intervals(report["tasks"], preds[rd], n_boot, seed)
        write_atomic(Path(rd) / "probe.json", json.dumps(report, indent=2))
        reports[rd] = report
        print(f"== {rd}\n{probe.table(report)}")
    return reports


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--task", default="offline")
    p.add_argument("--k", default="1,2,5")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=150)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--no-full", action="store_true")
    p.add_argument("--no-raw", action="store_true")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the F1 intervals (0: none)")
    p.add_argument("--bootstrap-w1", type=int, default=200, help="paired resamples for the W1 intervals")
    a = p.parse_args(argv)
    probe_runs(a.runs, tasks.resolve_tasks(a.task), [int(k) for k in a.k.split(",")], a.n_train, a.n_test,
               a.seed, a.device, a.batch_size, not a.no_full, not a.no_raw, a.C, a.bootstrap, a.bootstrap_w1)


if __name__ == "__main__":
    main()

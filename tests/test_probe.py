"""probe.py: the probe against scikit-learn and hand-built cases, the offline tasks, pooling against a
naive per-text loop, and the command line end to end on a tiny random GPT-2 (no downloads)."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import activations
from support import corpora
import crosscoder
import probe
from support import tasks
import sae
from support import saved

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# The probe itself
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("C", [1.0, 0.05])
def test_logistic_regression_matches_sklearn(solver, C, device):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 7, generator=g, dtype=torch.float64) * torch.tensor([1, 2, 0.5, 3, 1, 1, 4.0])
    x[:, 3] += 2.0                                                     # an offset, so b matters
    logits = x[:, 0] - 0.7 * x[:, 1] + 0.3 * x[:, 3] - 0.6 + torch.randn(600, generator=g, dtype=torch.float64)
    y = (logits > 0).double()
    w, b = probe.fit_logistic(x.to(device), y.to(device), C=C, solver=solver)
    w, b = w.cpu(), b.cpu()
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(x.numpy(), y.numpy())   # L2 (default)
    np.testing.assert_allclose(w.numpy(), ref.coef_[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b.item(), ref.intercept_[0], rtol=1e-5, atol=1e-7)
    x_new = torch.randn(2000, 7, generator=g, dtype=torch.float64) * 2
    pred = ((x_new @ w + b) > 0).double().numpy()
    assert (pred == ref.predict(x_new.numpy())).all()
    # the intercept is not penalised: a large offset in y's base rate is fitted, not shrunk
    assert abs(b.item()) > 0.1


def test_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        t = (torch.rand(300, generator=g) < 0.4).double()
        p = (torch.rand(300, generator=g) < 0.5).double()
        assert probe.f1_binary(t, p) == pytest.approx(f1_score(t.numpy(), p.numpy()))
    assert probe.f1_binary(torch.ones(4), torch.zeros(4)) == 0.0


def test_top_k_picks_the_largest_absolute_mean_differences():
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([1.0] * 50 + [0.0] * 50)
    shift = torch.tensor([0.1, 5.0, -3.0, 0.5, -7.0, 0.0])
    x = torch.randn(100, 6, generator=g) * 0.01 + y[:, None] * shift
    naive = sorted(range(6), key=lambda j: -abs(x[:50, j].mean().item() - x[50:, j].mean().item()))
    for k in (1, 2, 3, 6):
        assert probe.top_k_by_mean_diff(x, y, k).tolist() == naive[:k]
    assert probe.top_k_by_mean_diff(x, y, 3).tolist() == [4, 1, 2]


def test_balanced_negatives_drawn_evenly_from_other_classes():
    g = torch.Generator().manual_seed(4)
    # even case: 31 positives, 3 other classes with plenty -> 10 or 11 from each, 31 in all
    y = torch.tensor([0] * 31 + [1] * 40 + [2] * 40 + [3] * 40)
    idx, lab = probe.balanced_binary(y, 0, g)
    assert lab.sum() == 31 and (1 - lab).sum() == 31
    assert (y[idx][lab == 1] == 0).all()
    counts = Counter(y[idx][lab == 0].tolist())
    assert sorted(counts) == [1, 2, 3] and set(counts.values()) <= {10, 11}
    assert len(set(idx.tolist())) == len(idx)                        # no repeats
    # a short class gives all it has, the deficit goes to the classes that still have texts
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 50 + [3] * 5)
    idx, lab = probe.balanced_binary(y, 0, g)
    assert Counter(y[idx][lab == 0].tolist()) == {1: 10, 2: 15, 3: 5}
    # too few negatives in all: the positives are subsampled to match
    y = torch.tensor([0] * 30 + [1] * 4 + [2] * 3)
    idx, lab = probe.balanced_binary(y, 0, g)
    assert lab.sum() == 7 and (1 - lab).sum() == 7


def _features(n, d, g, signal=None):
    """n texts of 3 classes, noise features; feature 7 marks class 0 perfectly if signal."""
    y = torch.arange(n) % 3
    x = torch.randn(n, d, generator=g)
    if signal:
        x[:, 7] = (y == 0).float() * 2 + 0.05 * torch.rand(n, generator=g)
    return x, y


def test_a_perfectly_separating_latent_gives_f1_one_with_k1():
    g = torch.Generator().manual_seed(5)
    (xtr, ytr), (xte, yte) = _features(600, 20, g, True), _features(300, 20, g, True)
    tasks = probe.binary_tasks(ytr, yte, 3, seed=0)
    tr_idx, tr_y = tasks[0][:2]
    assert probe.top_k_by_mean_diff(xtr[tr_idx], tr_y, 1).tolist() == [7]
    res = probe.probe(xtr, xte, tasks, ks=(1,), full=False)
    assert res["top_1"]["f1"][0] == 1.0 and res["top_1"]["accuracy"][0] == 1.0
    # class 1 (or 2) vs rest: feature 7 only rules out the half of the negatives that are class 0,
    # so every positive and the other half are called positive: F1 = 2n / (2n + n/2) = 0.8 exactly
    assert res["top_1"]["f1"][1:] == [pytest.approx(0.8)] * 2


def test_pure_noise_gives_chance():
    g = torch.Generator().manual_seed(6)
    (xtr, ytr), (xte, yte) = _features(6000, 30, g), _features(3000, 30, g)
    tasks = probe.binary_tasks(ytr, yte, 3, seed=0)
    res = probe.probe(xtr, xte, tasks, ks=(1, 5), full=True)
    for col in res.values():
        assert 0.4 < probe.mean(col["f1"]) < 0.6
        assert 0.45 < probe.mean(col["accuracy"]) < 0.55


def test_summary_averages_groups_first():
    tasks = {"a1": {"group": "a", "features": {"x": {"top_1": {"f1": 0.2}}}},
             "a2": {"group": "a", "features": {"x": {"top_1": {"f1": 0.4}}}},
             "b": {"group": "b", "features": {"x": {"top_1": {"f1": 0.9}}}}}
    assert probe.summarise(tasks)["x"]["top_1"] == pytest.approx((0.3 + 0.9) / 2)


# ----------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------


def test_bbc_topic_loads_offline_with_five_classes():
    s = tasks.load_splits("bbc_topic", 4000, 1000, seed=42)
    (tr, ltr), (te, lte) = s["train"], s["test"]
    assert set(ltr) == set(lte) == set(tasks.TASKS["bbc_topic"].classes)
    texts, labels = corpora.bbc_news()
    assert len(tr) + len(te) == len(set(texts)) > 2000           # duplicates kept once
    assert len(set(tr)) == len(tr) and not set(tr) & set(te)
    n_business = len({t for t, l in zip(texts, labels) if l == "business"})
    assert Counter(lte)["business"] == round(0.25 * n_business)
    small = tasks.load_splits("bbc_topic", 40, 20, seed=42)
    assert Counter(small["train"][1]) == {c: 20 for c in tasks.TASKS["bbc_topic"].classes}
    assert set(small["test"][0]) <= set(te)                         # same split, only cut shorter
    assert tasks.load_task("bbc_topic", "test", 40, 20, seed=42) == small["test"]


def test_us_places_loads_offline_and_splits_by_entity():
    import us

    ent = tasks.us_places_entities()
    assert list(ent) == ["state", "us_city", "world_city", "country"]
    assert 45 <= len(ent["state"]) <= 50 and {"Texas", "Ohio"} <= set(ent["state"])
    assert "Georgia" not in ent["state"] and "Georgia" not in ent["country"]     # ambiguous: dropped
    assert {"Sacramento", "Chicago"} <= set(ent["us_city"]) and "Tokyo" in ent["world_city"]
    assert "France" in ent["country"]
    assert all(s.name in ent["state"] for s in us.states.STATES if s.name not in ("Georgia", "New York"))
    s = tasks.load_splits("us_places", 4000, 1000, seed=0)
    for c in ent:
        # the bare-name frame "{}" shows which entities went where: never in both splits
        bare = {split: {t for t, l in zip(*s[split]) if l == c and t in ent[c]} for split in s}
        assert bare["train"] and bare["test"] and not bare["train"] & bare["test"]
    assert set(s["test"][1]) == set(ent)


def test_chatterbot_language_loads_offline():
    s = tasks.load_splits("chatterbot_language", 4000, 1000, seed=0)
    assert set(s["train"][1]) == set(s["test"][1]) == {"en", "fr", "de", "es", "nl"}
    assert not set(s["train"][0]) & set(s["test"][0])
    assert Counter(s["test"][1])["fr"] >= 10


def test_task_names_and_hub_failure_is_one_line(monkeypatch):
    assert tasks.resolve_tasks("offline") == tasks.OFFLINE
    assert tasks.resolve_tasks("fancyzhx/ag_news,bbc_topic") == ["ag_news", "bbc_topic"]
    assert len(tasks.SAEBENCH) == 8
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.resolve_tasks("nope")

    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach 'fancyzhx/ag_news' on the Hub (LocalEntryNotFoundError)\nmore")

    import datasets
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(tasks.TaskUnavailable) as e:
        tasks.TASKS["ag_news"].load(40, 20, 0)
    assert "fancyzhx/ag_news" in str(e.value) and "\n" not in str(e.value) and "bbc_topic" in str(e.value)


# ----------------------------------------------------------------------------------------
# Pooling and the command line on a tiny random GPT-2
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return gpt2_dir, *activations.load_lm(gpt2_dir)


def test_pooling_matches_a_naive_per_text_loop(gpt2, device):
    """probe.pool with the dictionaries on the test device, against a naive CPU loop."""
    path, lm, tok = gpt2
    texts = ["The cat sat on the mat.", "Stocks fell sharply in early trading on Monday, " * 5, "Hi",
             "Sacramento is the capital of California.", ""]
    torch.manual_seed(0)
    cc = crosscoder.CrossCoder(crosscoder.CrossCoderConfig(d_in=64, n_latents=96, k=6, n_layers=2,
                                                          input_scale=[0.5, 2.0])).eval()
    lat, acts = probe.pool(lm, tok, texts, [1, 2], [(cc, [1, 2], None)], context=16, batch_size=2, device=device)
    one = sae.SAE(sae.SAEConfig(d_in=64, n_latents=96, k=6)).eval()
    lat_sae = probe.pooled_latents(one, [3.0], lm, tok, texts, [2], context=16, batch_size=3, device=device)
    cc, one = cc.cpu(), one.cpu()
    for n, text in enumerate(texts):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:15]
        with torch.no_grad():   # HF hidden_states[l + 1] is block l's output (not the last block)
            hs = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states
        h = torch.stack([hs[2][0], hs[3][0]], 1)[1:]                   # (T-1, 2, d), BOS dropped
        if len(h) == 0:
            assert (lat[0][n] == 0).all() and (acts[n] == 0).all()
            continue
        torch.testing.assert_close(acts[n], h.mean(0), rtol=1e-4, atol=1e-5)
        z = cc.encode(h * torch.tensor([0.5, 2.0])[:, None])
        torch.testing.assert_close(lat[0][n], z.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lat_sae[n], one.encode(h[:, 1] * 3.0).mean(0), rtol=1e-4, atol=1e-5)
    assert lat[0].shape == (5, 96) and acts.shape == (5, 2, 64) and lat_sae.shape == (5, 96)


def _save_run(model, path, layers, lm_path):
    run = {"dict": "crosscoder" if len(layers) > 1 else "sae", "model": lm_path, "layers": layers,
           "hooks": [f"transformer.h.{l}" for l in layers], "dataset": None, "context": 32, "cache": None,
           "train_tokens": 0, "eval_tokens": 0, "drop_outliers": None}
    saved.save(model, path, extra={"run": run, "train": {}, "metrics": {}})


@pytest.mark.slow
def test_command_line_end_to_end(gpt2, tmp_path, device):
    path, _, _ = gpt2
    torch.manual_seed(0)
    cc = crosscoder.CrossCoder(crosscoder.CrossCoderConfig(d_in=64, n_latents=128, k=8, n_layers=2,
                                                          input_scale=[0.5, 2.0]))
    _save_run(cc, tmp_path / "cc", [1, 2], path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "probe.py"), str(tmp_path / "cc"), "--task", "bbc_topic",
                           "--thorough", "--n-train", "64", "--n-test", "32", "--device", str(device)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "bbc_topic" in proc.stdout and "crosscoder" in proc.stdout and "raw@2" in proc.stdout
    report = json.loads((tmp_path / "cc" / "probe.json").read_text())
    feats = report["tasks"]["bbc_topic"]["features"]
    assert set(feats) == {"crosscoder", "raw@1", "raw@2", "raw@mean"}
    for fs in ("crosscoder", "raw@1", "raw@2"):
        for col in ("top_1", "top_2", "top_5", "full"):
            assert 0.0 <= feats[fs][col]["f1"] <= 1.0
            assert len(feats[fs][col]["per_class_f1"]) == 5
    assert report["tasks"]["bbc_topic"]["n_texts"] == {"train": 160, "test": 80}    # explicit flags win
    assert report["mean"]["crosscoder"]["top_1"] == feats["crosscoder"]["top_1"]["f1"]
    assert report["preset"] == "thorough" and report["settings"]["bootstrap"] == 1000

    # a hub task offline: one clear line on stderr, no traceback
    proc = subprocess.run([sys.executable, str(ROOT / "probe.py"), str(tmp_path / "cc"), "--task", "ag_news"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "fancyzhx/ag_news" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_per_layer_sae_set(gpt2, tmp_path):
    path, _, _ = gpt2
    torch.manual_seed(0)
    for l in (0, 3):
        _save_run(sae.SAE(sae.SAEConfig(d_in=64, n_latents=128, k=8, input_scale=[1.5])),
                  tmp_path / "saes" / f"layer_{l}", [l], path)
    report = probe.probe_run(tmp_path / "saes", ["us_places"], ks=(1, 2), n_train=48, n_test=24, seed=0,
                             full=False, raw=True)
    feats = report["tasks"]["us_places"]["features"]
    assert set(feats) == {"sae@0", "sae@3", "sae@mean", "raw@0", "raw@3", "raw@mean"}
    assert feats["sae@mean"]["top_2"]["f1"] == pytest.approx(
        (feats["sae@0"]["top_2"]["f1"] + feats["sae@3"]["top_2"]["f1"]) / 2)
    assert all(np.isfinite(feats[fs]["top_1"]["f1"]) for fs in feats)
    assert "full" not in feats["sae@0"]


def test_hub_loaders_sample_like_saebench(monkeypatch):
    """The hub loaders on small stand-in datasets with the real column names: n/4 texts per class
    and gender (bias_in_bios), n/2 per class (ag_news), pandas .sample(random_state=seed) as SAEBench."""
    import datasets

    rng = np.random.default_rng(0)

    def bios(n):
        prof = rng.integers(0, 28, n)
        return datasets.Dataset.from_dict({"hard_text": [f"bio {i} of {p}" for i, p in enumerate(prof)],
                                           "profession": prof.tolist(), "gender": rng.integers(0, 2, n).tolist()})

    def news(n):
        lab = rng.integers(0, 4, n)
        return datasets.Dataset.from_dict({"text": [f"news {i}" for i in range(n)], "label": lab.tolist()})

    def europarl(pair):
        a, b = pair.split("-")
        return ({"translation": {a: f"{a} sentence {i}", b: f"{b} sentence {i}"}} for i in range(1000))

    fakes = {"LabHC/bias_in_bios": datasets.DatasetDict({"train": bios(6000), "test": bios(3000)}),
             "fancyzhx/ag_news": datasets.DatasetDict({"train": news(400), "test": news(200)})}

    def load_dataset(name, *args, **kwargs):
        return europarl(args[0]) if name == "Helsinki-NLP/europarl" else fakes[name]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    s = tasks.TASKS["bias_in_bios_class_set2"].load(40, 20, 42)
    assert Counter(s["train"][1]) == {c: 20 for c in tasks.BIOS_SETS[2]}
    assert Counter(s["test"][1]) == {c: 10 for c in tasks.BIOS_SETS[2]}
    df = fakes["LabHC/bias_in_bios"]["train"].to_pandas()
    nurse = df[df.profession == 13]
    expected = sum((nurse[nurse.gender == g].sample(n=10, random_state=42).hard_text.tolist() for g in (0, 1)), [])
    assert [t for t, l in zip(*s["train"]) if l == "nurse"] == expected
    assert all(t.endswith(" of 13") for t, l in zip(*s["train"]) if l == "nurse")

    s = tasks.TASKS["ag_news"].load(40, 20, 42)
    assert Counter(s["train"][1]) == {c: 20 for c in tasks.AG_NEWS}
    df = fakes["fancyzhx/ag_news"]["test"].to_pandas()
    sports = df[df.label == 1].sample(n=10, random_state=42).text.tolist()
    assert [t for t, l in zip(*s["test"]) if l == "Sports"] == sports

    s = tasks.TASKS["europarl"].load(40, 20, 42)
    assert Counter(s["train"][1]) == {c: 20 for c in ("en", "fr", "de", "es", "nl")}
    assert all(t.startswith(l + " ") for split in s.values() for t, l in zip(*split))
    assert not set(s["train"][0]) & set(s["test"][0])


def test_bootstrap_f1_equals_a_naive_resampling_loop():
    """bootstrap_f1 weights each example by how often its text was drawn; the naive reference
    copies the examples that many times and scores them with scikit-learn, task by task, then
    aggregates like summarise (classes, then tasks of a group, then groups)."""
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(0)
    per_task = {}
    for t, (group, n) in enumerate([("a", 40), ("a", 30), ("b", 50)]):
        classes = []
        for c in range(3):
            idx = torch.randperm(n, generator=g)[:20]
            y = (torch.rand(20, generator=g) < 0.5).double()
            pred = torch.where(torch.rand(20, generator=g) < 0.7, y, 1 - y)
            classes.append((idx, y, pred))
        per_task[f"t{t}"] = (group, n, classes + [None])
    lo, hi = probe.bootstrap_f1(per_task, n_boot=200, seed=3)

    rng = torch.Generator().manual_seed(3)
    reps = []
    for _ in range(200):
        groups = {}
        for group, n, classes in per_task.values():
            drawn = torch.randint(n, (n,), generator=rng).tolist()
            f1s = []
            for idx, y, pred in classes[:3]:
                rows = [i for text in drawn for i, t in enumerate(idx.tolist()) if t == text]
                f1s.append(f1_score(y[rows].numpy(), pred[rows].numpy(), zero_division=0.0) if rows else 0.0)
            groups.setdefault(group, []).append(np.mean(f1s))
        reps.append(np.mean([np.mean(v) for v in groups.values()]))
    want = np.quantile(reps, [0.025, 0.975])
    assert lo == pytest.approx(want[0], abs=1e-12) and hi == pytest.approx(want[1], abs=1e-12)
    assert lo < hi


def test_percentile_interval_of_a_mean_matches_the_normal_approximation():

    x = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    reps = [x[torch.randint(400, (400,), generator=g)].mean().item() for _ in range(2000)]
    lo, hi = probe.percentile_interval(reps)
    half = 1.96 * x.std().item() / 20
    assert lo == pytest.approx(x.mean().item() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean().item() + half, abs=0.15 * half)


# ----------------------------------------------------------------------------------------
# Presets: quick defaults, --thorough = the earlier defaults (SAEBench's sizes), bars from the start
# ----------------------------------------------------------------------------------------

OLD_DEFAULTS = {"task": "all", "k": [1, 2, 5], "n_train": 4000, "n_test": 1000, "seed": 42, "device": "auto",
                "batch_size": 32, "context": None, "C": 1.0, "full": True, "raw": True, "out": None,
                "allow_incomplete": False, "bootstrap": 1000}
"""probe.py's flags before the quick defaults (the settings behind experiments/README.md's numbers)."""


def test_quick_defaults_and_thorough_restores_the_old_settings_exactly():
    quick = vars(probe.parse_args(["run"])[1])
    assert {k: quick[k] for k in ("n_train", "n_test", "full", "raw", "bootstrap")} == \
        {"n_train": 200, "n_test": 100, "full": False, "raw": False, "bootstrap": 200}
    thorough = vars(probe.parse_args(["run", "--thorough"])[1])
    assert {k: v for k, v in thorough.items() if k not in ("thorough", "quiet")} == OLD_DEFAULTS
    assert probe.parse_args(["run", "--thorough"])[1].preset == "thorough"
    assert probe.parse_args(["run"])[1].preset == "quick"
    # an explicit flag wins over either preset
    c = probe.parse_args(["run", "--thorough", "--no-full", "--n-test", "300"])[1]
    assert (c.full, c.n_test, c.raw, c.n_train) == (False, 300, True, 4000)
    c = probe.parse_args(["run", "--raw", "--bootstrap", "0"])[1]
    assert (c.raw, c.bootstrap, c.full) == (True, 0, False)


def test_a_bar_shows_before_the_lm_passes_and_the_preset_is_recorded(gpt2, tmp_path, monkeypatch, capsys):
    path, _, _ = gpt2
    torch.manual_seed(0)
    _save_run(sae.SAE(sae.SAEConfig(d_in=64, n_latents=128, k=8, input_scale=[1.5])), tmp_path / "s", [1], path)
    seen = []
    hidden_states = activations.hidden_states

    def first_pass(*args, **kwargs):           # what stderr held when the first LM pass over the texts began
        if not seen:
            seen.append(capsys.readouterr().err)
        return hidden_states(*args, **kwargs)

    monkeypatch.setattr(activations, "hidden_states", first_pass)
    assert probe.main([str(tmp_path / "s"), "--task", "us_places", "--n-train", "16", "--n-test", "8",
                       "--device", "cpu"]) == 0
    assert "LM pass us_places train" in seen[0]
    err = capsys.readouterr().err
    assert "probes us_places" in err and "bootstrap us_places" in err
    report = json.loads((tmp_path / "s" / "probe.json").read_text())
    assert report["preset"] == "quick" and report["settings"]["bootstrap"] == 200
    assert set(report["tasks"]["us_places"]["features"]) == {"sae"}           # no raw references, no full probe
    assert set(report["tasks"]["us_places"]["features"]["sae"]) == {"top_1", "top_2", "top_5"}
    assert probe.main([str(tmp_path / "s"), "--task", "us_places", "--n-train", "16", "--n-test", "8",
                       "--device", "cpu", "--quiet"]) == 0
    assert "LM pass" not in capsys.readouterr().err

"""features.py and dashboard.py on tiny runs of the four dictionary kinds (tiny random GPT-2, real tokenizer).

The selection is checked against a naive loop over the same held-out windows, the per-layer profile against
metrics.layer_deltas on the same tokens, the logit lens against LayerNorm written out, PolySAE's partners
against Θ2 built explicitly, and the page in headless Chromium when it is installed."""
import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch

from support import cache as activation_cache
from support import corpora
import activations
from latents import page as dashboard
from latents import features
import metrics
from support.saved import load_run
import train

KINDS = {"sae": [], "crosscoder": [], "fmxcoder": ["--rank", "16"], "polysae": ["--ranks", "32,8,8"]}
FLAGS = ["--tokens", "1536", "--eval-tokens", "512", "--batch-size", "128", "--n-latents", "64", "--k", "4",
         "--context", "32", "--layers", "0-2", "--dead-tokens", "1000", "--ckpt-every", "0", "--lr", "3e-3",
         "--drop-outliers", "0"]
SETTINGS = dict(top=6, samples=8, bands=2, per_band=2, left=4, right=2, pool=24, bins=20, fc_tokens=400,
                min_fires=3, logits=5, partners=3, inter_latents=64)
N_TOKENS = 800


@pytest.fixture(scope="module")
def runs(gpt2_dir, tmp_path_factory, device):
    root = tmp_path_factory.mktemp("feature-runs")
    for kind, extra in KINDS.items():
        train.train(train.parse_args(["--model", gpt2_dir, "--cache", str(root / "acts"), "--out", str(root / kind),
                                      "--dict", kind, "--device", str(device), *FLAGS, *extra]))
    return {kind: root / kind for kind in KINDS}


@pytest.fixture(scope="module")
def feats(runs, device):
    """features.json of every run, written by the command line (on the --device of pytest)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    out = {}
    for kind, run in runs.items():
        assert features.main([str(run), "--tokens", str(N_TOKENS), "--device", str(device), "--quiet", *flags]) == 0
        out[kind] = json.loads((run / "features.json").read_text())
    return out


def naive_pass(run):
    """Every held-out window read by features.py: token ids (−1 at padding), keep mask, raw hidden states,
    and the latents z (T, F) of each dictionary of the run, one window at a time."""
    entries = load_run(run)
    info = entries[0][2]["run"]
    all_layers = sorted({l for ls, _, _ in entries for l in ls})
    lm, tok = activations.load_lm(info["model"])
    windows = corpora.take_tokens(corpora.heldout_windows(tok, info["dataset"], "train", info["context"],
                                                          info["train_tokens"], 8), N_TOKENS)
    rows = []
    for w in windows:
        h = activations.hidden_states(lm, w["input_ids"], w["attention_mask"], all_layers).float()
        for b in range(len(h)):
            ids = w["input_ids"][b].masked_fill(w["attention_mask"][b] == 0, -1)
            zs = []
            for layers, model, _ in entries:
                model.eval()
                x = h[b][:, [all_layers.index(l) for l in layers]] * torch.tensor(model.config.input_scale)[:, None]
                with torch.no_grad():
                    z = model.encode(x if len(layers) > 1 else x[:, 0])
                zs.append(z * w["keep"][b][:, None])
            rows.append({"ids": ids, "keep": w["keep"][b], "h": h[b], "z": zs})
    return entries, rows


def snippet(values, t, left, right, fill):
    return [values[p] if 0 <= p < len(values) else fill for p in range(t - left, t + right + 1)]


@pytest.mark.parametrize("kind", ["crosscoder", "sae"])
def test_top_examples_density_histogram_and_pool_match_a_naive_loop(runs, feats, kind):
    entries, rows = naive_pass(runs[kind])
    f_json = feats[kind]
    n_tok = sum(int(r["keep"].sum()) for r in rows)
    assert f_json["tokens"] == n_tok == N_TOKENS and f_json["windows"] == len(rows)
    left, right, bins = SETTINGS["left"], SETTINGS["right"], SETTINGS["bins"]
    lo, hi = math.log10(features.HIST_LO), math.log10(features.HIST_HI)
    pool = f_json["pool"]
    for di, d in enumerate(f_json["dictionaries"]):
        for f in range(0, d["n_latents"], 7):
            r = d["latents"][f]
            cands = []                                    # (window max, window, argmax) of every firing window
            for wi, row in enumerate(rows):
                col = row["z"][di][:, f].clone()
                col[row["keep"].nonzero()[:1, 0]] = 0     # the window's first real token is never an example
                if col.max() > 0:
                    cands.append((col.max().item(), wi, int(col.argmax())))
            cands.sort(key=lambda c: -c[0])
            vals = torch.cat([row["z"][di][:, f] for row in rows])      # every token counts
            fired = vals[vals > 0].double().numpy()
            assert r["fires"] == len(fired) and r["density"] == pytest.approx(len(fired) / n_tok, rel=1e-3)
            if not len(fired):
                assert "top" not in r and r["max_act"] == 0
                continue
            assert r["mean_act"] == pytest.approx(fired.mean(), rel=1e-3)
            want_bins = np.clip(np.floor((np.log10(fired) - lo) / ((hi - lo) / bins)), 0, bins - 1).astype(int)
            assert r["hist"] == np.bincount(want_bins, minlength=bins).tolist()
            top = cands[:SETTINGS["top"]]
            np.testing.assert_allclose([e["act"] for e in r["top"]], [c[0] for c in top], rtol=1e-3)
            # the windows themselves (ties may come in any order)
            peak = {wi: (m, t) for m, wi, t in cands}
            assert len({e["window"] for e in r["top"]}) == len(top)
            for e in r["top"]:
                m, t = peak[e["window"]]
                assert e["act"] == pytest.approx(m, rel=1e-3)
                assert e["tokens"] == snippet(rows[e["window"]]["ids"].tolist(), t, left, right, -1)
                np.testing.assert_allclose(e["acts"], snippet(rows[e["window"]]["z"][di][:, f].tolist(), t, left,
                                                              right, 0.0), rtol=5e-3, atol=1e-6)   # 3 significant digits
            window_max = {c[1]: c[0] for c in cands}
            top_windows = {e["window"] for e in r["top"]}
            prev_hi = -1.0
            for band in r["quantiles"]:
                assert band["range"][0] >= prev_hi and band["range"][0] <= band["range"][1]
                prev_hi = band["range"][1]
                for e in band["examples"]:
                    assert e["window"] not in top_windows
                    assert e["act"] == pytest.approx(window_max[e["window"]], rel=1e-3)
            pool_want = [i for i, (wi, c) in enumerate(zip(pool["window"], pool["center"]))
                         if max(snippet(rows[wi]["z"][di][:, f].tolist(), c, left, right, 0.0)) > 0]
            assert r["pool_fires"] == pool_want
    for i, (wi, c) in enumerate(zip(pool["window"], pool["center"])):
        assert rows[wi]["keep"][c] and pool["tokens"][i] == snippet(rows[wi]["ids"].tolist(), c, left, right, -1)


def test_per_layer_profile_equals_metrics_deltas_on_the_cache_tokens(runs, feats):
    entries, rows = naive_pass(runs["crosscoder"])
    [(layers, model, meta)] = entries
    x_raw = torch.cat([row["h"][row["keep"]] for row in rows])[:SETTINGS["fc_tokens"]]
    cache = activation_cache.ActivationCache(meta["run"]["cache"])
    start = meta["run"]["train_tokens"]                  # the same tokens as the cache's held-out ones
    n = min(cache.n_tokens - start, len(x_raw))
    assert n > 100
    torch.testing.assert_close(x_raw[:n], cache.read(start, start + n), rtol=2e-3, atol=2e-3)
    dsum, fires = metrics.layer_deltas(model, x_raw * torch.tensor(model.config.input_scale)[:, None])
    delta = dsum / fires.clamp_min(1)[:, None]
    fc = metrics.spread(delta)
    lat = feats["crosscoder"]["dictionaries"][0]["latents"]
    np.testing.assert_allclose([r["layer_delta"] for r in lat], delta.numpy(), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose([r["decoder_norms"] for r in lat], model.decoder_norms().detach().numpy(), rtol=1e-3)
    for r, v, n in zip(lat, fc.tolist(), fires.tolist()):
        assert r["fc"] is None if n < SETTINGS["min_fires"] else r["fc"] == pytest.approx(v, rel=1e-3)
    assert feats["crosscoder"]["dictionaries"][0]["fc_tokens"] == SETTINGS["fc_tokens"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_json_and_page_for_every_kind(runs, feats, kind):
    f_json, run = feats[kind], runs[kind]
    entries = load_run(run)
    lm, _ = activations.load_lm(f_json["model"])
    assert [d["layers"] for d in f_json["dictionaries"]] == [e[0] for e in entries]
    for d, (layers, model, meta) in zip(f_json["dictionaries"], entries):
        assert d["kind"] == kind and d["n_latents"] == len(d["latents"]) == 64
        assert d["alive"] == sum(r["fires"] > 0 for r in d["latents"]) > 0
        for r in d["latents"]:
            assert len(r["promoted"]) == len(r["suppressed"]) == SETTINGS["logits"]
            assert ("layer_delta" in r) == (kind in ("crosscoder", "fmxcoder"))
            if kind in ("crosscoder", "fmxcoder"):
                assert len(r["layer_delta"]) == len(r["decoder_norms"]) == 3
        # the logit lens, written out: GPT-2's ln_f is a LayerNorm, W_U the tied embedding
        dvec = model.decoder_vectors().detach()
        dvec = (dvec[:, -1] if dvec.ndim == 3 else dvec) / model.config.input_scale[-1]
        ln = lm.transformer.ln_f
        u = (dvec - dvec.mean(-1, keepdim=True)) / (dvec.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        logits = (u * ln.weight.detach()) @ lm.transformer.wte.weight.detach().T
        for f in (0, 17):
            assert [i for i, _ in d["latents"][f]["promoted"]] == logits[f].topk(SETTINGS["logits"]).indices.tolist()
            assert [i for i, _ in d["latents"][f]["suppressed"]] == (-logits[f]).topk(SETTINGS["logits"]).indices.tolist()
        if kind == "polysae":                           # Θ2[i, j, :] = Σ_r U_ir U_jr C2[:, r], built explicitly
            r2 = model.config.ranks[1]
            theta = torch.einsum("ir,jr,dr->ijd", model.U[:, :r2], model.U[:, :r2], model.C2).detach().norm(dim=-1)
            alive = torch.tensor([r["fires"] > 0 for r in d["latents"]])
            for r in [r for r in d["latents"] if r["fires"]][:5]:
                w = theta[r["id"]].masked_fill(~alive, -1).index_fill(0, torch.tensor(r["id"]), -1)
                assert [j for j, _ in r["partners"]] == w.topk(SETTINGS["partners"]).indices.tolist()
    page = (run / "features.html").read_text()
    assert "src=" not in page and "<link" not in page and "@import" not in page   # self-contained
    data = page.split('<script type="application/json" id="data">')[1].split("</script>")[0]
    assert json.loads(data)["features"] == f_json


def test_errors_are_one_line_before_any_work(runs, tmp_path, capsys):
    assert features.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no config.json" in err and err.count("\n") == 1
    assert features.main([str(runs["sae"]), "--top", "0"]) == 2
    assert "--top must be a positive integer" in capsys.readouterr().err


def test_page_in_headless_chromium(feats, runs, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no browser: apt-get install chromium chromium-driver (Debian) to run this test")
    page = runs["sae"] / "features.html"
    d0 = feats["sae"]["dictionaries"][0]
    with dashboard.Browser() as b:
        b.get(page.resolve().as_uri())
        rows = b.find("#latents tbody tr")
        assert len(rows) == d0["alive"]                 # the list renders: every live latent of layer 0
        first = b.run("return document.querySelector('#latents tbody tr').dataset.id")
        assert int(first) == max(d0["latents"], key=lambda r: (r["max_act"], -r["id"]))["id"]  # max act, descending
        b.click(rows[0])
        assert b.text(b.find("#card h2")[0]) == f"latent {first}"
        assert len(b.find("#card .ex")) >= len(d0["latents"][int(first)]["top"])   # highlighted contexts
        assert b.find("#card .peak") and b.find("#card svg rect")
        b.click(b.find('#latents th[data-key="density"]')[0])        # sort by density, descending
        first = int(b.run("return document.querySelector('#latents tbody tr').dataset.id"))
        assert d0["latents"][first]["density"] == max(r["density"] for r in d0["latents"])
        b.run("const s = document.getElementById('dict'); s.value = '2'; s.onchange();")
        assert b.run("return document.querySelectorAll('#latents tbody tr').length") == feats["sae"]["dictionaries"][2]["alive"]
        png = b.screenshot()
    (tmp_path / "page.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_intervene_adds_each_latents_ablation_in_its_top_contexts(runs, tmp_path, device):
    """--intervene: every live latent gets the tokens its ablation changes most at the peaks of its first top
    contexts (those of features.json, cut after the peak), equal to intervene.intervened on each context alone;
    the page shows them next to the logit lens."""
    from latents import intervene

    run = tmp_path / "cc"
    shutil.copytree(runs["crosscoder"], run)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    assert features.main([str(run), "--tokens", str(N_TOKENS), "--device", str(device), "--quiet", *flags,
                          "--intervene", "--intervene-contexts", "2"]) == 0
    f_json = json.loads((run / "features.json").read_text())
    d = f_json["dictionaries"][0]
    assert f_json["settings"]["intervene"] and f_json["settings"]["intervene_contexts"] == 2
    for r in d["latents"]:
        assert ("intervention" in r) == (r["fires"] > 0)
        if r["fires"]:
            assert r["intervention"]["contexts"] == min(2, len(r["top"]))
            assert len(r["intervention"]["promoted"]) == len(r["intervention"]["suppressed"]) == SETTINGS["logits"]
            assert all(str(i) in f_json["vocab"] for i, _ in r["intervention"]["promoted"])
    lm, tok = activations.load_lm(f_json["model"], device=device)
    (layers, model, _), = load_run(run, device)
    tg = intervene.targets([(layers, model, {})])
    for r in [r for r in d["latents"] if r["fires"]][:3]:
        drops = []
        for e in r["top"][:2]:
            row = [i for i in e["tokens"][:e["peak"] + 1] if i >= 0]
            row = row if row[0] == tok.bos_token_id else [tok.bos_token_id] + row
            clean, edited, _, _ = intervene.intervened(lm, intervene.prompt_batch(tok, row), tg,
                                                       intervene.Intervention([r["id"]], ablate=True))
            drops.append(clean[0, -1].double().softmax(-1) - edited[0, -1].double().softmax(-1))
        mean = torch.stack(drops).mean(0).cpu()
        assert [i for i, _ in r["intervention"]["promoted"]] == mean.topk(SETTINGS["logits"]).indices.tolist()
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no browser: apt-get install chromium chromium-driver (Debian) to check the page")
    live = max(d["latents"], key=lambda r: (r["max_act"], -r["id"]))
    with dashboard.Browser() as b:
        b.get((run / "features.html").resolve().as_uri())
        b.click(b.find("#latents tbody tr")[0])
        assert b.text(b.find("#card h2")[0]) == f"latent {live['id']}"
        assert "ablated in 2 top contexts" in b.text(b.find("#card h3.iv")[0])


def test_screenshot_opens_a_latent_beyond_the_list_and_names_the_range(feats, runs, tmp_path):
    """--latent N for a latent the list does not show (a dead one: hidden unless "dead latents" is ticked, as
    the 401st of a long list is) opens its card from features.json; an id the page does not hold is refused
    with the ids it does hold."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no browser: apt-get install chromium chromium-driver (Debian) to run this test")
    f = copy.deepcopy(feats["sae"])
    d0 = f["dictionaries"][0]
    hidden = d0["latents"][5]
    hidden.update(fires=0, density=0.0)                   # dead: not in the list unless "dead latents" is ticked
    for key in ("top", "quantiles"):
        hidden.pop(key, None)
    page = tmp_path / "features.html"
    dashboard.write_page(f, page)
    assert dashboard.screenshot(page, tmp_path / "first.png") != "latent 5"      # the list's first row
    assert dashboard.screenshot(page, tmp_path / "dead.png", latent=5) == "latent 5"
    assert (tmp_path / "dead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = d0["n_latents"]
    with pytest.raises(ValueError, match=f"no latent {n} in .*has latents 0 to {n - 1}"):
        dashboard.screenshot(page, tmp_path / "none.png", latent=n)


def test_quick_defaults_and_thorough_restores_the_old_settings():
    """features.py's quick defaults, and --thorough = the earlier defaults (--tokens 100,000, --fc-tokens 20,000,
    the rest unchanged); an explicit flag wins over either."""
    quick, thorough = features.parse_args(["run"]), features.parse_args(["run", "--thorough"])
    assert (quick.tokens, quick.fc_tokens, quick.preset) == (30_000, 10_000, "quick")
    assert (thorough.tokens, thorough.fc_tokens, thorough.preset) == (100_000, 20_000, "thorough")
    old = dict(top=16, samples=32, bands=4, per_band=2, left=16, right=8, pool=256, bins=50, fc_tokens=20_000,
               min_fires=10, logits=10, partners=5, inter_latents=1024, intervene=False, intervene_contexts=4, seed=0)
    assert {k: getattr(thorough, k) for k in old} == old and thorough.lm_batch == 8
    a = features.parse_args(["run", "--thorough", "--tokens", "5000"])
    assert (a.tokens, a.fc_tokens) == (5000, 20_000)

"""experiments/paper_gpu.py rehearsed on the CPU (--smoke): every step the GPU run makes (four dictionaries
from one stream of a pre-tokenised corpus, a time limit, curves at step 0, metrics with every FC reading,
probing with intervals, the collected results), so the one GPU try cannot fail on a typo."""
import json
import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import metrics
from support import corpora

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import corpus_large  # noqa: E402
import paper_gpu  # noqa: E402


@pytest.fixture(scope="module")
def corpus(gpt2_dir, tmp_path_factory):
    """A small pre-tokenised corpus (BBC articles) for the tiny GPT-2, written as corpus_large writes one."""
    texts, _ = corpora.bbc_news()
    out = tmp_path_factory.mktemp("corpus") / "bbc.gpt2.u16"
    corpus_large.write_tokens([("bbc", t) for t in texts[:120]], AutoTokenizer.from_pretrained(gpt2_dir), "gpt2", out)
    return out


def test_the_paper_run_rehearsed_at_tiny_width(gpt2_dir, corpus, tmp_path):
    out = tmp_path / "out"
    runs = tmp_path / "runs"
    assert paper_gpu.main([str(out), "--smoke", "--runs", str(runs), "--model", gpt2_dir, "--dataset", str(corpus)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in res["log"]] == ["train"] + [f"{w} {n}" for n in ("crosscoder", "masked", "tr", "cp")
                                                          for w in ("metrics", "probe")]
    assert all(s["exit"] == 0 for s in res["log"])
    for name, d in res["dictionaries"].items():
        assert d["summary"]["complete"] and d["summary"]["tokens"] > 0, name
        [ev] = d["eval"]["results"]
        assert 0 < ev["fvu"] < 2 and len(ev["fc_readings"]) == len(metrics.FC_READINGS) and "norm_spread_mean" in ev
        assert d["probe"]["mean_ci"] and d["probe"]["weights_sha256"]
    run = json.loads((runs / "summary.json").read_text())
    assert run["time_limit_reached"] or run["data_exhausted"]
    curves = [json.loads(l) for l in (out / "curves.jsonl").read_text().splitlines()]
    assert {c["dictionary"] for c in curves if c["step"] == 0} == {"crosscoder", "masked", "tr", "cp"}
    assert all("fc_readings" in c["eval"]["all"] for c in curves)
    sizes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    assert sizes < 16 * 2**20                                          # small enough to come back from the GPU


def test_a_rehearsal_never_replaces_the_real_run(gpt2_dir, corpus, tmp_path, capsys):
    """--runs holding a run is refused before anything runs unless --overwrite (it used to be passed always, so
    a --smoke after the real run deleted it); an OUT that is a file is one line too."""
    import train
    from test_faults3 import snapshot

    runs = tmp_path / "runs"
    assert train.main(["--model", gpt2_dir, "--dataset", str(corpus), "--layers", "0-3", "--tokens", "512",
                       "--eval-tokens", "256", "--batch-size", "128", "--n-latents", "64", "--k", "4", "--context",
                       "64", "--cache", "none", "--dict", "crosscoder", "--out", str(runs), "--device", "cpu"]) == 0
    before = snapshot(runs)
    capsys.readouterr()
    argv = ["--smoke", "--runs", str(runs), "--model", gpt2_dir, "--dataset", str(corpus)]
    assert paper_gpu.main([str(tmp_path / "out"), *argv]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --runs {str(runs)!r} already holds a run: pass --overwrite to "
                                               f"replace it, or choose another --runs")
    (tmp_path / "file").write_text("x")
    assert paper_gpu.main([str(tmp_path / "file"), *argv, "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == f"error: OUT {str(tmp_path / 'file')!r} is a file: pass a folder for the results"
    assert snapshot(runs) == before and not (tmp_path / "out").exists()


def test_the_smoke_fits_its_fmxcoder_ranks_to_the_model_width(gpt2_dir, tmp_path, monkeypatch):
    """--smoke's CP rank 64 is below SmolLM2's width 576, which train.py refuses: the CP rank follows the LM's width
    (read from its config: here a small GPT-2 of width 320) and F the CP rank (F·L >= R), and every dictionary's
    flags are then accepted."""
    import probe
    import train
    from support import evaluate
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=320, n_layer=4, n_head=4, n_inner=16, vocab_size=64, n_positions=128)
                    ).save_pretrained(tmp_path / "wide")                      # (7 MB: its width is what counts)
    for f in Path(gpt2_dir).iterdir():                                         # and GPT-2's tokenizer
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, tmp_path / "wide" / f.name)
    seen = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(evaluate, "main", lambda argv: 0)
    monkeypatch.setattr(probe, "main", lambda argv: 0)
    monkeypatch.setattr(paper_gpu, "figure", lambda curves, path: None)          # (no curves to draw)
    assert paper_gpu.main([str(tmp_path / "out"), "--smoke", "--runs", str(tmp_path / "runs"), "--model",
                           str(tmp_path / "wide")]) == 0
    [argv] = seen
    cfg = train.parse_args(argv)
    configs = train.dictionary_configs(cfg, 320, [0, 1, 2, 3])          # raises for ranks that cannot be
    assert {k[0]: (c.rank, c.n_latents) for k, (_, c) in configs.items() if k[0] in ("tr", "cp")} == \
        {"tr": (32, 80), "cp": (320, 80)}
    assert paper_gpu.fit_to_width(paper_gpu.PAPER, 576, 8) == {"cp_rank": 768, "tr_rank": 32, "n_latents": 16384}
    assert paper_gpu.fit_to_width(paper_gpu.SMOKE, 576, 4) == {"cp_rank": 576, "tr_rank": 32, "n_latents": 144}
    assert paper_gpu.fit_to_width(paper_gpu.SMOKE, 2048, 4)["tr_rank"] == 46                 # 46² ≥ 2048 > 45²

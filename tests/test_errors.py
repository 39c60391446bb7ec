"""Bad input to metrics.py, probe.py and activations.py: one line naming the file and the fix, exit
code 2 for the command lines, no traceback, and nothing written or changed."""
import json
import shutil
from pathlib import Path

import pytest

import activations as A
from support import cache as activation_cache
from support import corpora
from support import evaluate
import probe
from support import tasks
from support import saved


def snapshot(folder) -> dict:
    """Every file under `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(gpt2_dir, tmp_path_factory):
    """A tiny per-layer SAE run (layer_1/) trained by train.py, with its activation cache."""
    import train

    base = tmp_path_factory.mktemp("errors")
    train.train(train.parse_args([
        "--model", gpt2_dir, "--dict", "sae", "--layers", "1", "--tokens", "512", "--eval-tokens", "256",
        "--batch-size", "128", "--n-latents", "32", "--k", "4", "--context", "32", "--cache", str(base / "cache"),
        "--out", str(base / "run"), "--device", "cpu", "--dead-tokens", "1000", "--ckpt-every", "0"]))
    return base / "run"


@pytest.fixture
def run(good_run, tmp_path):
    """A copy of the good run to damage."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def edit_json(path, change):
    meta = json.loads(Path(path).read_text())
    change(meta)
    Path(path).write_text(json.dumps(meta))


def cli_error(main, argv, capsys) -> str:
    """Run a CLI main that must fail: exit code 2 and one line `error: ...` on stderr, returned."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


RERUN = saved.RERUN

# each: (damage to the copied run, words the message must hold, the file it must name)
DAMAGE = {
    "config not JSON": (lambda r: _truncate(r / "layer_1/config.json"), ["is not valid JSON", RERUN],
                        "layer_1/config.json"),
    "config without kind": (lambda r: edit_json(r / "layer_1/config.json", lambda m: m.pop("kind")),
                            ['has no "kind" (or "class") and "config" entries', RERUN], "layer_1/config.json"),
    "kind unknown": (lambda r: edit_json(r / "layer_1/config.json", lambda m: m.update({"kind": "transcoder"})),
                     ["names the kind 'transcoder'", "does not know", "one of sae, crosscoder"], "layer_1/config.json"),
    "old class unknown": (lambda r: edit_json(r / "layer_1/config.json",
                                              lambda m: (m.pop("kind"), m.update({"class": "sae.NoSAE"}))),
                          ["names the class 'sae.NoSAE'", "does not know", RERUN], "layer_1/config.json"),
    "config field unknown": (lambda r: edit_json(r / "layer_1/config.json", lambda m: m["config"].update(width=3)),
                             ["does not fit a sae", "width", "another version"], "layer_1/config.json"),
    "weights truncated": (lambda r: _truncate(r / "layer_1/model.safetensors"), ["is truncated or damaged", RERUN],
                          "layer_1/model.safetensors"),
    "weights missing": (lambda r: (r / "layer_1/model.safetensors").unlink(), ["is missing", RERUN],
                        "layer_1/model.safetensors"),
    "weights of another shape": (lambda r: edit_json(r / "layer_1/config.json",
                                                     lambda m: m["config"].update(n_latents=48)),
                                 ["do not fit their config.json", "size mismatch", RERUN], "run"),
    "no run entry": (lambda r: edit_json(r / "layer_1/config.json", lambda m: m.pop("run")),
                     ["has no run.model", "not a folder written by train.py"], "run"),
    "interrupted (summary.json)": (lambda r: edit_json(r / "summary.json",
                                                       lambda m: m.update(complete=False, steps_planned=10)),
                                   ["interrupted run (training stopped after 4 of 10 steps)", "--resume",
                                    "--allow-incomplete"], "run"),
    "interrupted (config.json)": (lambda r: edit_json(r / "layer_1/config.json",
                                                      lambda m: m["metrics"].update(complete=False)),
                                  ["interrupted run", "after 4 of 4 steps", "--resume", "--allow-incomplete"], "run"),
    "no run in the folder": (lambda r: shutil.rmtree(r / "layer_1"), ["holds no run", "train.py --out"], "run"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("cli", ["metrics", "probe"])
def test_a_damaged_run_is_one_line_naming_the_file(run, capsys, cli, damage):
    change, words, names = DAMAGE[damage]
    change(run)
    before = snapshot(run)
    argv = [str(run), "--device", "cpu"] + (["--task", "us_places"] if cli == "probe" else [])
    line = cli_error(evaluate.main if cli == "metrics" else probe.main, argv, capsys)
    assert all(w in line for w in words), line
    assert str(run / names) in line if names != "run" else repr(str(run)) in line
    assert snapshot(run) == before                          # no eval.json / probe.json, nothing changed


def test_a_run_without_the_complete_field_is_accepted_and_allow_incomplete_evaluates(run):
    assert saved.check_run(run)                          # written before "complete" existed
    edit_json(run / "summary.json", lambda m: m.update(complete=False))
    assert evaluate.main([str(run), "--device", "cpu", "--ce-tokens", "0", "--fc-tokens", "0",
                         "--wasserstein", "", "--allow-incomplete"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    trained = json.loads((run / "layer_1/config.json").read_text())["metrics"]["eval"]
    assert ev["results"][0]["fvu"] == pytest.approx(trained["fvu"], rel=1e-3)   # the run's own held-out tokens
    assert probe.main([str(run), "--device", "cpu", "--task", "us_places", "--n-train", "16", "--n-test", "8",
                       "--k", "1", "--no-full", "--no-raw", "--allow-incomplete"]) == 0
    assert json.loads((run / "probe.json").read_text())["tasks"]["us_places"]["features"]["sae"]
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]    # the atomic writes left no temp file


def test_missing_folder_file_and_bad_flags(run, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert f"run folder {str(missing)!r} does not exist" in cli_error(evaluate.main, [str(missing)], capsys)
    assert f"run folder {str(missing)!r} does not exist" in cli_error(probe.main, [str(missing)], capsys)
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_error(evaluate.main, [str(tmp_path / "file")], capsys)
    before = snapshot(run)
    for argv, words in [
        (["--pairs", "abc"], "argument --pairs: expected an integer like 300000000 or 3e8, got 'abc'"),
        (["--ce-tokens", "-1"], "--ce-tokens must be at least 0, got -1"),
        (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--wasserstein", "nope"], "unknown task 'nope'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ]:
        assert words in cli_error(evaluate.main, [str(run), *argv], capsys)
    for argv, words in [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--k", "1,x"], "argument --k: expected an integer or comma-separated integers like 1,2,5, got '1,x'"),
        (["--n-train", "1"], "--n-train must be at least 2, got 1"),
        (["--C", "0"], "--C must be positive"),
        (["--out", str(tmp_path / "file" / "probe.json")], f"cannot write into {str(tmp_path / 'file')!r}"),
    ]:
        assert words in cli_error(probe.main, [str(run), "--task", "us_places", "--device", "cpu", *argv], capsys)
    assert snapshot(run) == before


def test_metrics_checks_every_run_before_evaluating_the_first(run, tmp_path, capsys):
    line = cli_error(evaluate.main, [str(run), str(tmp_path / "gone")], capsys)
    assert str(tmp_path / "gone") in line and not (run / "eval.json").exists()


def test_a_damaged_earlier_probe_json_is_kept(run, capsys):
    (run / "probe.json").write_text('{"tasks": {"bbc_topic": ')
    before = snapshot(run)
    line = cli_error(probe.main, [str(run), "--task", "us_places", "--device", "cpu"], capsys)
    assert f"{str(run / 'probe.json')!r} is not valid JSON" in line and "--out" in line
    assert snapshot(run) == before


def test_metrics_names_a_damaged_cache_of_the_run(run, tmp_path, capsys):
    cache = Path(shutil.copytree(json.loads((run / "layer_1/config.json").read_text())["run"]["cache"],
                                 tmp_path / "cache"))
    edit_json(run / "layer_1/config.json", lambda m: m["run"].update(cache=str(cache)))
    _truncate(cache / "acts_00000.bin")
    before = snapshot(tmp_path)
    line = cli_error(evaluate.main, [str(run), "--device", "cpu", "--wasserstein", ""], capsys)
    assert f"activation cache {str(cache)!r} is damaged: shard acts_00000.bin holds" in line
    assert "delete the folder to rebuild it" in line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------
# activations.py: the cache, local text files, hub errors, model folders
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    return A.load_lm(gpt2_dir)


@pytest.fixture
def cache(gpt2_dir, lm, tmp_path, monkeypatch):
    """A 3-shard cache (120 tokens per shard) of layers 1 and 2."""
    monkeypatch.setattr(activation_cache, "SHARD_BYTES", 120 * 2 * 64 * 2)
    return activation_cache.build_cache(tmp_path / "cache", gpt2_dir, "1,2", n_tokens=300, context=32, model=lm[0],
                         tokenizer=lm[1]).path


def _edit_n_tokens(meta):
    meta["n_tokens"] += 1


CACHE_DAMAGE = {
    "meta.json truncated": (lambda c: _truncate(c / "meta.json"), "meta.json is not valid JSON, truncated?"),
    "shard cut in half": (lambda c: _truncate(c / "acts_00001.bin"),
                          "shard acts_00001.bin holds 15,360 bytes, not the 30,720 of 120 tokens × 2 layers × 64 × 2 bytes"),
    "shard deleted": (lambda c: (c / "acts_00002.bin").unlink(), "shard acts_00002.bin is missing"),
    "number edited": (lambda c: edit_json(c / "meta.json", _edit_n_tokens),
                      "meta.json does not match its checksum meta_sha256"),
    "number edited, no checksum": (lambda c: edit_json(c / "meta.json", lambda m: (m.pop("meta_sha256"),
                                                                                     _edit_n_tokens(m))),
                                   "shards hold 300 tokens, its n_tokens says 301"),
    "field missing, no checksum": (lambda c: edit_json(c / "meta.json", lambda m: (m.pop("meta_sha256"),
                                                                                     m.pop("d"))),
                                   "meta.json has no int 'd' (got None)"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_damaged_cache_names_its_folder_and_the_fix(cache, gpt2_dir, monkeypatch, damage):
    activation_cache.ActivationCache(cache).read(0, 300)                       # intact: opens and reads
    change, words = CACHE_DAMAGE[damage]
    change(cache)
    before = snapshot(cache)
    monkeypatch.setattr(A, "load_lm", lambda *a, **k: pytest.fail("must not harvest over a damaged cache"))
    for open_it in (lambda: activation_cache.ActivationCache(cache),
                    lambda: activation_cache.build_cache(cache, gpt2_dir, "1,2", n_tokens=300, context=32)):
        with pytest.raises(ValueError) as e:
            open_it()
        msg = str(e.value)
        assert msg.startswith(f"activation cache {str(cache)!r} is damaged: ") and words in msg, msg
        assert msg.endswith("delete the folder to rebuild it, or pass another --cache") and "\n" not in msg
    assert snapshot(cache) == before


def test_an_old_cache_without_checksum_opens_and_a_slice_gets_its_own(cache, tmp_path):
    edit_json(cache / "meta.json", lambda m: m.pop("meta_sha256"))
    assert activation_cache.ActivationCache(cache).n_tokens == 300
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    from slice_cache import slice_cache

    sliced = activation_cache.ActivationCache(slice_cache(cache, tmp_path / "slice", 2))
    assert sliced.meta["meta_sha256"] == activation_cache.meta_checksum(sliced.meta)
    assert (sliced.read(0, 300) == activation_cache.ActivationCache(cache).read(0, 300)[:, 1:]).all()


@pytest.mark.parametrize("name,content,words", [
    ("data.bin.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text: it holds NUL bytes"),
    ("latin1.txt", "café crème".encode("latin-1"), "is not UTF-8 text (byte 3: invalid continuation byte)"),
    ("rows.jsonl", b'{"text": "one"}\n{"text": "two"\n', "line 2 is not JSON"),
    ("rows.jsonl", b'{"body": "one"}\n', "line 1 has no text field 'text' (fields: ['body'])"),
])
def test_a_bad_local_dataset_file_is_named_before_harvesting(tmp_path, name, content, words):
    f = tmp_path / "docs" / name
    f.parent.mkdir()
    (tmp_path / "docs" / "good.txt").write_text("A fine document.")
    f.write_bytes(content)
    for spec in (str(f), str(f.parent), str(f.parent / "*")):
        with pytest.raises(ValueError) as e:
            corpora.load_texts(spec)                                 # at the call, not when iterated
        assert f"dataset file {str(f)!r} " in str(e.value) and words in str(e.value)


def test_a_bad_byte_after_the_checked_head_is_named_when_read(tmp_path):
    f = tmp_path / "long.txt"
    f.write_bytes(b"word " * (corpora.TEXT_CHECK_BYTES // 5 + 10) + b"\xff")
    texts = corpora.load_texts(str(f))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        next(texts)


def test_local_dataset_paths_that_do_not_exist(tmp_path):
    for spec in (str(tmp_path / "nope"), "./no-such-corpus", "corpus.jsonl"):
        with pytest.raises(ValueError, match=f"dataset file or folder {spec!r} does not exist"):
            corpora.load_texts(spec)
    with pytest.raises(ValueError, match="dataset name is empty"):
        corpora.load_texts("")
    (tmp_path / "u.txt").write_text("café", encoding="utf-8")
    assert list(corpora.load_texts(str(tmp_path / "u.txt"))) == ["café"]


def test_hub_errors_keep_their_cause_and_bugs_propagate(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def not_found(*a, **k):
        raise DatasetNotFoundError("Dataset 'org/gone' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(ValueError) as e:
        corpora.load_texts("org/gone")
    assert str(e.value).startswith("cannot load dataset 'org/gone'") and "DatasetNotFoundError" in str(e.value)
    assert isinstance(e.value.__cause__, DatasetNotFoundError)
    with pytest.raises(tasks.TaskUnavailable) as e:
        tasks.TASKS["ag_news"].load(40, 20, 0)
    assert isinstance(e.value.__cause__, DatasetNotFoundError) and "bbc_topic" in str(e.value)

    def bug(*a, **k):
        return 1 / 0

    monkeypatch.setattr(datasets, "load_dataset", bug)
    with pytest.raises(ZeroDivisionError):
        corpora.load_texts("org/any")
    with pytest.raises(ZeroDivisionError):
        tasks.TASKS["ag_news"].load(40, 20, 0)


def test_a_model_folder_without_model_weights_or_tokenizer(gpt2_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"folder {str(empty)!r} holds no Hugging Face model \\(no config.json\\)"):
        A.load_lm(str(empty))
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(Path(gpt2_dir, "config.json"), only_config)
    with pytest.raises(ValueError, match="has a config.json but no weights"):
        A.load_lm(str(only_config))
    shutil.copy(Path(gpt2_dir, "model.safetensors"), only_config)
    with pytest.raises(ValueError, match="has a model but no tokenizer"):
        A.load_lm(str(only_config))
    (only_config / "config.json").write_text('{"model_type": ')
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        A.load_lm(str(only_config))

"""Faults of the third round (issue 31): each case, its exact one-line message, and that nothing was lost
(the files still there, the good checkpoint still loading, every JSON file valid). Tiny GPT-2 runs of a
second or so each."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import cache as activation_cache
from support import runs, saved
from support import evaluate
import train
from test_faults import QUICK_METRICS, error_of, flags

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder) -> dict:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(gpt2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("acts") / "c"
    activation_cache.build_cache(path, gpt2_dir, [0, 1, 2, 3], n_tokens=2048, context=64, multi=True, drop_outliers=10.0)
    return path


# ----------------------------------------------------------------------------------------
# 1. --overwrite deletes only a run; --out is a folder of its own
# ----------------------------------------------------------------------------------------


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(gpt2_dir, cache, tmp_path, capsys):
    docs = tmp_path / "mydocs"
    (docs / "photos").mkdir(parents=True)
    (docs / "thesis.txt").write_text("four years")
    (docs / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(docs)
    want = (f"error: --out {str(docs)!r} holds files that train.py did not write (photos/, thesis.txt): a run folder "
            f"is replaced as a whole (--overwrite deletes only a run), so choose a new or empty --out")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert error_of(capsys, train.main(flags(gpt2_dir, cache, docs, *extra))) == want
    assert snapshot(docs) == before
    run = tmp_path / "run"                                      # a run with a file of the user's added to it
    assert train.main(flags(gpt2_dir, cache, run)) == 0
    (run / "notes.md").write_text("mine")
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, run, "--overwrite")))
    assert line.startswith(f"error: --out {str(run)!r} holds files that train.py did not write (notes.md): ")
    assert (run / "notes.md").read_text() == "mine" and saved.load(run)


def test_out_must_be_a_folder_of_its_own(gpt2_dir, cache, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src.py").write_text("code")
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main")
    before = snapshot(repo)
    monkeypatch.chdir(repo)
    tail = "train.py replaces its run folder as a whole, so the run needs a folder of its own, e.g. --out runs/latest"
    for out, what, extra in ((".", "the current folder", "--overwrite"), (str(repo), "the current folder", "--overwrite"),
                             ("..", "a folder above the current one", "--overwrite"),   # (all inside tmp_path)
                             ("/", "the root folder", "--no-overwrite"), (str(Path.home()), "your home folder",
                                                                          "--no-overwrite")):
        line = error_of(capsys, train.main(flags(gpt2_dir, cache, out, extra)))
        assert line == f"error: --out {out!r} is {what}: {tail}"
    assert error_of(capsys, train.main(flags(gpt2_dir, cache, "", "--overwrite"))) == \
        "error: --out is empty: name the run folder, e.g. --out runs/latest"
    monkeypatch.chdir(tmp_path)
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, repo, "--overwrite")))   # a repository's root
    assert line.startswith(f"error: --out {str(repo)!r} holds files that train.py did not write (.git/, src.py): ")
    assert snapshot(repo) == before


def test_overwrite_replaces_a_set_and_an_interrupted_run_with_its_results(gpt2_dir, cache, tmp_path, ctrl_c_at):
    out = tmp_path / "set"
    assert train.main(flags(gpt2_dir, cache, out, "--dict", "sae")) == 0        # crosscoder/ and sae/layer_<l>/
    assert evaluate.main([str(out / "sae"), *QUICK_METRICS]) == 0
    (out / "sae" / "layer_1" / "features.html").write_text("{}")
    assert runs.foreign_entries(out) == []
    ctrl_c_at(3)
    assert train.main(flags(gpt2_dir, cache, out, "--overwrite")) == 130
    ctrl_c_at(None)
    assert train.main(flags(gpt2_dir, cache, out, "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "model.safetensors",
                                                     "summary.json"]


# ----------------------------------------------------------------------------------------
# 3. A dictionary's name never collides with the run folder's own files
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["checkpoint.pt", "summary.json", "curve.jsonl", "layer_12", "Config.json", "eval.json"])
def test_a_name_the_run_folder_uses_is_refused_before_any_work(gpt2_dir, cache, tmp_path, capsys, name):
    out = tmp_path / "run"
    for extra in ([], ["--resume"]):
        line = error_of(capsys, train.main(flags(gpt2_dir, cache, out, "--name", name, "--dict", "sae", *extra)))
        assert line == (f"error: --name {name!r} is the name of a file or folder the run folder holds (config.json, "
                        f"model.safetensors, summary.json, checkpoint.pt, curve.jsonl, eval.json, probe.json, "
                        f"features.json, features.html, autointerp.json, autointerp_cache.jsonl, wandb.json, layer_<l>): choose "
                        f"another")
    assert sorted(p.name for p in tmp_path.iterdir()) == []              # nothing trained, nothing hidden left
    for name, want in ((".", "must start with a letter or digit"), ("..", "must start with a letter or digit")):
        assert want in error_of(capsys, train.main(flags(gpt2_dir, cache, out, "--name", name, "--dict", "sae")))


# ----------------------------------------------------------------------------------------
# 4. A diverged run never replaces the last good checkpoint
# ----------------------------------------------------------------------------------------


def test_nan_weights_never_replace_the_last_good_checkpoint(gpt2_dir, cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, out, "--lr", "1e30", "--log-every", "25")))
    assert line == (f"error: the training diverged: model 'all', W_dec holds nan or inf at step 4, so "
                    f"{str(out / 'checkpoint.pt')!r} was not replaced (no checkpoint was saved); lower --lr (it is "
                    f"1e+30) or check the activations")
    assert not out.exists()
    real = train.get_lr                                     # finite up to the step-4 checkpoint, then diverging
    monkeypatch.setattr(train, "get_lr", lambda s, cfg, total: real(s, cfg, total) * (1 if s < 4 else 1e30))
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, out, "--log-every", "25")))
    assert line == (f"error: the training diverged: model 'all', W_dec holds nan or inf at step 8, so "
                    f"{str(out / 'checkpoint.pt')!r} was not replaced (it keeps step 4); lower --lr (it is 0.003) or "
                    f"check the activations")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and runs.first_nonfinite(state) is None
    monkeypatch.setattr(train, "get_lr", real)              # the good checkpoint resumes
    assert train.main(flags(gpt2_dir, cache, out, "--resume")) == 0
    assert torch.isfinite(saved.load(out).W_enc).all()


# ----------------------------------------------------------------------------------------
# 5. What the run will write must fit before it starts; so must the dictionaries in memory
# ----------------------------------------------------------------------------------------


def test_a_run_whose_checkpoint_cannot_fit_is_refused_before_the_harvest(gpt2_dir, cache, tmp_path, capsys,
                                                                        monkeypatch):
    import re

    from support import files

    ref = tmp_path / "ref"
    assert train.main(flags(gpt2_dir, cache, ref)) == 0      # what a run of these flags really writes
    written = 2 * (ref / "checkpoint.pt").stat().st_size + (ref / "model.safetensors").stat().st_size
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1_500_000))
    out, new_cache = tmp_path / "run", tmp_path / "new-cache"
    line = error_of(capsys, train.main(flags(gpt2_dir, new_cache, out)))
    m = re.fullmatch(r"error: the run \(checkpoint.pt of ([\d,]+) bytes, twice while one replaces the other, ([\d,]+) "
                     r"bytes of exported weights and 1 MiB for the rest\) needs ([\d,]+) bytes at (.+) but only "
                     r"1,500,000 are free: free some space, write elsewhere or ask for less", line)
    assert m and m[4] == repr(str(out)), line
    ckpt, weights, needed = (int(g.replace(",", "")) for g in m.groups()[:3])
    assert needed == 2 * ckpt + weights + 2**20 >= written                # never less than what is written
    assert abs(ckpt - (ref / "checkpoint.pt").stat().st_size) < 0.05 * ckpt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]          # no harvest, no run folder


def test_dictionaries_that_cannot_fit_in_memory_are_refused_before_any_work(gpt2_dir, cache, tmp_path, capsys):
    out = tmp_path / "run"
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, out, "--n-latents", "100000000")))
    # (821.6 GB: a crosscoder's state lost norm_every's F-float score_scale buffer to the fmxcoder in issue 29)
    assert line.startswith("error: the dictionaries (weights, gradients and Adam's two moments) need 821,600,004,")
    assert line.endswith("are free: lower --n-latents, or train fewer dictionaries at once")
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# 6. One lock for a set and its members; a result records the weights it read
# ----------------------------------------------------------------------------------------


def test_a_set_and_its_members_are_locked_as_one(gpt2_dir, cache, tmp_path, capsys, ctrl_c_at):
    out = tmp_path / "set"
    ctrl_c_at(5)
    assert train.main(flags(gpt2_dir, cache, out, "--dict", "sae")) == 130      # crosscoder/ and sae/layer_<l>/
    ctrl_c_at(None)
    before = snapshot(out)
    for member in (out / "crosscoder", out / "sae", out / "sae" / "layer_1"):
        with runs.reading(member):                          # metrics.py on one dictionary of the set
            line = error_of(capsys, train.main(flags(gpt2_dir, cache, out, "--dict", "sae", "--resume")))
        assert line == (f"error: --out {str(out)!r} is in use by another train.py run or an evaluation of it: wait "
                        f"for it to finish or choose another --out")
        assert snapshot(out) == before
        with runs.RunFolder(out, resume=True):              # train.py --resume on the set
            line = error_of(capsys, evaluate.main([str(member), *QUICK_METRICS, "--allow-incomplete"]))
        assert line == (f"error: {str(member)!r} is being written by a train.py run: evaluate it once that run has "
                        f"finished")
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, out / "crosscoder", "--overwrite")))
    assert line == (f"error: --out {str(out / 'crosscoder')!r} is one dictionary of the run in {str(out)!r}: that run "
                    f"is written (and replaced) as a whole, so train into a folder of its own")
    assert snapshot(out) == before


def test_a_result_records_the_weights_it_read_not_those_there_at_the_end(gpt2_dir, cache, tmp_path, monkeypatch):
    from support import evaluate

    run, other = tmp_path / "run", tmp_path / "other"
    assert train.main(flags(gpt2_dir, cache, run)) == 0
    assert train.main(flags(gpt2_dir, cache, other, "--k", "8")) == 0
    real = evaluate.reconstruction

    def swapped_meanwhile(*a, **k):                          # the files replaced while the evaluation runs
        real(*a, **k)
        for f in ("model.safetensors", "config.json"):
            shutil.copy(other / f, run / f)

    monkeypatch.setattr(evaluate, "reconstruction", swapped_meanwhile)
    assert evaluate.main([str(run), *QUICK_METRICS]) == 0
    with pytest.raises(ValueError, match="was computed from other weights than the model now in"):
        runs.read_result(run, "eval.json")


# ----------------------------------------------------------------------------------------
# 7. Non-finite weights and impossible scales are refused on load, naming the tensor
# ----------------------------------------------------------------------------------------


def set_tensor(file, name, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    change(tensors[name])
    save_file(tensors, str(file))


def edit_config(file, change):
    meta = json.loads(Path(file).read_text())
    change(meta)
    Path(file).write_text(json.dumps(meta))                  # (json writes NaN as NaN, as a careless tool would)


@pytest.fixture(scope="module")
def good_run(gpt2_dir, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert train.main(flags(gpt2_dir, cache, out)) == 0
    return out


@pytest.mark.parametrize("damage,want", [
    (lambda r: set_tensor(r / "model.safetensors", "W_enc", lambda t: t.view(-1)[7].fill_(float("nan"))),
     "{w}: W_enc holds nan or inf (1 of 16,384 values): these weights cannot be evaluated; rerun training or delete "
     "the folder"),
    (lambda r: set_tensor(r / "model.safetensors", "b_dec", lambda t: t.fill_(float("inf"))),
     "{w}: b_dec holds nan or inf (256 of 256 values): these weights cannot be evaluated; rerun training or delete "
     "the folder"),
    (lambda r: edit_config(r / "config.json", lambda m: m["config"].update(input_scale=[float("nan")] * 4)),
     "{c}: config.input_scale must be finite numbers > 0, one per layer, got [nan, nan, nan, nan]: rerun training or "
     "delete the folder"),
    (lambda r: edit_config(r / "config.json", lambda m: m["config"]["input_scale"].__setitem__(2, -0.5)),
     "{c}: config.input_scale must be finite numbers > 0, one per layer, got [")])
def test_non_finite_weights_and_impossible_scales_are_refused(good_run, tmp_path, capsys, damage, want):
    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    damage(run)
    want = "error: " + want.format(w=repr(str(run / "model.safetensors")), c=repr(str(run / "config.json")))
    line = error_of(capsys, evaluate.main([str(run), *QUICK_METRICS]))
    assert line.startswith(want), line
    assert not (run / "eval.json").exists()
    with pytest.raises(ValueError, match="holds nan or inf|must be finite numbers > 0"):
        saved.load(run)


@pytest.mark.parametrize("fixture,tensor", [("topk", "W_enc"), ("topk", "b_dec"), ("jumprelu", "threshold")])
def test_a_saelens_folder_with_non_finite_weights_is_refused(tmp_path, fixture, tensor):
    from test_saelens import copy_fixture

    folder = copy_fixture(fixture, tmp_path, metadata={"model_name": "nobody/absent-lm"})   # (no LM to check)
    set_tensor(folder / "sae_weights.safetensors", tensor, lambda t: t.view(-1)[0].fill_(float("nan")))
    with pytest.raises(ValueError) as e:
        saved.open_run(folder)
    n = {"W_enc": 16 * 48, "b_dec": 16, "threshold": 48}[tensor]           # d_in 16, d_sae 48
    assert str(e.value) == (f"{str(folder / 'sae_weights.safetensors')!r}: {tensor} holds nan or inf (1 of {n:,} "
                            f"values): these weights cannot be evaluated; take the SAE from its source again")


# ----------------------------------------------------------------------------------------
# 8. Only JSON true is complete
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", 0, None, "true"])
def test_only_json_true_marks_a_run_complete(good_run, gpt2_dir, cache, tmp_path, capsys, value):
    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    edit_config(run / "summary.json", lambda m: m.update(complete=value))
    line = error_of(capsys, evaluate.main([str(run), *QUICK_METRICS]))
    assert line == (f"error: {str(run)!r} holds an interrupted run (training stopped after 12 of 12 steps): resume it "
                    f"with python train.py <the same flags> --resume, or pass --allow-incomplete to use it as it is")
    assert train.main(flags(gpt2_dir, cache, run, "--resume")) == 0            # resumed, not "already finished"
    assert "already finished" not in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["complete"] is True


# ----------------------------------------------------------------------------------------
# 9. A finished run of no use is saved marked failed (exit 1), and every JSON file is JSON
# ----------------------------------------------------------------------------------------


def strict_json(path):
    """json.loads refusing NaN / Infinity, which Python's json writes but JSON does not have."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def all_json_valid(folder):
    files = [p for p in Path(folder).rglob("*") if p.suffix in (".json", ".jsonl")]
    for p in files:
        for line in (p.read_text().splitlines() if p.suffix == ".jsonl" else [None]):
            strict_json(p) if line is None else json.loads(line, parse_constant=lambda c: 1 / 0)
    return len(files)


def failed_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_a_diverged_run_is_saved_marked_failed_and_refused_by_the_evaluators(gpt2_dir, cache, tmp_path, capsys):
    import re

    out = tmp_path / "run"
    line = failed_line(capsys, train.main(flags(gpt2_dir, cache, out, "--lr", "10", "--eval-every", "6")))
    why = (r"the held-out FVU of the dictionary is [\d.e+]+, above 1 and above its 0\.\d+ at step 0: it reconstructs "
           r"the held-out tokens worse than their mean does, the training diverged; train it again with a lower --lr")
    assert re.fullmatch(f"error: the run in {re.escape(repr(str(out)))} failed: {why} \\(it is saved, marked "
                        f"incomplete\\)", line), line
    summary = strict_json(out / "summary.json")
    assert summary["complete"] is False and re.fullmatch(why, summary["failed"]) and summary["steps"] == 12
    assert all_json_valid(out) == 3                                       # config, summary, curve
    line = error_of(capsys, evaluate.main([str(out), *QUICK_METRICS]))
    assert re.fullmatch(f"error: {re.escape(repr(str(out)))} holds a run that failed: {why}; or pass "
                        f"--allow-incomplete to use it as it is", line), line
    assert evaluate.main([str(out), *QUICK_METRICS, "--allow-incomplete"]) == 0       # nothing lost: it is there
    assert all_json_valid(out) == 4


def test_diverged_means_worse_than_the_mean_and_than_at_step_0():
    """A short run still on its way down from a start above 1 is not diverged; one that ends above 1 and above its
    start is (a run resumed from a checkpoint without the start: above 1 is enough)."""
    def verdict(fvu, start):
        return runs.failure({"steps": 10, "eval": {"sae/3": {"fvu": fvu}}, "fvu_start": start and {"sae/3": start}})

    assert verdict(1.2, 1.5) is None and verdict(0.97, 0.95) is None and verdict(1.0, 0.5) is None
    assert verdict(1.2, 0.9) == ("the held-out FVU of sae layer 3 is 1.2, above 1 and above its 0.9 at step 0: it "
                                 "reconstructs the held-out tokens worse than their mean does, the training diverged; "
                                 "train it again with a lower --lr")
    assert verdict(2e10, None).startswith("the held-out FVU of sae layer 3 is 2e+10, above 1: it reconstructs")
    assert verdict(float("nan"), 0.9).startswith("the held-out FVU of sae layer 3 is nan (the held-out activations")


def test_a_time_limit_reached_before_the_first_step_still_trains_one(gpt2_dir, cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out, "--time-limit", "1e-9")) == 0
    summary = strict_json(out / "summary.json")
    assert summary["complete"] is True and summary["steps"] == 1 and summary["time_limit_reached"]
    assert "--time-limit 1e-09 s reached after 1 of 12 steps" in capsys.readouterr().out


def test_a_run_that_trained_no_step_is_saved_marked_failed(gpt2_dir, tmp_path, capsys):
    from support import corpora

    texts, _ = corpora.bbc_news()                             # ~6,000 tokens: the held-out 512, the 4,096 that set
    (tmp_path / "small").mkdir()                              # the scale, and less than one batch of 8,192 left
    (tmp_path / "small" / "docs.txt").write_text(" ".join(texts)[:27_000])
    out = tmp_path / "run"
    line = failed_line(capsys, train.main(flags(gpt2_dir, "none", out, "--dataset", str(tmp_path / "small"),
                                                "--batch-size", "8192", "--tokens", "16384")))
    assert line == (f"error: the run in {str(out)!r} failed: it trained no step (the data ran out first), so its "
                    f"dictionaries are their initialisation; train it on more data (or a smaller --batch-size) (it is "
                    f"saved, marked incomplete)")
    summary = strict_json(out / "summary.json")
    assert summary["complete"] is False and summary["steps"] == 0 and saved.load(out)


def test_constant_activations_give_valid_json_and_a_failed_run(gpt2_dir, cache, tmp_path, capsys):
    import numpy as np

    flat = Path(shutil.copytree(cache, tmp_path / "flat"))
    meta = json.loads((flat / "meta.json").read_text())
    for name, n in meta["shards"]:
        np.memmap(flat / name, dtype=np.float16, mode="r+", shape=(n, len(meta["layers"]), meta["d"]))[:] = 0.5
    out = tmp_path / "run"
    line = failed_line(capsys, train.main(flags(gpt2_dir, flat, out, "--eval-every", "6")))
    assert line == (f"error: the run in {str(out)!r} failed: the held-out FVU of the dictionary is inf (the held-out "
                    f"activations do not vary, or the reconstruction overflowed); check the activations (it is saved, "
                    f"marked incomplete)")
    assert all_json_valid(out) == 3
    assert strict_json(out / "summary.json")["eval"]["all"]["fvu"] is None
    assert strict_json(out / "config.json")["metrics"]["eval"]["fvu"] is None


# ----------------------------------------------------------------------------------------
# 10. --help of every entry point prints its help and nothing else happens
# ----------------------------------------------------------------------------------------

ENTRY_POINTS = ([["train.py"], ["metrics.py"], ["probe.py"]]
                + [["-m", m] for m in ("latents.features", "latents.judge", "latents.page", "support.saelens")]
                + [[str(p.relative_to(ROOT))] for d in ("bench", "experiments") for p in sorted((ROOT / d).glob("*.py"))])


@pytest.mark.parametrize("module", ["train", "support.evaluate", "probe", "latents.features", "latents.judge", "latents.page",
                                    "support.saelens_export"])
def test_help_of_the_command_lines_in_process(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_help_of_several_kinds_lists_each_kinds_flags_with_its_defaults(capsys):
    """Two kinds share flags (--n-latents, --k): the help of both used to be an argparse traceback."""
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["--dict", "fmxcoder,polysae", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage:")
    fmx, poly = out.index("--dict fmxcoder ("), out.index("--dict polysae (")
    assert fmx < poly and "--rank " in out[fmx:poly] and "--ranks " in out[poly:]
    assert "--n-latents" in out[fmx:poly] and "--n-latents" in out[poly:]


@pytest.mark.slow                    # ~60 CPU-seconds: a process (torch imported) per script
def test_help_of_every_entry_point(tmp_path):
    """Each one in its own process from an empty folder, all at once: exit 0, a usage line, no traceback, and
    nothing written (experiments/corpus.py used to write its corpus to a file named --help, figure.py its
    tables over the committed ones; probe.py crashed on the '%' of '95%')."""
    import time

    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [(argv, subprocess.Popen([sys.executable, *[a if a == "-m" or i else str(ROOT / a) if a.endswith(".py")
                                                        else a for i, a in enumerate(argv)], "--help"],
                                     cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for argv in ENTRY_POINTS]
    for argv, p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in err, (argv, err[-2000:])
        assert out.startswith("usage:"), (argv, out[:300])
    assert list(tmp_path.iterdir()) == []
    changed = [p for p in ROOT.rglob("*") if p.is_file() and p.stat().st_mtime > started
               and not {".git", "__pycache__", ".pytest_cache", ".venv"} & set(p.relative_to(ROOT).parts)]
    assert changed == []
    assert len(ENTRY_POINTS) >= 7 + 5 + 10


def test_every_import_of_the_bench_and_experiment_scripts_resolves():
    """--help never reaches an import inside a function: bench_vs_saelens.py and experiments/budget.py kept
    `import activation_cache` for a year after that module moved (support/cache.py). Every import statement of
    every script under bench/ and experiments/, wherever it sits, must name a module that exists (a project
    module, one installed, or a sibling script), and `from M import N` a name M has; only the packages the
    comparisons install themselves in a separate venv (SAELens, dictionary_learning) may be missing."""
    import ast
    import importlib
    import importlib.util

    optional = {"sae_lens", "dictionary_learning"}
    missing = []
    for d in ("bench", "experiments"):
        sys.path.insert(0, str(ROOT / d))              # a script imports its siblings, as `python d/x.py` does
        try:
            for script in sorted((ROOT / d).glob("*.py")):
                for node in ast.walk(ast.parse(script.read_text())):
                    if isinstance(node, ast.Import):
                        wanted = [(a.name, None) for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        wanted = [(node.module, a.name) for a in node.names]
                    else:
                        continue
                    for module, name in wanted:
                        if module.split(".")[0] in optional:
                            continue
                        if importlib.util.find_spec(module) is None:
                            missing.append(f"{script.name}: {module}")
                        elif name is not None and name != "*" and not hasattr(importlib.import_module(module), name) \
                                and importlib.util.find_spec(f"{module}.{name}") is None:
                            missing.append(f"{script.name}: {module}.{name}")
        finally:
            sys.path.remove(str(ROOT / d))
    assert missing == []


def test_bench_vs_saelens_runs_its_smallest_setting_topk_against_topk():
    """Its smallest CPU setting (our two rows; SAELens is not installed here), and "ours" is a TopK SAE as
    the SAELens and dictionary_learning rows are (SAEConfig's default is BatchTopK)."""
    import argparse

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vs_saelens.py"), "--tokens", "2048",
                          "--eval-tokens", "512", "--n-latents", "64", "--k", "4", "--batch", "128", "--steps", "2",
                          "--warmup", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| ours (sae.py, TopK) |" in res.stdout
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_vs_saelens
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args = argparse.Namespace(n_latents=64, k=4, dead_steps=10, batch=8, device="cpu", lr=1e-3)
    _, _, eval_mode = bench_vs_saelens.ours(args, torch.randn(8, 16))
    assert eval_mode.__self__.config.sparsity == "topk"          # eval_mode is the model's bound .eval


# ----------------------------------------------------------------------------------------
# 11. Tracebacks that are one line now
# ----------------------------------------------------------------------------------------


def test_a_judge_that_closes_mid_answer_is_one_line(tmp_path, capsys, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from latents import judge
    from test_autointerp import synthetic_features

    class HalfAnswer(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"choices": [{"mess')        # ... and the connection closes

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), HalfAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setattr(judge.time, "sleep", lambda s: None)          # (the retries' back-off)
    try:
        code = judge.main([str(synthetic_features(tmp_path / "a")), "--judge", url, "--judge-model", "m", "--quiet"])
    finally:
        server.shutdown()
    assert error_of(capsys, code) == (f"error: the judge at {url}/chat/completions closed the connection in the middle "
                                      f"of its answer (IncompleteRead), 4 times: check the server")


@pytest.mark.parametrize("argv,want", [(["--threshold", "7"], "--threshold is a detection accuracy, between 0 and 1, "
                                                              "got 7.0"),
                                       (["--threshold", "nan"], "--threshold is a detection accuracy, between 0 and 1, "
                                                                "got nan"),
                                       (["--latents", "0"], "--latents must be at least 1, got 0")])
def test_judge_settings_are_checked_before_the_judge_loads(tmp_path, capsys, argv, want):
    from latents import judge
    from test_autointerp import synthetic_features

    run = synthetic_features(tmp_path / "a")
    assert error_of(capsys, judge.main([str(run), "--judge", "local:nobody/absent", *argv])) == "error: " + want


@pytest.mark.parametrize("change,want", [
    (lambda m: m["run"].update(layers=[0, "1", 2, 3]), "run.layers must be a list of block numbers, got [0, '1', 2, 3]"),
    (lambda m: m["run"].update(cache=5), "run.cache must be a folder or null, got 5"),
    (lambda m: m.update(run="x"), 'its "run" entry is str, not an object'),
    (lambda m: m["run"].update(eval_tokens="x"), "run.eval_tokens must be an integer >= 0, got 'x'"),
    (lambda m: m["run"].update(context="64"), "run.context must be an integer >= 2, got '64'")])
def test_wrong_types_in_the_run_entry_are_one_line(good_run, tmp_path, capsys, change, want):
    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    edit_config(run / "config.json", change)
    assert error_of(capsys, evaluate.main([str(run), *QUICK_METRICS])) == \
        f"error: {str(run / 'config.json')!r}: {want}: {saved.RERUN}"


def test_a_context_longer_than_the_lm_is_refused_before_any_allocation(gpt2_dir, cache, tmp_path, capsys):
    from support import saelens, saelens_export

    run = tmp_path / "sae"
    argv = [a for a in flags(gpt2_dir, cache, run, "--layers", "1", "--cache", "none") if a not in ("--dict", "crosscoder")]
    assert train.main(argv + ["--dict", "sae"]) == 0
    [folder] = saelens_export.export(run, tmp_path / "saelens")                   # saelens/layer_1/
    for context, want in ((10**6, f"metadata.context_size 1,000,000 exceeds the 1,024 positions of model {gpt2_dir!r}"),
                          ("128", "metadata.context_size must be an integer >= 2, got '128'")):
        edit_config(folder / "cfg.json", lambda c: c["metadata"].update(context_size=context))
        assert error_of(capsys, evaluate.main([str(folder), *QUICK_METRICS])) == \
            f"error: {str(folder / 'cfg.json')!r}: {want}"
    edit_config(run / "layer_1" / "config.json", lambda m: m["run"].update(context=4096))      # ours too
    assert error_of(capsys, evaluate.main([str(run), *QUICK_METRICS])) == (
        f"error: {str(run / 'layer_1' / 'config.json')!r}: run.context 4,096 exceeds the 1,024 positions of model "
        f"{gpt2_dir!r}")


@pytest.fixture(scope="module")
def token_corpus(gpt2_dir, tmp_path_factory):
    """A small pre-tokenised corpus (BBC articles) for the tiny GPT-2, as experiments/corpus_large.py writes one."""
    from transformers import AutoTokenizer

    from support import corpora
    sys.path.insert(0, str(ROOT / "experiments"))
    import corpus_large

    texts, _ = corpora.bbc_news()
    out = tmp_path_factory.mktemp("corpus") / "bbc.gpt2.u16"
    corpus_large.write_tokens([("bbc", t) for t in texts[:40]], AutoTokenizer.from_pretrained(gpt2_dir), "gpt2", out)
    return out


def damaged_corpus(token_corpus, folder, record_sha: bool) -> Path:
    """A copy whose token 100 is 60,000 (GPT-2 has 50,257), with the sha256 in its .json updated or not."""
    import hashlib

    import numpy as np

    u16 = folder / token_corpus.name
    shutil.copy(token_corpus, u16)
    shutil.copy(token_corpus.with_suffix(".json"), u16.with_suffix(".json"))
    ids = np.fromfile(u16, dtype=np.uint16)
    ids[100] = 60_000
    ids.tofile(u16)
    if record_sha:
        edit_config(u16.with_suffix(".json"), lambda m: m.update(sha256=hashlib.sha256(ids.tobytes()).hexdigest()))
    return u16


@pytest.mark.parametrize("stream", [False, True])
def test_a_token_file_outside_its_vocabulary_is_refused_before_the_lm_loads(gpt2_dir, token_corpus, tmp_path, capsys,
                                                                           monkeypatch, stream):
    import activations

    def never(*a, **k):
        raise AssertionError("the LM's weights were loaded")

    monkeypatch.setattr(activations, "load_lm", never)
    cache = "none" if stream else str(tmp_path / "c")
    for record_sha, want in ((True, "holds token id 60,000, outside its vocabulary of 50,257 ids: rebuild it with "
                                    "`python experiments/corpus_large.py`"),
                             (False, "is damaged: sha256 ")):
        u16 = damaged_corpus(token_corpus, Path(tmp_path), record_sha)
        line = error_of(capsys, train.main(flags(gpt2_dir, cache, tmp_path / "run", "--dataset", str(u16))))
        assert line.startswith(f"error: token file {str(u16)!r} ") and want in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_a_missing_dataset_and_a_full_disk_are_refused_before_the_lm_loads(gpt2_dir, tmp_path, capsys, monkeypatch):
    import activations
    from support import files

    def never(*a, **k):
        raise AssertionError("the LM's weights were loaded")

    monkeypatch.setattr(activations, "load_lm", never)
    for cache in ("none", str(tmp_path / "c")):
        line = error_of(capsys, train.main(flags(gpt2_dir, cache, tmp_path / "run", "--dataset",
                                                 str(tmp_path / "no-such-folder/"))))
        assert line == f"error: dataset file or folder {str(tmp_path / 'no-such-folder')!r} does not exist"
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000) if Path(p) == tmp_path
                        else real(p))
    line = error_of(capsys, train.main(flags(gpt2_dir, tmp_path / "c", tmp_path / "run")))
    assert line.startswith("error: the activation cache (2,048 tokens × 4 layers × 64 × 2 bytes) needs 1,048,576 bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_harvest_leaves_no_temporary_once_any_cache_is_opened(gpt2_dir, cache, tmp_path, monkeypatch):
    from test_faults import dead_pid

    monkeypatch.setenv("FMX_CACHE", str(tmp_path / "fmx"))
    acts = tmp_path / "fmx" / "acts"
    acts.mkdir(parents=True)
    pid = dead_pid()
    stale = [acts / f".smollm2-135m-0123456789ab.tmp-{pid}", cache.parent / f".{cache.name}.tmp-{pid}"]
    for s in stale:                                          # preallocated shards of killed rebuilds
        s.mkdir()
        (s / "acts_00000.bin").write_bytes(bytes(1 << 20))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / f".run.export-{pid}").mkdir()                   # not a cache's: never touched by the caches
    assert train.main(flags(gpt2_dir, cache, tmp_path / "run")) == 0          # reuses `cache`: no rebuild
    src = Path(activation_cache.default_cache_path(gpt2_dir, "0-3", True, None, "train", 64, "float16", 10.0))
    shutil.copytree(cache, src)                                               # a default cache, reused as well
    assert train.main([a for a in flags(gpt2_dir, cache, tmp_path / "run2") if a not in ("--cache", str(cache))]) == 0
    assert not any(s.exists() for s in stale)
    assert (other / f".run.export-{pid}").exists()


@pytest.mark.parametrize("command", ["metrics", "probe", "features"])
def test_ctrl_c_in_an_evaluator_is_one_line_and_writes_nothing(good_run, tmp_path, capsys, monkeypatch, command):
    import probe
    from latents import features
    from support import evaluate

    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    before = snapshot(run)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    target, main, argv, written = {
        "metrics": ((evaluate, "reconstruction"), evaluate.main, QUICK_METRICS, "each run's eval.json"),
        "probe": ((probe, "pool"), probe.main, ["--task", "bbc_topic", "--n-train", "8", "--n-test", "8", "--device",
                                                "cpu"], "probe.json"),
        "features": ((features, "stream"), features.main, ["--device", "cpu", "--quiet"], "features.json")}[command]
    monkeypatch.setattr(*target, ctrl_c)
    assert main([str(run), *argv]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        f"interrupted: nothing was left half-written ({written} is written whole, at the end)"
    assert snapshot(run) == before


def test_a_cache_that_is_a_file_is_one_line(gpt2_dir, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    assert error_of(capsys, train.main(flags(gpt2_dir, f, tmp_path / "run"))) == \
        f"error: --cache {str(f)!r} is a file: pass a folder for the activation cache (or none to stream)"
    assert error_of(capsys, train.main(flags(gpt2_dir, f / "sub", tmp_path / "run"))) == \
        f"error: cannot create the activation cache {str(f / 'sub')!r}: cannot write into {str(f)!r} (a file, not a folder)"
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ----------------------------------------------------------------------------------------
# 12. A set folder: metrics.py evaluates every dictionary, probe.py and latents.features name them
# ----------------------------------------------------------------------------------------


def test_a_set_folder_is_evaluated_member_by_member_or_its_members_are_named(gpt2_dir, cache, tmp_path, capsys):
    import probe
    from latents import features

    out = tmp_path / "set"
    assert train.main(flags(gpt2_dir, cache, out, "--dict", "sae", "--name", "per-layer")) == 0
    capsys.readouterr()
    assert evaluate.main([str(out), *QUICK_METRICS]) == 0
    table = capsys.readouterr().out
    for name in ("crosscoder", "per-layer"):
        assert runs.read_result(out / name, "eval.json")["run"] == str(out / name)
        assert f"\n{name} " in "\n" + "\n".join(line.strip() for line in table.splitlines())
    want = (f"error: {str(out)!r} holds 2 dictionaries trained together (crosscoder, per-layer): pass one of their "
            f"folders, e.g. {str(out / 'crosscoder')!r} (metrics.py evaluates them all: python metrics.py {out})")
    assert error_of(capsys, probe.main([str(out), "--task", "bbc_topic", "--device", "cpu"])) == want
    assert error_of(capsys, features.main([str(out), "--device", "cpu", "--quiet"])) == want


# ----------------------------------------------------------------------------------------
# 13. A Ctrl-C while saving says what was saved
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where,step", [("export", 12), ("final checkpoint", 8)])
def test_ctrl_c_while_saving_says_what_was_saved(gpt2_dir, cache, tmp_path, capsys, monkeypatch, where, step):
    out = tmp_path / "run"
    if where == "export":
        monkeypatch.setattr(train, "export", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    else:
        real = runs.RunFolder.save_checkpoint

        def ctrl_c_at_the_end(self, state):
            if state["step"] == 12:
                raise KeyboardInterrupt
            real(self, state)

        monkeypatch.setattr(runs.RunFolder, "save_checkpoint", ctrl_c_at_the_end)
    assert train.main(flags(gpt2_dir, cache, out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"interrupted while saving: {str(out / 'checkpoint.pt')!r} holds step {step} of 12: continue with the same "
        f"flags and --resume, which exports it")
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == step
    monkeypatch.undo()
    assert train.main(flags(gpt2_dir, cache, out, "--resume")) == 0
    assert strict_json(out / "summary.json")["complete"] is True and saved.load(out)


# ----------------------------------------------------------------------------------------
# 15. The SAELens export never writes into a run folder, and reads its run under the lock
# ----------------------------------------------------------------------------------------


def test_the_saelens_export_never_writes_into_a_run_folder_and_takes_the_lock(gpt2_dir, cache, tmp_path, capsys):
    from support import saelens, saelens_export

    run = tmp_path / "sae"
    argv = [a for a in flags(gpt2_dir, cache, run, "--layers", "1", "--cache", "none") if a not in ("--dict", "crosscoder")]
    assert train.main(argv + ["--dict", "sae"]) == 0
    before = snapshot(run)
    for out, where in ((run, ""), (run / "saelens", "inside "), (run / "layer_1", "inside ")):
        line = error_of(capsys, saelens_export.main(["export", str(run), str(out)]))
        assert line == (f"error: {str(out)!r} is {where}the run folder {str(run)!r}: a run folder holds one run, which "
                        f"train.py replaces as a whole; export to a folder of its own")
    with runs.RunFolder(run, resume=True):                       # train.py --resume writes it
        line = error_of(capsys, saelens_export.main(["export", str(run), str(tmp_path / "out")]))
    assert line == f"error: {str(run)!r} is being written by a train.py run: evaluate it once that run has finished"
    assert snapshot(run) == before and not (tmp_path / "out").exists()
    assert saelens_export.main(["export", str(run), str(tmp_path / "out")]) == 0


# ----------------------------------------------------------------------------------------
# 16. A cache rebuilt under a finished run is named, and its held-out tokens harvested again
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rebuild", ["fewer tokens", "other tokens"])
def test_a_cache_rebuilt_under_a_finished_run_is_named_and_its_held_out_tokens_harvested(gpt2_dir, tmp_path, capsys,
                                                                                        rebuild):
    import numpy as np

    c, out = tmp_path / "c", tmp_path / "run"
    assert train.main(flags(gpt2_dir, c, out)) == 0
    if rebuild == "fewer tokens":                               # another run's harvest into the same folder
        shutil.rmtree(c)
        activation_cache.build_cache(c, gpt2_dir, [0, 1, 2, 3], n_tokens=1024, context=64, multi=True,
                                     drop_outliers=10.0)
        how = "it holds 1,024 tokens, the run used 2,048"
    else:                                                       # the same size and settings, other text
        meta = json.loads((c / "meta.json").read_text())
        shard = c / meta["shards"][0][0]
        np.fromfile(shard, dtype=np.float16).reshape(meta["shards"][0][1], -1)[::-1].tofile(shard)
        how = "its first 2,048 tokens are not those the run used"
    capsys.readouterr()
    assert evaluate.main([str(out), *QUICK_METRICS]) == 0
    note = (f"note: the activation cache {str(c)!r} was rebuilt since this run was trained ({how}): its held-out "
            f"tokens are harvested again from the text, as for a streamed run")
    assert note in capsys.readouterr().err.splitlines()
    rebuilt = runs.read_result(out, "eval.json")
    assert rebuilt["data"].startswith("harvested 512 tokens of bbc split train (after the first 1,536 tokens; the cache")
    shutil.rmtree(c)                                            # the same tokens as with no cache at all
    assert evaluate.main([str(out), *QUICK_METRICS]) == 0
    gone = runs.read_result(out, "eval.json")
    assert rebuilt["results"][0]["fvu"] == gone["results"][0]["fvu"]
    run = json.loads((out / "config.json").read_text())["run"]          # what identifies the cache's contents
    assert run["cache_tokens"] == 2048 and len(run["cache_fingerprint"]) == 40


# ----------------------------------------------------------------------------------------
# 17. One model, one number: the SAELens path evaluates with the run's outlier rule, and says it
# ----------------------------------------------------------------------------------------


def test_an_sae_gives_the_same_fvu_from_its_run_folder_and_its_saelens_folder(gpt2_dir, cache, tmp_path):
    from support import saelens, saelens_export

    run = tmp_path / "sae"                           # streamed: both paths read the stream's first 512 tokens
    argv = [a for a in flags(gpt2_dir, cache, run, "--layers", "1", "--cache", "none", "--drop-outliers", "1.02")
            if a not in ("--dict", "crosscoder")]
    assert train.main(argv + ["--dict", "sae"]) == 0
    [folder] = saelens_export.export(run, tmp_path / "saelens")
    results = {}
    for where in (run, folder):
        assert evaluate.main([str(where), *QUICK_METRICS, "--eval-tokens", "512"]) == 0
        results[where] = runs.read_result(where, "eval.json")
    ours, theirs = (results[w]["results"][0] for w in (run, folder))
    assert theirs["fvu"] == pytest.approx(ours["fvu"], rel=1e-4)          # (the folded scale: float rounding)
    assert results[run]["drop_outliers"] == results[folder]["drop_outliers"] == 1.02      # the rule, recorded
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["exported_from"]["drop_outliers"] == 1.02
    edit_config(folder / "cfg.json", lambda c: c["metadata"]["exported_from"].update(drop_outliers=None))
    assert evaluate.main([str(folder), *QUICK_METRICS, "--eval-tokens", "512"]) == 0       # every token kept
    kept_all = runs.read_result(folder, "eval.json")
    assert kept_all["drop_outliers"] is None and kept_all["results"][0]["fvu"] != pytest.approx(ours["fvu"], rel=1e-3)

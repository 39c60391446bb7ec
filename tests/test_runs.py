"""Run folders and bad settings (runs.py, train.py): no result of one run can be read as another's,
an interrupted run never looks finished, and every bad flag fails before any work, in one line,
leaving nothing behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import activations
from support import cache as activation_cache
from support import runs
import sae
import train
from support import saved
from support import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, gpt2_dir):
    path = tmp_path_factory.mktemp("acts") / "c"
    activation_cache.build_cache(path, gpt2_dir, [0, 1, 2, 3], n_tokens=4096, context=64, multi=True, drop_outliers=10.0)
    return str(path)


def flags(gpt2_dir, cache_dir, out, *extra):
    return ["--model", gpt2_dir, "--layers", "0-3", "--tokens", "1024", "--eval-tokens", "1024",
            "--batch-size", "128", "--n-latents", "64", "--k", "4", "--context", "64",
            "--cache", cache_dir, "--out", str(out), "--device", "cpu", "--dead-tokens", "1000",
            "--ckpt-every", "0", "--lr", "3e-3", *extra]


def error_of(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------
# A folder holds one run
# ----------------------------------------------------------------------------------------


def test_a_new_run_refuses_a_folder_holding_another_run(gpt2_dir, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache_dir, out, "--dict", "crosscoder")) == 0
    before = snapshot(out)
    last = error_of(capsys, train.main(flags(gpt2_dir, cache_dir, out, "--dict", "sae")))
    assert last.startswith("error: --out") and str(out) in last and "--resume" in last and "--overwrite" in last
    assert snapshot(out) == before                                  # untouched
    [(layers, model, _)] = saved.load_run(out)
    assert layers == [0, 1, 2, 3] and type(model).__name__ == "CrossCoder"
    assert train.main(flags(gpt2_dir, cache_dir, out, "--dict", "sae", "--overwrite")) == 0
    assert [layers for layers, _, _ in saved.load_run(out)] == [[0], [1], [2], [3]]


def test_overwrite_replaces_the_whole_folder(gpt2_dir, cache_dir, tmp_path):
    """The old code left layer_0/ of a two-layer per-layer run next to the new one-layer run, and
    saved.load_run returned both."""
    out, c01, c1 = tmp_path / "run", str(tmp_path / "c01"), str(tmp_path / "c1")
    assert train.main(flags(gpt2_dir, c01, out, "--dict", "sae", "--layers", "0,1")) == 0
    assert train.main(flags(gpt2_dir, c1, out, "--dict", "sae", "--layers", "1", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "layer_1", "summary.json"]
    assert [layers for layers, _, _ in saved.load_run(out)] == [[1]]
    assert train.main(flags(gpt2_dir, cache_dir, out, "--dict", "crosscoder", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "model.safetensors",
                                                     "summary.json"]


def test_a_failed_export_leaves_the_previous_run_whole(gpt2_dir, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache_dir, out, "--dict", "sae")) == 0
    real_save, done = saved.save, []

    def save_then_crash(model, path, extra=None):
        if done:
            raise OSError("disk full")
        done.append(path)
        return real_save(model, path, extra)

    monkeypatch.setattr(saved, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        train.train(train.parse_args(flags(gpt2_dir, cache_dir, out, "--dict", "sae", "--overwrite")))
    # --overwrite deleted the old run when the new one started; the new one never became visible
    # half-written: the folder holds its final checkpoint only, no model of either run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]
    assert not list(tmp_path.glob(".run.export-*"))


def test_two_runs_on_one_folder_at_once(gpt2_dir, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with runs.RunFolder(out):                                       # another train.py holds the folder
        last = error_of(capsys, train.main(flags(gpt2_dir, cache_dir, out)))
    assert last == f"error: --out {str(out)!r} is in use by another train.py run or an evaluation of it: wait for " \
                   f"it to finish or choose another --out"
    assert train.main(flags(gpt2_dir, cache_dir, out)) == 0           # released with its holder


# ----------------------------------------------------------------------------------------
# Interrupted runs
# ----------------------------------------------------------------------------------------


def test_an_interrupted_run_is_saved_marked_incomplete_and_exits_130(gpt2_dir, cache_dir, tmp_path, ctrl_c_at):
    out = tmp_path / "run"
    ctrl_c_at(3)
    assert train.main(flags(gpt2_dir, cache_dir, out, "--tokens", "2048")) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["interrupted"] and summary["steps"] == 4
    assert saved.load_run(out)                                          # a loadable model all the same
    ctrl_c_at(None)
    assert train.main(flags(gpt2_dir, cache_dir, out, "--tokens", "2048", "--resume")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["steps"] == 16
    capsys_free = train.main(flags(gpt2_dir, cache_dir, out, "--tokens", "2048", "--resume"))
    assert capsys_free == 0                                           # finished: nothing to resume


def test_kill_9_then_resume_is_bit_identical(gpt2_dir, cache_dir, tmp_path):
    """A subprocess killed (SIGKILL: no handler runs) right after its first checkpoint, then resumed,
    equals an uninterrupted run tensor by tensor."""
    common = ["--dict", "crosscoder", "--sparsity", "batchtopk", "--mask-prob", "0.2", "--tokens", "5120",
              "--decay", "cosine", "--warmup-steps", "5", "--ckpt-every", "10"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(flags(gpt2_dir, cache_dir, full, *common)) == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_worker.py"),
                             *flags(gpt2_dir, cache_dir, part, *common)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "FMX_HANG_AFTER_CHECKPOINT": "1"})
    while not (part / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (part / "config.json").exists()   # died mid-run
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 10
    assert train.main(flags(gpt2_dir, cache_dir, part, *common, "--resume")) == 0
    a, b = saved.load(full), saved.load(part)
    for (name, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), name


# ----------------------------------------------------------------------------------------
# Bad settings: one line, before any work, nothing written
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--tokens", "100"], "--tokens 100 is less than one batch (--batch-size 128): it would train 0 steps"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--n-latents", "-5"], "--n-latents must be a positive integer, got -5"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--context", "100000"], "--context 100000 exceeds the 1024 positions of model"),
    (["--dict", "polysae", "--layers", "1", "--n-latents", "32"], "pass --ranks 32,64,64"),
    (["--sparsity", "top-k"], "--sparsity must be one of topk, batchtopk, relu, got 'top-k'"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0, got -1.0"),
    (["--time-limit", "-5"], "--time-limit must be a finite number >= 0, got -5.0"),
    (["--drop-outliers", "0.5"], "--drop-outliers must be 0 (keep all tokens) or a multiple of the median norm > 1"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--mask-prob", "1"], "--mask-prob must be in [0, 1), got 1.0"),
    (["--cache-dtype", "int8"], "--cache-dtype must be one of float16, float32, got 'int8'"),
    (["--dict", "sae", "--layers", "1", "--decoder-norm", "fixed"], "--decoder-norm must be one of unit, free, got 'fixed'"),
    (["--decoder-norm", "free"], "--decoder-norm is not an option of --dict fmxcoder"),
    (["--dict", "sae", "--layers", "1", "--decoder-init-norm", "0.1"], "--decoder-init-norm 0.1 needs --decoder-norm free"),
    (["--untied-init"], "--untied-init is not an option of --dict fmxcoder"),
    (["--dict", "crosscoder", "--untied-init"], "--untied-init is not an option of --dict crosscoder"),
])
def test_bad_flags_fail_before_any_work(gpt2_dir, tmp_path, capsys, monkeypatch, extra, message):
    for module, name in ((activations, "load_lm"), (activations, "harvest"), (activation_cache, "build_cache")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("expensive work before the check"))
    out = tmp_path / "never"
    last = error_of(capsys, train.main(flags(gpt2_dir, str(tmp_path / "no-cache"), out, *extra)))
    assert last.startswith("error: ") and message in last
    assert not out.exists() and not (tmp_path / "no-cache").exists()


def test_resume_without_a_checkpoint_is_an_error(gpt2_dir, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    last = error_of(capsys, train.main(flags(gpt2_dir, cache_dir, out, "--resume")))
    assert "holds no checkpoint.pt, so there is nothing to resume" in last and not out.exists()


def test_eval_tokens_that_leave_no_batch_are_an_error_not_a_silent_cap(gpt2_dir, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    last = error_of(capsys, train.main(flags(gpt2_dir, cache_dir, out, "--eval-tokens", "4000", "--tokens", "128",
                                             "--cache-tokens", "4096")))
    assert "after the 4,000 held out by --eval-tokens, 96 are left, fewer than one batch (--batch-size 128)" in last
    assert not out.exists()                                         # a failed run leaves no folder


def test_a_run_that_fails_after_the_checks_removes_the_folder_it_made(gpt2_dir, tmp_path, capsys):
    empty = tmp_path / "empty-corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    out = tmp_path / "run"
    last = error_of(capsys, train.main(flags(gpt2_dir, str(tmp_path / "c"), out, "--dataset", str(empty))))
    assert "gave no tokens" in last and not out.exists()


def test_eval_every_writes_a_curve_that_survives_interruption(gpt2_dir, cache_dir, tmp_path, ctrl_c_at):
    """--eval-every: held-out FVU/L0/dead (and FC for a crosscoder) at step 0 and every N steps in
    curve.jsonl; a run interrupted after a checkpoint and resumed writes the same curve."""
    common = ["--dict", "crosscoder", "--tokens", "2048", "--eval-every", "4", "--eval-panel", "512",
              "--ckpt-every", "4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(flags(gpt2_dir, cache_dir, full, *common)) == 0
    curve = [json.loads(l) for l in (full / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [0, 4, 8, 12, 16]
    assert all(1 <= r["eval"]["all"]["fc_mean"] <= 4 and 0 < r["eval"]["all"]["fvu"] for r in curve)
    assert curve[-1]["eval"]["all"]["fvu"] < curve[0]["eval"]["all"]["fvu"]      # it learns
    ctrl_c_at(9)                    # after the step-8 checkpoint and curve line; step 9 is redone
    assert train.main(flags(gpt2_dir, cache_dir, part, *common)) == 130
    ctrl_c_at(None)
    assert train.main(flags(gpt2_dir, cache_dir, part, *common, "--resume")) == 0
    assert (part / "curve.jsonl").read_text() == (full / "curve.jsonl").read_text()


# ----------------------------------------------------------------------------------------
# Opening a run folder and the shared CLI plumbing
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tpu", "meta", "mps", "cuda:x", ""])
def test_resolve_device_accepts_only_auto_cpu_and_cuda(name):
    with pytest.raises(ValueError, match=f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"):
        cli.resolve_device(name)


def test_resolve_device_gives_a_torch_device_and_checks_cuda_indices():
    assert cli.resolve_device("cpu") == torch.device("cpu")
    assert cli.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"--device 'cuda:{n}' requested but "):
        cli.resolve_device(f"cuda:{n}")                       # one past the last device torch sees


def test_check_writable_names_the_folder_and_creates_nothing(tmp_path):
    cli.check_writable(tmp_path)                              # an existing folder
    cli.check_writable(tmp_path / "a" / "b")                  # one that can be created ...
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())   # ... but is not
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"cannot write into {str(tmp_path / 'file')!r}"):
        cli.check_writable(tmp_path / "file")
    with pytest.raises(ValueError, match=f"{str(tmp_path / 'file' / 'sub')!r} is not writable: cannot "
                                                  f"write into {str(tmp_path / 'file')!r}"):
        cli.check_writable(tmp_path / "file" / "sub")


def test_load_run_and_check_run_read_layer_folders_in_layer_order(tmp_path):
    """layer_10 comes after layer_2 (not in the order of the names), in both; a stray layer_x/ is no layer."""
    for l in (10, 2):
        saved.save(sae.SAE(sae.SAEConfig(d_in=8, n_latents=32, k=4)), tmp_path / f"layer_{l}", {"run": {"layers": [l], "model": "m"}})
    (tmp_path / "layer_x").mkdir()
    assert [ls for ls, _, _ in saved.load_run(tmp_path)] == [[2], [10]]
    assert [m["run"]["layers"] for m in saved.check_run(tmp_path)] == [[2], [10]]
    assert [ls for ls, _, _ in saved.open_run(tmp_path)] == [[2], [10]]

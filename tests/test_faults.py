"""Faults that used to give a silent wrong result or lose a finished model: each case, the exact
one-line message, and that nothing is lost or mixed up (train.py, metrics.py, the run folder, the cache)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from support import cache as activation_cache
from support import saved
from support import evaluate
import train


def flags(gpt2_dir, cache_dir, out, *extra):
    return ["--model", gpt2_dir, "--layers", "0-3", "--tokens", "1536", "--eval-tokens", "512",
            "--batch-size", "128", "--n-latents", "64", "--k", "4", "--context", "64", "--dict", "crosscoder",
            "--cache", str(cache_dir), "--out", str(out), "--device", "cpu", "--dead-tokens", "1000",
            "--ckpt-every", "4", "--lr", "3e-3", *extra]


def error_of(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def same_weights(a_dir, b_dir):
    a, b = saved.load(a_dir), saved.load(b_dir)
    return all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------------------
# 1. A resumed run keeps the data it trained on
# ----------------------------------------------------------------------------------------


def test_a_cache_rebuilt_by_another_run_does_not_change_a_resumed_run(gpt2_dir, tmp_path, ctrl_c_at):
    """Run A is interrupted after a checkpoint; run B rebuilds the shared cache with more tokens, which
    re-estimates its scale (fewer than activations.SCALE_TOKENS tokens either way); A resumes with its own
    scale on the same tokens and equals A run without interruption on a cache nobody touched."""
    shared, untouched = tmp_path / "shared", tmp_path / "untouched"
    full, part, other = tmp_path / "full", tmp_path / "part", tmp_path / "other"
    assert train.main(flags(gpt2_dir, untouched, full)) == 0
    ctrl_c_at(5)                                            # after the step-4 checkpoint
    assert train.main(flags(gpt2_dir, shared, part)) == 130
    ctrl_c_at(None)
    scale_before = activation_cache.ActivationCache(shared).scale
    assert train.main(flags(gpt2_dir, shared, other, "--cache-tokens", "4096")) == 0    # rebuilds it
    assert not torch.equal(activation_cache.ActivationCache(shared).scale, scale_before)
    assert train.main(flags(gpt2_dir, shared, part, "--resume")) == 0
    assert same_weights(full, part)
    run = json.loads((part / "config.json").read_text())
    assert run["config"]["input_scale"] == scale_before.tolist()


def test_resume_refuses_a_cache_whose_tokens_changed(gpt2_dir, tmp_path, ctrl_c_at, capsys):
    cache, part = tmp_path / "c", tmp_path / "part"
    ctrl_c_at(5)
    assert train.main(flags(gpt2_dir, cache, part)) == 130
    ctrl_c_at(None)
    meta = json.loads((cache / "meta.json").read_text())
    shard = cache / meta["shards"][0][0]                    # rebuilt from an edited corpus: the same size and
    rows = np.fromfile(shard, dtype=np.float16).reshape(meta["shards"][0][1], -1)      # settings, other tokens
    rows[::-1].tofile(shard)
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, part, "--resume")))
    assert line == (f"error: cannot resume {str(part)!r}: the activation cache {str(cache)!r} no longer holds the "
                    f"tokens this run trained on (rebuilt since, with other tokens); rebuild it as it was "
                    f"(--cache-tokens 2048) into another --cache folder, or start a new run")


# ----------------------------------------------------------------------------------------
# 2. Evaluators and train.py never share a folder; results name the weights they came from
# ----------------------------------------------------------------------------------------

QUICK_METRICS = ["--device", "cpu", "--ce-tokens", "0", "--fc-tokens", "0", "--wasserstein", ""]


@pytest.fixture(scope="module")
def cache(gpt2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("acts") / "c"
    activation_cache.build_cache(path, gpt2_dir, [0, 1, 2, 3], n_tokens=2048, context=64, multi=True, drop_outliers=10.0)
    return path


def test_metrics_refuses_a_folder_that_train_is_writing_and_train_refuses_one_being_evaluated(
        gpt2_dir, cache, tmp_path, capsys):
    from support import runs

    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out)) == 0
    with runs.RunFolder(out, resume=True):                 # a train.py --resume holds it
        line = error_of(capsys, evaluate.main([str(out), *QUICK_METRICS]))
    assert line == f"error: {str(out)!r} is being written by a train.py run: evaluate it once that run has finished"
    assert not (out / "eval.json").exists()
    with runs.reading(out):                                 # metrics.py holds it
        line = error_of(capsys, train.main(flags(gpt2_dir, cache, out, "--overwrite", "--k", "8")))
    assert "is in use by another train.py run or an evaluation of it" in line
    assert saved.load(out).config.k == 4                    # the evaluated model was not replaced


def test_a_result_records_its_weights_and_is_refused_once_the_run_is_replaced(gpt2_dir, cache, tmp_path):
    from support import runs

    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out)) == 0
    assert evaluate.main([str(out), *QUICK_METRICS]) == 0
    digest = json.loads((out / "config.json").read_text())["weights_sha256"]
    assert runs.read_result(out, "eval.json")["weights_sha256"] == {".": digest}
    stale = (out / "eval.json").read_bytes()
    assert train.main(flags(gpt2_dir, cache, out, "--overwrite", "--k", "8")) == 0
    (out / "eval.json").write_bytes(stale)                  # an eval.json of the k=4 model beside the k=8 one
    with pytest.raises(ValueError, match=r"eval.json' was computed from other weights than the model now in"):
        runs.read_result(out, "eval.json")


# ----------------------------------------------------------------------------------------
# 3, 4, 6, 13: resume compares the flags; repeated tokens are said; features refuse an interrupted run;
# a moved run resumes
# ----------------------------------------------------------------------------------------


def test_resume_on_a_finished_run_compares_the_flags(gpt2_dir, cache, tmp_path, capsys):
    out, c01 = tmp_path / "run", tmp_path / "c01"
    assert train.main(flags(gpt2_dir, c01, out, "--layers", "0,1")) == 0
    line = error_of(capsys, train.main(flags(gpt2_dir, c01, out, "--dict", "sae", "--layers", "1", "--resume")))
    assert line.startswith(f"error: cannot resume {str(out / 'checkpoint.pt')!r}: flags differ from the checkpoint's")
    assert "'layers': ('0,1', '1')" in line and "'kind': 'sae'" in line
    assert train.main(flags(gpt2_dir, c01, out, "--layers", "0,1", "--resume")) == 0        # the same flags
    assert "already finished its 12 steps" in capsys.readouterr().out


def test_tokens_beyond_the_cache_are_said_with_the_numbers(gpt2_dir, cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out, "--cache-tokens", "2048", "--tokens", "6144")) == 0
    err = capsys.readouterr().err
    assert ("warning: --tokens 6,144 is 4.0 passes over the cache's 1,536 training tokens (2,048 cached, 512 of them "
            "held out); --cache-tokens 6,656 would give one pass") in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 48


def test_features_refuse_an_interrupted_run(gpt2_dir, cache, tmp_path, ctrl_c_at, capsys):
    from latents import features

    out = tmp_path / "run"
    ctrl_c_at(5)
    assert train.main(flags(gpt2_dir, cache, out)) == 130
    ctrl_c_at(None)
    capsys.readouterr()
    line = error_of(capsys, features.main([str(out), "--device", "cpu", "--tokens", "256", "--quiet"]))
    assert line.startswith(f"error: {str(out)!r} holds an interrupted run (training stopped after 6 of 12 steps)")
    assert not (out / "features.json").exists()
    (out / "config.json").write_text("{not json")
    line = error_of(capsys, features.main([str(out), "--device", "cpu", "--allow-incomplete"]))
    assert line.startswith(f"error: {str(out / 'config.json')!r} is not valid JSON")


def test_a_moved_interrupted_run_resumes(gpt2_dir, cache, tmp_path, ctrl_c_at):
    full, part, moved = tmp_path / "full", tmp_path / "part", tmp_path / "elsewhere" / "part"
    assert train.main(flags(gpt2_dir, cache, full)) == 0
    ctrl_c_at(5)
    assert train.main(flags(gpt2_dir, cache, part)) == 130
    ctrl_c_at(None)
    moved.parent.mkdir()
    shutil.move(part, moved)
    assert train.main(flags(gpt2_dir, cache, moved, "--resume")) == 0
    assert same_weights(full, moved)


# ----------------------------------------------------------------------------------------
# 7. A kill between the export's two renames loses nothing
# ----------------------------------------------------------------------------------------


def dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("then", ["metrics", "resume", "new run"])
def test_an_export_killed_between_its_renames_is_finished_by_whoever_comes_next(gpt2_dir, cache, tmp_path, capsys,
                                                                                then):
    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out)) == 0
    pid = dead_pid()                       # as _Export leaves it when killed after `os.rename(path, old)`
    new = out.parent / f".run.export-{pid}"
    shutil.copytree(out, new)
    digest = json.loads((new / "config.json").read_text())["weights_sha256"]
    (out / "summary.json").write_text('{"old": true}')
    out.rename(out.parent / f".run.old-{pid}")
    if then == "metrics":
        assert evaluate.main([str(out), *QUICK_METRICS]) == 0
    elif then == "resume":
        assert train.main(flags(gpt2_dir, cache, out, "--resume")) == 0
        assert "already finished" in capsys.readouterr().out
    else:
        line = error_of(capsys, train.main(flags(gpt2_dir, cache, out)))
        assert "already holds a run" in line                 # the finished run is back, and protected
    assert json.loads((out / "config.json").read_text())["weights_sha256"] == digest
    assert "old" not in json.loads((out / "summary.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]        # no temporary left


def test_a_half_written_export_and_checkpoint_of_a_dead_run_are_removed(gpt2_dir, cache, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out)) == 0
    pid = dead_pid()
    (out.parent / f".run.export-{pid}").mkdir()            # killed while writing its export
    (out / f".checkpoint.pt.tmp-{pid}").write_bytes(b"half")
    assert train.main(flags(gpt2_dir, cache, out, "--overwrite")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------
# 8, 9, 10, 11, 12: disk full, Ctrl-C in the harvest, an uncreatable --out, huge requests, nothing held out
# ----------------------------------------------------------------------------------------


def test_a_cache_that_cannot_fit_is_refused_before_the_harvest(gpt2_dir, tmp_path, capsys, monkeypatch):
    from support import files

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage",                      # (the run folder's own check passes)
                        lambda p: real(p)._replace(free=10_000) if Path(p) == tmp_path else real(p))
    cache = tmp_path / "c"
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, tmp_path / "run")))
    assert line == (f"error: the activation cache (2,048 tokens × 4 layers × 64 × 2 bytes) needs 1,048,576 bytes at "
                    f"{str(tmp_path)!r} but only 10,000 are free: free some space, write elsewhere or ask for less")
    assert sorted(p.name for p in tmp_path.iterdir()) == []               # no cache, no run folder, no temporary


def test_tokens_accept_1e12_and_a_petabyte_cache_is_refused_up_front(gpt2_dir, tmp_path, capsys):
    line = error_of(capsys, train.main(flags(gpt2_dir, tmp_path / "c", tmp_path / "run", "--tokens", "1e12")))
    assert line.startswith("error: the activation cache (1,000,000,000,512 tokens × 4 layers × 64 × 2 bytes) needs "
                           "512,000,000,262,144 bytes at")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_temporary(gpt2_dir, cache, tmp_path, capsys,
                                                                          monkeypatch):
    from support import runs

    def full(state, f):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(runs.torch, "save", full)
    monkeypatch.setattr(runs.RunFolder, "check_space", lambda *a: None)   # the disk fills up during the run
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    out = tmp_path / "run"
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, out)))
    assert line.startswith(f"error: disk full at {str(out / 'checkpoint.pt')!r}: ") and "bytes needed" in line
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name] if out.exists() else True


def test_ctrl_c_during_the_harvest_is_one_line_and_leaves_no_temporary(gpt2_dir, tmp_path, capsys, monkeypatch):
    import activations

    real = activations.harvest_batches

    def harvest_then_ctrl_c(*a, **k):
        for i, x in enumerate(real(*a, **k)):
            if i == 2:
                raise KeyboardInterrupt
            yield x

    monkeypatch.setattr(activations, "harvest_batches", harvest_then_ctrl_c)
    assert train.main(flags(gpt2_dir, tmp_path / "c", tmp_path / "run")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "interrupted before training started: nothing was saved (a partial cache is removed)"
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_out_that_cannot_be_created_is_named(gpt2_dir, cache, capsys):
    line = error_of(capsys, train.main(flags(gpt2_dir, cache, "/proc/forbidden")))
    assert line.startswith("error: cannot create the run folder '/proc/forbidden': ")


def test_a_run_that_held_out_nothing_is_named_by_the_evaluators(gpt2_dir, cache, tmp_path, capsys):
    from latents import features

    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out, "--eval-tokens", "0", "--cache-tokens", "2048")) == 0
    want = (f"error: {str(out)!r} holds out no tokens: it was trained with --eval-tokens 0, so every token of its "
            f"data was trained on; train it again with --eval-tokens N (N > 0) to evaluate it")
    assert error_of(capsys, evaluate.main([str(out), *QUICK_METRICS])) == want
    assert error_of(capsys, features.main([str(out), "--device", "cpu", "--quiet"])) == want


# ----------------------------------------------------------------------------------------
# 14. A long document is tokenised in bounded pieces, to the same tokens
# ----------------------------------------------------------------------------------------


def test_a_long_document_is_tokenised_in_pieces_to_the_same_windows(gpt2_dir, monkeypatch):
    from transformers import AutoTokenizer

    from support import corpora

    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    words = ["the", "river", "flows", "past", "1,234", "mountains;", "Dr.", "O'Neil", "said:", "\"yes\"", "—",
             "naïve", "café", "  double", "\ttab", "\nline", "end."]
    rng = __import__("random").Random(0)
    doc = " ".join(rng.choice(words) for _ in range(60_000))          # ~0.4 M characters
    whole = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    want = [[tok.eos_token_id] + whole[i:i + 63] for i in range(0, len(whole), 63)]
    lengths = []
    real_call = type(tok).__call__

    def spy(self, text, *a, **k):
        lengths.append(len(text))
        return real_call(self, text, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    monkeypatch.setattr(corpora, "PIECE_CHARS", 10_000)
    got = list(corpora.windows(tok, [doc], 64))
    assert max(lengths) <= 10_000 and len(lengths) > 30               # never the whole document at once
    assert [w for w in got if len(w) == 64] == [w for w in want if len(w) == 64]
    assert "".join(corpora.pieces(doc, 10_000)) == doc
    assert [len(p) for p in corpora.pieces("x" * 25, 10)] == [10, 10, 5]   # no space: cut where it must be


def test_a_run_moved_out_with_no_export_to_replace_it_is_moved_back(gpt2_dir, cache, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(gpt2_dir, cache, out)) == 0
    digest = json.loads((out / "config.json").read_text())["weights_sha256"]
    out.rename(tmp_path / f".run.old-{dead_pid()}")       # its export vanished: the old run is all there is
    assert evaluate.main([str(out), *QUICK_METRICS]) == 0
    assert json.loads((out / "config.json").read_text())["weights_sha256"] == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

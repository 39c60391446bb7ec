"""train.py --wandb: what an offline W&B run wrote, read back from its .wandb file (no network, no login), and
the one-line error without the package.

The .wandb file is W&B's transaction log: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB-log
records (crc32c 4 bytes, length 2 bytes little-endian, type 1 byte: FULL 1, FIRST 2, MIDDLE 3, LAST 4) in
32 KiB blocks, each record a wandb_internal_pb2.Record (wandb's own schema). wandb 0.31 ships no Python reader
of it, so `records` is that format written out."""
import json
import struct
import sys

import pytest

import train
from support import tracking

wandb = pytest.importorskip("wandb")       # in requirements.txt (tests): CI runs this


def records(path):
    """Every Record of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, part, block = 7, [], b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:                       # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                                # FULL, LAST: a whole record
            r = pb.Record()
            r.ParseFromString(part)
            out.append(r)
            part = b""
    return out


def read_run(run_dir):
    """(run id, config, [(step, {key: value})] of the history, summary) of one offline run folder."""
    (log,) = run_dir.glob("run-*.wandb")
    run_id, config, history, summary = None, {}, [], {}
    key = lambda item: item.key or "/".join(item.nested_key)                      # noqa: E731
    for r in records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {key(i): json.loads(i.value_json) for i in r.history.item}
            history.append((row.pop("_step"), row))
        elif kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in r.summary.update})
    return run_id, config, history, summary


def flags(gpt2_dir, cache_dir, out, *extra):
    return ["--model", gpt2_dir, "--layers", "0-3", "--tokens", "2560", "--eval-tokens", "1024",
            "--batch-size", "128", "--n-latents", "64", "--k", "8", "--context", "64", "--cache", str(cache_dir),
            "--out", str(out), "--device", "cpu", "--dead-tokens", "1000", "--ckpt-every", "0", "--lr", "3e-3",
            "--log-every", "5", "--eval-every", "10", "--eval-panel", "512", "--wandb", "fmx-test", *extra]


def test_wandb_offline_logs_config_bar_curve_summary_and_resume_continues_the_run(
        gpt2_dir, tmp_path, monkeypatch, ctrl_c_at):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    out = tmp_path / "run"
    argv = flags(gpt2_dir, tmp_path / "acts", out, "--dict", "crosscoder", "--dict", "sae", "--name", "saes")
    ctrl_c_at(12)                                      # stops after step 13 of 20
    first = train.train(train.parse_args(argv))
    assert first["steps"] == 13 and first["interrupted"]
    ctrl_c_at(None)
    summary = train.train(train.parse_args(argv + ["--resume"]))
    assert summary["steps"] == 20 and summary["complete"]

    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2                              # the first run and its resume
    (id1, config, hist1, _), (id2, _, hist2, final) = read_run(runs[0]), read_run(runs[1])
    assert id1 == id2 == json.loads((out / tracking.WANDB_FILE).read_text())["id"]      # the same W&B run
    assert config["train"]["wandb"] == "fmx-test" and config["train"]["batch_size"] == 128
    assert config["dictionaries"]["crosscoder/all"]["n_latents"] == 64 and "saes/3" in config["dictionaries"]

    # the bar's figures per dictionary at every --log-every reading (steps 5, 10; then 15, 20 after the resume)
    bar = lambda hist: {s: r for s, r in hist if "train/crosscoder/FVU" in r}          # noqa: E731
    assert sorted(bar(hist1)) == [5, 10] and sorted(bar(hist2)) == [15, 20]
    for row in list(bar(hist1).values()) + list(bar(hist2).values()):
        assert {f"train/{n}/{f}" for n in ("crosscoder", "saes") for f in ("loss", "L0", "FVU", "dead")} <= set(row)
        assert row["train/tokens_per_s"] > 0
    # every --eval-every point of curve.jsonl, FC included, at its step
    curve = {json.loads(l)["step"]: json.loads(l)["eval"] for l in (out / "curve.jsonl").read_text().splitlines()}
    assert sorted(curve) == [0, 10, 20]
    logged = {s: r for s, r in hist1 + hist2 if "eval/crosscoder/all/fvu" in r}
    assert sorted(logged) == [0, 10, 20]
    for step, ev in curve.items():
        assert logged[step]["eval/crosscoder/all/fvu"] == pytest.approx(ev["crosscoder/all"]["fvu"])
        assert logged[step]["eval/crosscoder/all/fc_mean"] == pytest.approx(ev["crosscoder/all"]["fc_mean"])
        assert logged[step]["eval/saes/3/l0"] == pytest.approx(ev["saes/3"]["l0"])
    # the final summary: summary.json's figures
    assert final["final/steps"] == 20 and final["final/complete"] is True
    assert final["final/eval/crosscoder/all/fvu"] == pytest.approx(summary["eval"]["crosscoder/all"]["fvu"])
    assert final["final/eval/saes/3/dead_eval"] == pytest.approx(summary["eval"]["saes/3"]["dead_eval"])


def test_without_wandb_installed_the_flag_is_one_line_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)           # import wandb raises ImportError
    assert train.main(["--wandb", "proj", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --wandb needs the package wandb, which is not installed: pip install wandb"
    assert not (tmp_path / "run").exists()

"""Fixed-seed train.py runs of every kind, and metrics.py on one of them: the behaviour a refactor must keep.

    python tests/golden.py write DIR          # run them all into DIR (weights, summary.json, eval.json)
    python tests/golden.py compare A B        # bit-identical? (torch.equal; the same machine and threads)
    python tests/golden.py fixture            # refresh tests/fixtures/golden/ (expected.safetensors + json)

tests/test_golden.py reruns them and compares with tests/fixtures/golden/ within a tolerance (other CPUs
pick other kernels); `write` before and after a change plus `compare` is the bit-identical check.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

FIXTURE = ROOT / "tests" / "fixtures" / "golden"
COMMON = ["--layers", "1-2", "--tokens", "2048", "--eval-tokens", "512", "--batch-size", "128",
          "--n-latents", "32", "--k", "4", "--context", "64", "--device", "cpu", "--dead-tokens", "256",
          "--ckpt-every", "0", "--lr", "3e-3", "--seed", "0"]
RUNS = {   # name: dictionary flags (each run exercises masking, BatchTopK, AuxK or the stale norms)
    "sae": ["--dict", "sae", "--sparsity", "topk"],
    "crosscoder": ["--dict", "crosscoder", "--sparsity", "batchtopk", "--mask-prob", "0.1"],
    "fmxcoder_tr": ["--dict", "fmxcoder", "--factorization", "tr", "--rank", "8"],
    "fmxcoder_cp": ["--dict", "fmxcoder", "--factorization", "cp", "--rank", "64", "--sparsity", "topk"],
    "polysae": ["--dict", "polysae", "--ranks", "16,8,8"],
}
EVAL_RUN = "crosscoder"
EVAL_FLAGS = ["--ce-tokens", "256", "--fc-tokens", "512", "--wasserstein", "", "--batch-size", "256",
              "--device", "cpu", "--quiet"]
SUMMARY_KEYS = ("steps", "tokens", "complete", "eval")   # what does not depend on timing
# norm_every's buffers, the crosscoder's until issue 29 moved them to the fmxcoder (the crosscoder never used them)
MOVED = {"crosscoder/model.safetensors:steps_done", "crosscoder/model.safetensors:score_scale"}


def write(out: Path, gpt2_dir: Path | None = None) -> None:
    """Train every RUNS entry on the tiny GPT-2 into out/<name>/, then metrics.py on out/EVAL_RUN."""
    from support import evaluate
    import train
    from tiny_gpt2 import tiny_gpt2

    out = Path(out)
    gpt2 = gpt2_dir or tiny_gpt2(out / "gpt2")
    for name, flags in RUNS.items():
        train.train(train.parse_args(["--model", str(gpt2), "--cache", str(out / "acts"), "--out",
                                      str(out / name), *COMMON, *flags]))
    assert evaluate.main([str(out / EVAL_RUN), *EVAL_FLAGS]) == 0


def weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run folder's dictionaries, keyed 'file:name' (one file per layer for sae/polysae)."""
    from safetensors.torch import load_file

    return {f"{p.relative_to(run)}:{k}": v for p in sorted(Path(run).rglob("model.safetensors"))
            for k, v in load_file(p).items()}


def results(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(every run's weights, {name: summary's stable keys} + {"eval": eval.json's metrics})."""
    tensors, numbers = {}, {}
    for name in RUNS:
        tensors.update({f"{name}/{k}": v for k, v in weights(out / name).items() if f"{name}/{k}" not in MOVED})
        summary = json.loads((out / name / "summary.json").read_text())
        numbers[name] = {k: summary.get(k) for k in SUMMARY_KEYS}
    ev = json.loads((out / EVAL_RUN / "eval.json").read_text())
    numbers["eval"] = {"results": ev["results"], "drop_outliers": ev["drop_outliers"]}   # not the paths
    return tensors, numbers


def compare(a: Path, b: Path) -> bool:
    (ta, na), (tb, nb) = results(a), results(b)
    same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    print(f"{len(ta)} tensors, bit-identical: {same}; summaries and eval.json equal: {na == nb}")
    for k in sorted(set(ta) | set(tb)):
        if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]):
            print("  differs:", k)
    return same and na == nb


def fixture(tmp: Path) -> None:
    from safetensors.torch import save_file

    write(tmp)
    tensors, numbers = results(tmp)
    FIXTURE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, FIXTURE / "expected.safetensors")
    (FIXTURE / "expected.json").write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or ["help"]
    if cmd == "write":
        write(Path(args[0]))
    elif cmd == "compare":
        raise SystemExit(0 if compare(Path(args[0]), Path(args[1])) else 1)
    elif cmd == "fixture":
        import tempfile
        with tempfile.TemporaryDirectory() as t:
            fixture(Path(t))
    else:
        print(__doc__)

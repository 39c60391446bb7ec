"""Behaviour pinned: fixed-seed train.py runs of every kind (sae, crosscoder, fmxcoder TR and CP, polysae) on
the tiny GPT-2, and metrics.py's eval.json of one of them, against tests/fixtures/golden/ (written by
`python tests/golden.py fixture` on the code before the core.py/train.py restructure of issue 29).

Other CPUs pick other kernels (CI: ATEN_CPU_CAPABILITY=default, 1 or 2 threads), so this compares within a
tolerance: the portable kernels move a weight by at most 1.5e-3 of its tensor's largest entry (measured),
a change of behaviour (another draw order, another sparsifier, a moved default) by far more. The
bit-identical check on one machine is `python tests/golden.py write A` before, `... write B` after,
`python tests/golden.py compare A B`."""
import json

import pytest
import torch
from safetensors.torch import load_file

import golden


@pytest.fixture(scope="module")
def rerun(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    golden.write(out, gpt2_dir)
    return golden.results(out)


def test_training_gives_the_recorded_weights(rerun):
    expected = {k: v for k, v in load_file(golden.FIXTURE / "expected.safetensors").items() if k not in golden.MOVED}
    got, _ = rerun
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        err = (got[key] - want).abs().max().item()
        assert err <= 1e-2 * want.abs().max().item() + 1e-6, f"{key}: max |diff| {err:.3g}"


def close(got, want, path=""):
    """Every float within 1e-3 relative, everything else equal, in nested dicts and lists."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            close(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-9), path
    else:
        assert got == want, path


def test_summaries_and_eval_json_are_the_recorded_ones(rerun):
    _, got = rerun
    close(json.loads(json.dumps(got)), json.loads((golden.FIXTURE / "expected.json").read_text()))

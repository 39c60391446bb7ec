"""The layout promises: each model file works copied with the shared core alone (only torch installed),
and run folders written before the layout change still load and give the same outputs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import saved

ROOT = Path(__file__).resolve().parent.parent
OLD_RUNS = Path(__file__).resolve().parent / "fixtures" / "old_runs"

# Runs the copied file as `python X.py` would, in an interpreter where every installed package but torch
# and what torch requires is hidden (an import of one fails, as with only torch installed).
AUDIT = r"""
import importlib.metadata as md, re, runpy, sys

def name(req):
    return re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")

keep, todo = set(), ["torch"]
while todo:                                   # torch and its requirements, recursively (no extras)
    dist = todo.pop()
    if dist in keep:
        continue
    keep.add(dist)
    try:
        reqs = md.distribution(dist).requires or []
    except md.PackageNotFoundError:
        continue
    todo += [name(r) for r in reqs if "extra ==" not in r]
hidden = {top for top, dists in md.packages_distributions().items()
          if not any(d.lower().replace("_", "-") in keep for d in dists)}

class Hide:                                   # the path finder, blind to the hidden packages
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, fullname, path=None, target=None):
        return None if fullname.split(".")[0] in hidden else self.finder.find_spec(fullname, path, target)

    def invalidate_caches(self):
        self.finder.invalidate_caches()

sys.meta_path = [Hide(f) if getattr(f, "__name__", "") == "PathFinder" else f for f in sys.meta_path]
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.parametrize("files", [
    ["sae.py", "core.py"],
    ["polysae.py", "core.py"],
    ["crosscoder.py", "core.py"],
    ["fmxcoder.py", "crosscoder.py", "core.py"],
])
def test_a_model_file_runs_its_demo_copied_with_the_core_alone(tmp_path, files):
    for f in files:
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "audit.py").write_text(AUDIT)
    # -E -s: no PYTHONPATH, no user site; the folder of the copies is the script's, as for `python X.py`
    res = subprocess.run([sys.executable, "-E", "-s", "audit.py", files[0]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    demo_line = next(l for l in res.stdout.splitlines() if "FVU" in l)
    assert float(demo_line.split("FVU")[1].split()[0]) < 0.5, demo_line      # it trained


FIXTURES = {"sae": "sae", "crosscoder": "crosscoder", "fmxcoder": "fmxcoder", "polysae": "polysae",
            "sae_set/layer_3": "sae", "sae_set/layer_5": "sae"}


@pytest.mark.parametrize("name", FIXTURES)
def test_a_run_folder_written_before_the_layout_change_loads_and_gives_its_outputs(name):
    """config.json of the old layout names a module path ("class": "sae.SAE"); today's code maps it to
    the registered kind and gives the outputs that code recorded (a different version of the code: float
    rounding may differ)."""
    folder = OLD_RUNS / name
    meta = json.loads((folder / "config.json").read_text())
    assert "kind" not in meta and meta["class"].startswith(FIXTURES[name])
    model = saved.load(folder)
    assert saved.kind_of(model) == FIXTURES[name]
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        out = model(expected["x"])
    torch.testing.assert_close(out.latents, expected["latents"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon, expected["recon"], rtol=1e-5, atol=1e-6)


def test_an_old_per_layer_set_opens_as_a_run():
    entries = saved.open_run(OLD_RUNS / "sae_set")
    assert [layers for layers, _, _ in entries] == [[3], [5]]


@pytest.mark.parametrize("norm_every", [1, 10])
def test_a_crosscoder_saved_with_norm_every_loads_with_the_same_outputs(tmp_path, norm_every):
    """norm_every (stale selection norms in training) moved from crosscoder.py to fmxcoder.py (issue 29).
    A crosscoder's config.json that records it, with any value, loads (the option never changed what the
    saved weights compute: evaluation selects with the exact norms), its old buffers steps_done and
    score_scale are dropped, and the outputs are the recorded ones."""
    folder = tmp_path / "cc"
    shutil.copytree(OLD_RUNS / "crosscoder", folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["norm_every"] = norm_every
    (folder / "config.json").write_text(json.dumps(meta))
    model = saved.load(folder)
    assert not hasattr(model.config, "norm_every") and "score_scale" not in model.state_dict()
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(expected["x"]).recon, expected["recon"], rtol=1e-5, atol=1e-6)
    saved.check_saved(folder)                      # the run check accepts it too (no error)


def test_norm_every_is_an_fmxcoder_option_and_refused_for_a_crosscoder(capsys):
    import train

    assert train.main(["--dict", "crosscoder", "--norm-every", "3"]) == 2
    assert "--norm-every is not an option of --dict crosscoder" in capsys.readouterr().err
    cfg = train.parse_args(["--dict", "fmxcoder", "--norm-every", "3"])
    assert cfg.dictionaries[0]["options"] == {"norm_every": 3}

"""support/saelens.py against the real SAELens (sae_lens 6.54.12): import of the folders SAELens itself wrote
(tests/fixtures/saelens/<name>/, with SAELens's own outputs), export round trips, our committed exports
(tests/fixtures/saelens/ours/, accepted by SAELens: ours/CHECK.jsonl), and, when an interpreter with sae_lens
is given, SAELens loading a fresh export.

Tolerances. Where our computation differs from SAELens's (folds in float64, then float32 products of d = 16
terms in another order), outputs are compared with rtol 1e-5, atol 1e-6: check_export.py's default, a few
float32 ulps of values of order 1. The latents' support is compared exactly."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import core
import crosscoder
import fmxcoder
import sae
from support import evaluate, saelens, saelens_export, saved

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saelens"
NAMES = ("standard", "topk", "topk_rescale", "topk_trained", "batchtopk", "jumprelu")
TOL = {"rtol": 1e-5, "atol": 1e-6}      # SAELens's float32 computation vs ours (see the module docstring)
SAELENS_PYTHON = os.environ.get("SAELENS_PYTHON", "/tmp/saelens-venv/bin/python")


def make_exports():
    """tests/fixtures/saelens/make_exports.py as a module (it builds our committed exports)."""
    spec = importlib.util.spec_from_file_location("make_exports", FIXTURES / "make_exports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_fixture(name: str, tmp_path: Path, **cfg_changes) -> Path:
    """A copy of fixture `name` whose cfg.json has `cfg_changes` (a "metadata" dict is merged; None deletes)."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in cfg_changes.items():
        if key == "metadata":
            cfg["metadata"] = {k: v for k, v in {**cfg["metadata"], **value}.items() if v is not None}
        elif value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@torch.no_grad()
def outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    z = model.encode(x)
    return {"pre_acts": model.pre_acts(x), "latents": z, "recon": model.decode(z), "forward": model(x).recon}


# ----------------------------------------------------------------------------------------
# Import: SAELens's own folders give SAELens's own outputs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_import_gives_saelens_outputs(name):
    model, meta = saelens.load(FIXTURES / name)
    exp = load_file(FIXTURES / name / "expected.safetensors")
    got = outputs(model, exp["x"])
    assert not model.training and isinstance(model, sae.SAE)
    for key in ("latents", "recon", "forward"):
        torch.testing.assert_close(got[key], exp[key], **TOL)
    assert torch.equal(got["latents"] != 0, exp["latents"] != 0)
    # pre-activations: SAELens's hook_sae_acts_pre is before the decoder-norm rescale, ours after the fold
    cfg = json.loads((FIXTURES / name / "cfg.json").read_text())
    n_F = load_file(FIXTURES / name / "sae_weights.safetensors")["W_dec"].norm(dim=-1)
    rescaled = cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm")
    torch.testing.assert_close(got["pre_acts"], exp["pre_acts"] * n_F if rescaled else exp["pre_acts"], **TOL)
    sparsity = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[cfg["architecture"]]
    assert meta["config"]["sparsity"] == sparsity
    assert meta["run"]["layers"] == [15] and meta["run"]["model"] == "smollm2-135m" and meta["run"]["context"] == 128


def test_import_of_a_rescaled_topk_folds_the_decoder_norms_as_saelens():
    """rescale_acts_by_decoder_norm: SAELens selects by pre·‖W_dec‖; after the fold our W_dec rows are unit."""
    model, _ = saelens.load(FIXTURES / "topk_rescale")
    raw = load_file(FIXTURES / "topk_rescale" / "sae_weights.safetensors")
    n_F = raw["W_dec"].norm(dim=-1)
    assert (n_F - 1).abs().max() > 0.1                         # the fixture's rows are far from unit norm
    torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(48), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.W_enc, raw["W_enc"] * n_F, **TOL)


def test_import_folds_apply_b_dec_to_input_false_into_b_enc():
    model, meta = saelens.load(FIXTURES / "jumprelu")
    raw = load_file(FIXTURES / "jumprelu" / "sae_weights.safetensors")
    assert meta["saelens"]["apply_b_dec_to_input"] is False
    torch.testing.assert_close(model.b_enc, raw["b_enc"] + raw["b_dec"] @ raw["W_enc"], **TOL)
    assert torch.equal(model.b_dec, raw["b_dec"]) and torch.equal(model.threshold, raw["threshold"])


def test_saelens_batchtopk_equals_our_batchtopk_inference_and_training_selection():
    """SAELens saves its BatchTopK as jumprelu with θ·1: our own batchtopk SAE with the scalar θ (inference) gives
    the same latents, and our training-time batch top-k gives SAELens's training encode (k·B = 32 entries)."""
    imported, _ = saelens.load(FIXTURES / "batchtopk")
    exp = load_file(FIXTURES / "batchtopk" / "expected.safetensors")
    theta_F = imported.threshold
    assert theta_F.shape == (48,) and torch.equal(theta_F, theta_F[:1].expand(48)) and theta_F[0] > 0
    ours = sae.SAE(sae.SAEConfig(d_in=16, n_latents=48, k=4, sparsity="batchtopk", decoder_norm="free")).eval()
    ours.load_state_dict({**imported.state_dict(), "threshold": theta_F[0].clone()})
    got = outputs(ours, exp["x"])
    torch.testing.assert_close(got["latents"], exp["latents"], **TOL)
    torch.testing.assert_close(got["recon"], exp["recon"], **TOL)
    batch_BF = core.dense(core.sparsify(got["pre_acts"], "batchtopk", 4, True, ours.threshold))
    assert int((exp["batch_latents"] != 0).sum()) == 32
    assert torch.equal(batch_BF != 0, exp["batch_latents"] != 0)
    torch.testing.assert_close(batch_BF, exp["batch_latents"], **TOL)


def test_jumprelu_is_strict_per_latent_and_survives_our_save_and_load(tmp_path):
    model, _ = saelens.load(FIXTURES / "jumprelu")
    pre = torch.tensor([[0.5, 0.5, -1.0]])
    theta = torch.tensor([0.5, 0.4, -2.0])
    assert torch.equal(core.sparsify(pre, "jumprelu", 1, False, theta), torch.tensor([[0.0, 0.5, 0.0]]))
    saved.save(model, tmp_path / "ours", {"run": {"model": "smollm2-135m", "layers": [15]}})
    back = saved.load(tmp_path / "ours")
    assert back.threshold.shape == (48,) and back.config.sparsity == "jumprelu"
    x = load_file(FIXTURES / "jumprelu" / "expected.safetensors")["x"]
    for key, value in outputs(model, x).items():
        assert torch.equal(outputs(back, x)[key], value), key
    fresh = sae.SAE(sae.SAEConfig(d_in=4, n_latents=6, k=1, sparsity="jumprelu"))
    assert fresh.threshold.shape == (6,) and sae.SAE(sae.SAEConfig(d_in=4, n_latents=6, k=1)).threshold.shape == ()


def test_jumprelu_is_refused_in_training(gpt2_dir, tmp_path, capsys):
    import train

    model, _ = saelens.load(FIXTURES / "jumprelu")
    model.train()
    with pytest.raises(ValueError, match="^jumprelu is inference only: SAEs imported from SAELens"):
        model(torch.zeros(2, 16))
    out = tmp_path / "run"
    assert train.main(["--model", gpt2_dir, "--dict", "sae", "--sparsity", "jumprelu", "--layers", "1",
                       "--out", str(out), "--cache", str(tmp_path / "acts"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --sparsity jumprelu is inference only") and "topk" in err
    assert not (tmp_path / "acts").exists()                  # refused before any harvest


@pytest.mark.parametrize("hook,layer", [
    ("blocks.15.hook_resid_post", 15), ("blocks.0.hook_resid_post", 0), ("blocks.15.hook_resid_pre", 14),
    ("blocks.1.hook_resid_pre", 0), ("model.layers.7", 7), ("transformer.h.3", 3), ("gpt_neox.layers.11", 11),
])
def test_hook_names_map_to_our_block_outputs(hook, layer):
    assert saelens.layer_of_hook(hook) == layer


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out",
                                  "blocks.3.hook_attn_out", "blocks.3.attn.hook_z", "blocks.3.mlp.hook_post",
                                  "hook_embed", "model.layers.3.mlp", "blocks.3.hook_resid_post.x"])
def test_other_hooks_are_refused_in_one_line(hook):
    with pytest.raises(ValueError) as e:
        saelens.layer_of_hook(hook, "gpt2")
    msg = str(e.value)
    assert "\n" not in msg and f"cannot map hook {hook!r} to a residual-stream block output of gpt2" in msg
    assert "blocks.L.hook_resid_post" in msg


@pytest.mark.parametrize("changes,weights,expect", [
    ({"dtype": None}, None, "no 'dtype'"),
    ({"dtype": "int8"}, None, "dtype 'int8' is not one of"),
    ({"d_in": None}, None, "no 'd_in'"),
    ({"d_sae": 0}, None, "d_sae must be a positive integer"),
    ({"architecture": "gated"}, None, "architecture 'gated' cannot be loaded here"),
    ({"architecture": "batchtopk"}, None, "a SAELens training checkpoint"),
    ({"normalize_activations": "layer_norm"}, None, "normalize_activations 'layer_norm' cannot be loaded"),
    ({"metadata": {"hook_name": "blocks.15.hook_mlp_out", "hf_hook_name": None}}, None, "cannot map hook"),
    ({"metadata": {"hook_name": "blocks.0.hook_resid_pre"}}, None, "it is the embedding"),
    ({"metadata": {"hook_name": None, "hf_hook_name": None}}, None, "no metadata.hook_name"),
    ({"metadata": {"model_name": None}}, None, "no metadata.model_name"),
    ({"reshape_activations": "hook_z"}, None, "attention heads"),
    ({"k": 48}, None, "does not fit sae.SAE"),
    ({}, "missing", "sae_weights.safetensors' is missing"),
    ({}, "truncated", "truncated or damaged"),
    ({}, "transposed", "W_dec has shape (16, 48), expected (48, 16)"),
    ({}, "extra", "(extra ['threshold'])"),
])
def test_what_cannot_be_mapped_is_one_line_naming_the_file(tmp_path, changes, weights, expect):
    folder = copy_fixture("topk", tmp_path, **changes)
    file = folder / ("sae_weights.safetensors" if weights else "cfg.json")
    w = load_file(folder / "sae_weights.safetensors")
    if weights == "missing":
        file.unlink()
    elif weights == "truncated":
        file.write_bytes(file.read_bytes()[:100])
    elif weights == "transposed":
        save_file({**w, "W_dec": w["W_dec"].T.contiguous()}, file)
    elif weights == "extra":
        save_file({**w, "threshold": torch.zeros(48)}, file)
    for opener in (saelens.load, saved.load, saved.check_run, saved.open_run):
        with pytest.raises(ValueError) as e:
            opener(folder)
        assert "\n" not in str(e.value) and str(file) in str(e.value) and expect in str(e.value), (opener, str(e.value))


def test_invalid_json_and_accepted_variants(tmp_path):
    bad = copy_fixture("topk", tmp_path)
    (bad / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json' is not valid JSON"):
        saved.check_run(bad)
    exp = load_file(FIXTURES / "topk" / "expected.safetensors")
    # expected_average_only_in is the identity at inference (FORMAT.md §4)
    avg, _ = saelens.load(copy_fixture("topk", tmp_path / "avg", normalize_activations="expected_average_only_in"))
    torch.testing.assert_close(outputs(avg, exp["x"])["recon"], exp["recon"], **TOL)
    # the HF module name of SAELens's HookedProxyLM, and a float64 file: used in float32
    hf = copy_fixture("topk", tmp_path / "hf", dtype="float64", metadata={"hook_name": "model.layers.9"})
    weights = hf / "sae_weights.safetensors"
    save_file({k: v.double() for k, v in load_file(weights).items()}, weights)
    model, meta = saelens.load(hf)
    assert meta["run"]["layers"] == [9] and model.W_enc.dtype == torch.float32
    torch.testing.assert_close(outputs(model, exp["x"])["latents"], exp["latents"], **TOL)
    # a TransformerLens alias becomes the HF name load_lm takes
    gpt2 = copy_fixture("topk", tmp_path / "tl", metadata={"model_name": "gpt2-small"})
    assert saelens.describe(gpt2)["run"]["model"] == "gpt2"
    assert saelens.hf_model_name("pythia-70m-deduped") == "EleutherAI/pythia-70m-deduped"


def test_a_pre_6_cfg_is_read_as_saelens_reads_it(tmp_path):
    """No sae_lens_version ≥ 6: metadata at the top level, hook_point, activation_fn_str topk (SAELens's
    handle_pre_6_0_config)."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    shutil.copy(FIXTURES / "topk" / "sae_weights.safetensors", folder)
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": 16, "d_sae": 48, "dtype": "float32", "model_name": "smollm2-135m",
        "hook_point": "blocks.15.hook_resid_post", "context_size": 64, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4}, "normalize_activations": False}))
    model, meta = saelens.load(folder)
    assert meta["config"]["sparsity"] == "topk" and meta["config"]["k"] == 4 and meta["run"]["context"] == 64
    exp = load_file(FIXTURES / "topk" / "expected.safetensors")
    torch.testing.assert_close(outputs(model, exp["x"])["recon"], exp["recon"], **TOL)


# ----------------------------------------------------------------------------------------
# Opening a SAELens folder as a run (metrics.py, probe.py, latents/)
# ----------------------------------------------------------------------------------------


def test_a_saelens_folder_opens_as_a_complete_run():
    (layers, model, meta), = saved.load_run(FIXTURES / "standard")
    assert layers == [15] and saved.meta_kind(meta) == "sae" and meta["train"]["fold_scale"] is True
    assert saved.run_entry(FIXTURES / "standard", meta, ("model",))["model"] == "smollm2-135m"
    assert saved.dictionary_dirs(FIXTURES / "standard") == [FIXTURES / "standard"]
    assert saved.dictionary_dirs(FIXTURES) == []               # a folder of SAELens folders is not one run
    assert isinstance(saved.load(FIXTURES / "standard"), sae.SAE)


def test_d_mismatch_with_the_model_is_one_line(gpt2_dir, tmp_path, capsys):
    import metrics
    import probe

    folder = copy_fixture("topk", tmp_path, metadata={"model_name": gpt2_dir, "hook_name": "blocks.1.hook_resid_post"})
    want = "d_in 16 does not match the width 64 of model"
    with pytest.raises(ValueError, match=want):
        saved.open_run(folder)
    assert evaluate.main([str(folder), "--device", "cpu", "--quiet"]) == 2
    assert probe.main([str(folder), "--task", "us_places", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and want in line for line in err)
    deep = tmp_path / "deep"
    saelens_export.export_dictionary(trained_sae("topk", 0, d=64), {"run": {"model": gpt2_dir, "layers": [9]}}, deep)
    assert "hf_hook_name" not in json.loads((deep / "cfg.json").read_text())["metadata"]   # there is no block 9
    with pytest.raises(ValueError, match="is layer 9, but model .* has 4 blocks"):
        saved.check_run(deep)


@pytest.mark.slow
def test_metrics_on_a_saelens_fixture_names_the_smollm2_width(capsys):
    """The fixtures say smollm2-135m (d 576) but have d_in 16: metrics.py stops at once, in one line."""
    import metrics

    assert evaluate.main([str(FIXTURES / "topk"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d_in 16 does not match the width 576 of model 'smollm2-135m'" in err


# ----------------------------------------------------------------------------------------
# Export: ours → SAELens folder → our loader
# ----------------------------------------------------------------------------------------


def trained_sae(sparsity: str, steps: int, scale: float = 0.37, d: int = 12, seed: int = 0) -> sae.SAE:
    """A small SAE trained `steps` Adam steps on random data (θ calibrates for batchtopk), input_scale `scale`."""
    torch.manual_seed(seed)
    model = sae.SAE(sae.SAEConfig(d_in=d, n_latents=32, k=3, sparsity=sparsity, l1_coeff=1e-3, input_scale=[scale]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, d)
    model.init_b_dec(x, "mean")
    for _ in range(steps):
        core.train_step(model, opt, x)
    return model.eval()


def run_meta(layer: int = 3, **run) -> dict:
    return {"run": {"model": "smollm2-135m", "layers": [layer], "context": 64, "dataset": "bbc",
                    "hooks": [f"model.layers.{layer}"], "name": "test", **run}}


@pytest.mark.parametrize("sparsity,steps,arch", [
    ("topk", 5, "topk"), ("batchtopk", 5, "jumprelu"), ("batchtopk", 0, "topk"), ("relu", 5, "standard")])
def test_export_round_trip_reads_raw_activations(tmp_path, sparsity, steps, arch):
    model = trained_sae(sparsity, steps)
    if sparsity == "batchtopk":
        assert (model.threshold >= 0) == (steps > 0)          # calibrated by training, or not yet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saelens_export.export_dictionary(model, run_meta(), tmp_path / "out")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.config.input_scale == [0.37]
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    md = cfg["metadata"]
    assert cfg["architecture"] == arch and cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (12, 32, "float32")
    assert cfg.get("k") == (3 if arch == "topk" else None)
    assert cfg.get("rescale_acts_by_decoder_norm") is (False if arch == "topk" else None)
    assert md["sae_lens_version"] == "6.54.12" and md["model_name"] == "smollm2-135m" and md["context_size"] == 64
    assert md["hook_name"] == "blocks.3.hook_resid_post" and md["hf_hook_name"] == "model.layers.3"
    assert md["prepend_bos"] is True and md["dataset_path"] == "bbc"
    assert md["training_architecture"] == {"relu": "standard"}.get(sparsity, sparsity)
    back, meta = saelens.load(tmp_path / "out")
    x = 3.0 * torch.randn(64, 12)
    with torch.no_grad():
        want = model(x * 0.37)
        got = back(x)
    assert torch.equal(got.latents != 0, want.latents != 0)
    torch.testing.assert_close(got.latents, want.latents, **TOL)
    torch.testing.assert_close(got.recon, want.recon / 0.37, **TOL)
    assert meta["run"]["layers"] == [3] and meta["run"]["dataset"] == "bbc" and back.config.input_scale == [1.0]
    if arch == "jumprelu":
        assert torch.equal(back.threshold, model.threshold.expand(32))


def test_export_refuses_to_overwrite_and_names_the_file(tmp_path):
    model = trained_sae("topk", 0)
    saelens_export.export_dictionary(model, run_meta(), tmp_path / "out")
    with pytest.raises(ValueError, match="cfg.json' exists: pass --overwrite"):
        saelens_export.export_dictionary(model, run_meta(), tmp_path / "out")
    saelens_export.export_dictionary(model, run_meta(), tmp_path / "out", overwrite=True)


def test_polysae_exports_its_linear_part_with_a_warning(tmp_path, capsys):
    mod = make_exports()
    model = mod.random_polysae(seed=1)
    saelens_export.export_dictionary(model, run_meta(), tmp_path / "poly")
    assert "quadratic and cubic decoder terms" in capsys.readouterr().err
    md = json.loads((tmp_path / "poly" / "cfg.json").read_text())["metadata"]
    assert "dropped" in md["exported_from"]["polysae_dropped"] and md["exported_from"]["order"] == 3
    back, _ = saelens.load(tmp_path / "poly")
    x = 3.0 * torch.randn(64, 12)
    exp = mod.expected(model, x)
    got = outputs(back, x)
    torch.testing.assert_close(got["latents"], exp["latents"], **TOL)
    torch.testing.assert_close(got["recon"], exp["recon"], **TOL)
    assert (got["recon"] - exp["polysae_recon"]).abs().max() > 0.1     # the dropped terms matter


@pytest.mark.parametrize("kind", ["crosscoder", "fmxcoder"])
def test_multi_layer_dictionaries_are_refused(tmp_path, kind, capsys):
    if kind == "crosscoder":
        model = crosscoder.CrossCoder(crosscoder.CrossCoderConfig(d_in=8, n_latents=16, k=2, n_layers=3))
    else:
        model = fmxcoder.FMXCoder(fmxcoder.FMXCoderConfig(d_in=8, n_latents=16, k=2, n_layers=3, rank=[4, 2, 3]))
    saved.save(model, tmp_path / "run", {"run": {"model": "smollm2-135m", "layers": [1, 2, 3]}})
    with pytest.raises(ValueError, match=f"holds a {kind}: crosscoders and fmxcoders are exported in our own format"):
        saelens_export.export(tmp_path / "run", tmp_path / "out")
    with pytest.raises(ValueError, match=f"a {kind} is exported in our own format only"):
        saelens_export.export_dictionary(model, run_meta(), tmp_path / "out")
    assert saelens_export.main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "our own format only" in err
    assert not (tmp_path / "out").exists()


def test_export_of_a_per_layer_run_and_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    models = {l: trained_sae("topk", 3, scale=0.5 + l / 10, seed=l) for l in (3, 5)}
    for l, m in models.items():
        saved.save(m, run / f"layer_{l}", run_meta(l))
    assert saelens_export.main(["export", str(run), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("wrote") == 2
    entries = saved.load_run(tmp_path / "out")                  # a folder of layer_<l>/ SAELens folders
    assert [layers for layers, _, _ in entries] == [[3], [5]]
    x = torch.randn(16, 12)
    for layers, back, meta in entries:
        m = models[layers[0]]
        assert meta["saelens"]["hook_name"] == f"blocks.{layers[0]}.hook_resid_post"
        with torch.no_grad():
            (s,) = m.config.input_scale
            torch.testing.assert_close(back(x).recon, m(x * s).recon / s, **TOL)
    assert saelens_export.main(["export", str(run), str(tmp_path / "out")]) == 2          # exists: --overwrite
    assert saelens_export.main(["export", str(run), str(tmp_path / "out"), "--overwrite"]) == 0
    assert saelens_export.main(["export", str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
    assert saelens_export.main(["bogus"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    two = tmp_path / "two"
    for name in ("a", "b"):
        saved.save(models[3], two / name, run_meta())
    with pytest.raises(ValueError, match="holds several dictionaries \\(a, b\\): export one of them"):
        saelens_export.export(two, tmp_path / "o3")


def test_the_module_runs_as_a_command(tmp_path):
    saved.save(trained_sae("relu", 0), tmp_path / "run", run_meta())
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "support.saelens", "export", str(tmp_path / "run"), str(tmp_path / "x")],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "x" / "cfg.json").is_file(), r.stderr
    r = subprocess.run([sys.executable, "-m", "support.saelens", "export", str(tmp_path / "run"), str(tmp_path / "x")],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_metrics_and_probe_run_unchanged_on_an_exported_saelens_folder(gpt2_dir, tmp_path):
    """A SAE on the tiny GPT-2 (d 64), exported; metrics.py and probe.py evaluate the SAELens folder alone."""
    import probe

    model = trained_sae("topk", 3, d=64)
    saelens_export.export_dictionary(model, {"run": {"model": gpt2_dir, "layers": [1], "context": 32, "dataset": None}},
                              tmp_path / "sl")
    md = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert md["hf_hook_name"] == "transformer.h.1" and "dataset_path" not in md   # from the config, no download
    ev = evaluate.evaluate_run(tmp_path / "sl", "cpu", eval_tokens=256, ce_tokens=64, fc_tokens=0,
                              wasserstein_task=None)
    (r,) = ev["results"]
    assert r["name"] == "layer 1" and r["tokens"] == 256 and 0 < r["l0"] <= 3 and "harvested 256 tokens" in ev["data"]
    assert all(isinstance(r[k], float) for k in ("fvu", "mse_raw", "ce_increase"))
    report = probe.probe_run(tmp_path / "sl", ["us_places"], ks=(1,), n_train=20, n_test=10, n_boot=0)
    assert report["dict"] == "sae" and report["layers"] == [1] and "sae" in report["tasks"]["us_places"]["features"]


def test_a_centred_transformer_lens_residual_stream_is_warned_about(gpt2_dir, tmp_path, capsys):
    """SAELens reads HookedTransformer.from_pretrained_no_processing(**model_from_pretrained_kwargs): with
    center_writing_weights true on a LayerNorm model its residual stream is not the HF block output."""
    saelens_export.export_dictionary(trained_sae("topk", 0, d=64), {"run": {"model": gpt2_dir, "layers": [1]}}, tmp_path / "a")
    md = json.loads((tmp_path / "a" / "cfg.json").read_text())["metadata"]
    assert md["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    saved.check_run(tmp_path / "a")
    assert capsys.readouterr().err == ""
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"center_writing_weights": True}
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    saved.check_run(tmp_path / "a")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "centred residual stream of this gpt2 model" in err


# ----------------------------------------------------------------------------------------
# Our committed exports (tests/fixtures/saelens/ours/): not drifted, and accepted by SAELens
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk", "batchtopk", "batchtopk_uncalibrated", "relu", "polysae", "jumprelu"])
def test_our_exporter_has_not_drifted_from_what_saelens_accepted(tmp_path, name):
    """Re-export the committed source: the same cfg.json and tensors as the folder SAELens 6.54.12 accepted
    (ours/CHECK.jsonl), and our loader gives the expected outputs on it. Tensors: folding is exact elementwise
    arithmetic; a PolySAE's U C1ᵀ is a float32 product (ulps across BLAS builds)."""
    ours = FIXTURES / "ours" / name
    saelens_export.export(ours / "source", tmp_path / name)
    assert json.loads((tmp_path / name / "cfg.json").read_text()) == json.loads((ours / "cfg.json").read_text())
    new, old = load_file(tmp_path / name / "sae_weights.safetensors"), load_file(ours / "sae_weights.safetensors")
    assert new.keys() == old.keys()
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=1.3e-6, atol=1e-7)
    exp = load_file(ours / "expected.safetensors")
    source = saved.load(ours / "source")
    again = make_exports().expected(source, exp["x"])
    for k in ("latents", "recon"):
        torch.testing.assert_close(again[k], exp[k], rtol=1.3e-6, atol=1e-6)   # the same computation, re-run
    back, _ = saelens.load(ours)
    got = outputs(back, exp["x"])
    torch.testing.assert_close(got["latents"], exp["latents"], **TOL)
    torch.testing.assert_close(got["recon"], exp["recon"], **TOL)
    lines = [json.loads(s) for s in (FIXTURES / "ours" / "CHECK.jsonl").read_text().splitlines()]
    checked = {line["folder"]: line for line in lines}[f"tests/fixtures/saelens/ours/{name}"]
    assert checked["ok"] and checked["sae_lens"] == "6.54.12" and checked["support_equal"]
    assert checked["architecture"] == json.loads((ours / "cfg.json").read_text())["architecture"]


def saelens_python() -> str | None:
    """SAELENS_PYTHON (default /tmp/saelens-venv/bin/python) if it can import sae_lens, else None."""
    if not Path(SAELENS_PYTHON).is_file():
        return None
    r = subprocess.run([SAELENS_PYTHON, "-c", "import sae_lens; print(sae_lens.__version__)"],
                       capture_output=True, text=True)
    return SAELENS_PYTHON if r.returncode == 0 else None


def test_saelens_itself_loads_a_fresh_export(tmp_path):
    """check_export.py, run by an interpreter with sae_lens (SAELENS_PYTHON; see tests/fixtures/saelens/README.md),
    on every kind exported now: SAE.load_from_disk, encode and decode give our outputs."""
    python = saelens_python()
    if python is None:
        pytest.skip(f"no sae_lens importable from {SAELENS_PYTHON} (set SAELENS_PYTHON; see "
                    f"tests/fixtures/saelens/README.md)")
    mod = make_exports()
    folders = mod.write(tmp_path / "ours")
    lines = mod.check(python, folders)
    assert len(lines) == len(mod.NAMES)
    for line in lines:
        assert line["ok"] and line["support_equal"] and "error" not in line, line

"""Export: our SAE or PolySAE (a run folder of train.py) as a SAELens folder that SAELens loads as it is.

    python -m support.saelens export RUN OUT       # (this module's `main`; support/saelens.py reads such folders)

The format, the mapping of the weights and what carries over are described in support/saelens.py.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from support import cli, saved
from support.files import json_text, write_atomic
from support.saelens import CFG, SAELENS_VERSION, WEIGHTS, local_lm_config


# ----------------------------------------------------------------------------------------
# Export: our SAE or PolySAE → a SAELens folder
# ----------------------------------------------------------------------------------------


def saelens_tensors(model) -> tuple[str, dict[str, Tensor]]:
    """(architecture, tensors) of a dictionary that reads raw activations (input_scale folded): the encoder and
    b_dec as they are, W_dec = its linear decoder (a PolySAE's D1 = U C1ᵀ), and threshold for jumprelu."""
    c = model.config
    theta = model.threshold.detach().float().cpu()
    if c.sparsity == "relu":
        arch, extra = "standard", {}
    elif c.sparsity == "jumprelu":
        arch, extra = "jumprelu", {"threshold": theta}
    elif c.sparsity == "batchtopk" and float(theta) >= 0:       # calibrated: SAELens's own BatchTopK export
        arch, extra = "jumprelu", {"threshold": theta.expand(c.n_latents)}
    else:                                                       # topk, or batchtopk still inferring as TopK
        arch, extra = "topk", {}
    tensors = {"W_enc": model.W_enc, "b_enc": model.b_enc, "W_dec": model.decoder_vectors(), "b_dec": model.b_dec}
    return arch, {k: v.detach().float().cpu().contiguous() for k, v in {**tensors, **extra}.items()}


def hf_block_path(run: dict, layer: int) -> str | None:
    """The HF module path of block `layer` (metadata.hf_hook_name): from the run's recorded hooks, else from the
    model's config when known without a download (activations.block_paths on a skeleton on the meta device)."""
    hooks = [h for h in run.get("hooks") or [] if isinstance(h, str) and h.rsplit(".", 1)[-1] == str(layer)]
    if len(hooks) == 1:
        return hooks[0]
    config = local_lm_config(run["model"]) if run.get("model") else None
    if config is None:
        return None
    import activations
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        return activations.block_paths(skeleton)[layer]
    except (ValueError, IndexError, KeyError):
        return None


def saelens_cfg(model, arch: str, run: dict, layer: int, source: dict) -> dict:
    """cfg.json of the exported folder: the keys SAE.save_model writes for `arch`, and the metadata
    (sae_lens_version >= 6.0, so SAELens keeps it)."""
    c = model.config
    md = {"sae_lens_version": SAELENS_VERSION, "model_name": run.get("model"), "model_class_name": "HookedTransformer",
          "hook_name": f"blocks.{layer}.hook_resid_post", "hook_head_index": None,
          "model_from_pretrained_kwargs": {"center_writing_weights": False},   # we read the uncentred HF output
          "context_size": run.get("context"), "prepend_bos": True, "exclude_special_tokens": True}
    hf_hook = hf_block_path(run, layer)
    if hf_hook:
        md["hf_hook_name"] = hf_hook
    if run.get("dataset"):
        md["dataset_path"] = run["dataset"]
    md["training_architecture"] = {"relu": "standard"}.get(c.sparsity, c.sparsity)
    if c.sparsity in ("topk", "batchtopk"):
        md["training_architecture_details"] = {"k": c.k, "rescale_acts_by_decoder_norm": False}
    md["exported_from"] = source
    cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none"}
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    return {**cfg, "metadata": md}


POLY_DROPPED = ("the PolySAE's quadratic and cubic decoder terms (lambda2 y2 + lambda3 y3) are dropped: this folder "
                "holds its linear part (W_dec = U C1^T), whose reconstruction differs from the PolySAE's")


def export_dictionary(model, meta: dict, out_dir, overwrite: bool = False) -> Path:
    """One SAE or PolySAE (with its config.json `meta`) → a SAELens folder `out_dir`; the model is not changed."""
    kind = saved.kind_of(model)
    if kind not in ("sae", "polysae"):
        raise ValueError(f"a {kind} is exported in our own format only (its encoder sums over layers, so per-layer "
                         f"SAELens folders would not be the same model): export sae or polysae runs")
    run = meta.get("run") or {}
    layers = run.get("layers") or []
    if len(layers) != 1:
        raise ValueError(f"the {kind} to export has no single layer in its run.layers ({layers!r}): cannot name its "
                         f"hook")
    m = copy.deepcopy(model).cpu().eval()
    scale = list(m.config.input_scale)
    if scale != [1.0]:
        m.fold_input_scale()                        # the folder reads the model's raw activations
    arch, tensors = saelens_tensors(m)
    source = {"project": "fmxcoders", "kind": kind, "sparsity": m.config.sparsity, "input_scale_folded": scale[0],
              "run": run.get("name")}
    if "drop_outliers" in run:                      # the outlier rule it was trained (and is evaluated) with
        source["drop_outliers"] = run["drop_outliers"]
    if kind == "polysae":
        source.update(polysae_dropped=POLY_DROPPED, order=m.config.order, ranks=list(m.config.ranks))
        print(f"warning: {POLY_DROPPED}", file=sys.stderr)
    write_folder(Path(out_dir), saelens_cfg(m, arch, run, layers[0], source), tensors, overwrite)
    return Path(out_dir)


def write_folder(out: Path, cfg: dict, tensors: dict[str, Tensor], overwrite: bool) -> None:
    from safetensors.torch import save as to_bytes

    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file: pass a folder for the SAELens export")
    if (out / CFG).exists() and not overwrite:
        raise ValueError(f"{str(out / CFG)!r} exists: pass --overwrite (overwrite=True) to replace it")
    cli.check_writable(out, "the SAELens folder")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS, to_bytes(tensors))
    write_atomic(out / CFG, json_text(cfg, indent=2))


def export(run_dir, out_dir, overwrite: bool = False, allow_incomplete: bool = False) -> list[Path]:
    """A run folder of one SAE / PolySAE (→ out_dir) or a per-layer set (→ out_dir/layer_<l>/) as SAELens
    folders; the folders written, the run read under its shared lock (runs.reading). One-line ValueErrors:
    crosscoders and fmxcoders, a folder of several dictionaries, an unusable run (saved.check_run), an out_dir
    that is (inside) one of our run folders."""
    from support import runs

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    inside = runs.enclosing_run(out_dir)
    if inside is not None:
        where = "" if inside == out_dir.absolute() else "inside "
        raise ValueError(f"{str(out_dir)!r} is {where}the run folder {str(inside)!r}: a run folder holds one run, "
                         f"which train.py replaces as a whole; export to a folder of its own")
    with runs.reading(run_dir):             # train.py cannot replace the run meanwhile
        return _export(run_dir, out_dir, overwrite, allow_incomplete)


def _export(run_dir: Path, out_dir: Path, overwrite: bool, allow_incomplete: bool) -> list[Path]:
    members = saved.set_members(run_dir)
    if members:
        raise ValueError(f"{str(run_dir)!r} holds several dictionaries ({', '.join(m.name for m in members)}): export "
                         f"one of them, e.g. {str(members[0])!r}")
    metas = saved.check_run(run_dir, allow_incomplete)
    kinds = {saved.meta_kind(m) for m in metas}
    if kinds - {"sae", "polysae"}:
        kind = sorted(kinds - {"sae", "polysae"})[0]
        raise ValueError(f"{str(run_dir)!r} holds a {kind}: crosscoders and fmxcoders are exported in our own format "
                         f"only (the encoder sums over layers, so per-layer SAELens folders are not the same model)")
    entries = saved.open_run(run_dir, "cpu", allow_incomplete)
    single = saved.dictionary_dirs(run_dir) == [run_dir]
    return [export_dictionary(model, meta, out_dir if single else out_dir / f"layer_{layers[0]}", overwrite)
            for layers, model, meta in entries]


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgParser(prog="python -m support.saelens", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a run's SAE(s) (or a PolySAE's linear part) as SAELens folders")
    e.add_argument("run", help="run folder written by train.py (one sae/polysae, or a per-layer set)")
    e.add_argument("out", help="the SAELens folder (a per-layer set: OUT/layer_<l>/ for each layer)")
    e.add_argument("--overwrite", action="store_true", help="replace SAELens folders already there")
    e.add_argument("--allow-incomplete", action="store_true", help="export a run whose training was interrupted")
    try:
        a = p.parse_args(argv)
        written = export(a.run, a.out, a.overwrite, a.allow_incomplete)
    except cli.USER_ERRORS as err:
        return cli.cli_error(err)
    for path in written:
        print(f"wrote {path} (SAELens {SAELENS_VERSION}: SAE.load_from_disk({str(path)!r}))")
    return 0

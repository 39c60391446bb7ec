"""SAELens folders in and out: our SAEs (and a PolySAE's linear part) as SAELens SAEs, and SAELens SAEs as ours.

    python -m support.saelens export RUN_DIR OUT_DIR     # per-layer run → OUT_DIR/layer_<l>/; one SAE → OUT_DIR
    python metrics.py SAELENS_FOLDER --device cpu         # import: every entry point opens a SAELens folder
    python probe.py SAELENS_FOLDER --task us_places       #   (support/saved.py calls `load` and `check` below)

The format is sae_lens 6.54.12's (tests/fixtures/saelens/FORMAT.md, read from its constants.py,
saes/sae.py, saes/standard_sae.py, saes/topk_sae.py, saes/jumprelu_sae.py, saes/batchtopk_sae.py and
loading/pretrained_sae_loaders.py; the fixtures there were written by that version). A folder holds
cfg.json and sae_weights.safetensors {W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,), and for
jumprelu threshold (F,)}; sparsity.safetensors (a trainer's log10 firing frequency) is never read, as
SAE.load_from_disk never reads it. SAELens encodes
    h = x − b_dec · apply_b_dec_to_input,   pre = h W_enc + b_enc,   x̂ = z W_dec + b_dec
and sae.SAE: pre = (x − b_dec) W_enc + b_enc, x̂ = z W_dec + b_dec, so the weights carry over as they are.

Export (ours → SAELens), on a copy whose config.input_scale s is folded in (`fold_input_scale`), so the
folder reads the model's raw activations and says normalize_activations "none":
    ours                                 cfg.json                                   weights
    sae / polysae, sparsity "topk"       architecture topk, k, rescale_acts_by_decoder_norm false
                                         (we select by pre, SAELens's rule without rescale)
    "batchtopk", calibrated θ ≥ 0        jumprelu, metadata.training_architecture   threshold = θ·1 (F,)
                                         "batchtopk" (how SAELens itself saves a BatchTopK SAE;
                                         ReLU(pre)·1[ReLU(pre) > θ] = ReLU(pre)·1[pre > θ] when θ ≥ 0)
    "batchtopk", uncalibrated θ < 0      topk, k (our inference is then per-row TopK)
    "relu"                               standard
    "jumprelu" (an import saved again)   jumprelu                                   threshold (F,)
    polysae                              the linear part only: W_dec = D1 = U C1ᵀ. The quadratic and cubic terms
                                         λ2 y2 + λ3 y3 are DROPPED, so the folder's reconstruction differs from the
                                         PolySAE's (a printed warning; metadata.exported_from.polysae_dropped)
    crosscoder, fmxcoder                 refused: the encoder sums over layers, per-layer folders are not the model
    run.model, context, dataset, layer l metadata.model_name, context_size, dataset_path, hook_name
                                         "blocks.{l}.hook_resid_post", hf_hook_name (the HF module of block l, when
                                         known without a download), prepend_bos true, sae_lens_version "6.54.12"
                                         (≥ 6.0, or SAELens reads cfg.json as a legacy one and drops the metadata),
                                         model_from_pretrained_kwargs {"center_writing_weights": false} (SAELens's
                                         own training default: TransformerLens's residual stream = the HF output)

Import (SAELens → sae.SAE in eval mode, decoder_norm "free", input_scale 1), `load`:
    architecture standard → "relu";  topk → "topk" (k);  jumprelu → "jumprelu" (core.py: inference only,
        z = ReLU(pre)·1[pre > θ_f], threshold (F,)); anything else (gated, transcoders, training-only
        batchtopk checkpoints, ...) refused
    topk with rescale_acts_by_decoder_norm true: the decoder norms n are folded in as SAELens's _fold_norm_topk
        does (W_enc·n, b_enc·n, W_dec/n), so selection and latents are SAELens's (latents in units of pre·n)
    apply_b_dec_to_input false: b_enc ← b_enc + b_dec W_enc, so (x − b_dec) W_enc + b_enc' = x W_enc + b_enc
    normalize_activations "none", "expected_average_only_in" (the identity at inference); others refused
    metadata.hook_name (or hf_hook_name) → our layer l (= the output of block l, activations.py):
        blocks.L.hook_resid_post → L;  blocks.L.hook_resid_pre → L − 1 (L ≥ 1);  model.layers.L,
        transformer.h.L, gpt_neox.layers.L (SAELens's HookedProxyLM names) → L;  anything else refused
    metadata.model_name → run.model (TransformerLens aliases such as gpt2-small → their HF names),
        context_size → run.context, dataset_path → run.dataset (None: the offline BBC news; to evaluate on other
        text, e.g. offline, set metadata.dataset_path to "bbc" or a local folder: SAELens never reads it)
    the outlier rule (run.drop_outliers): metadata.exported_from.drop_outliers when we exported it (the rule
        the run was trained with), else train.py's default (activations.DROP_OUTLIERS: tokens whose norm is
        above 10 × the median dropped), so that an SAE evaluated through its SAELens folder and through its run
        folder is evaluated on the same kind of tokens; every result records the rule
    weights of any dtype are used in float32; a pre-6.0 cfg.json (top-level metadata, hook_point,
        activation_fn_str) is read as SAELens's handle_pre_6_0_config reads it

What cannot be carried: a PolySAE's nonlinear terms; multi-layer encoders; our training state (dead-latent
counter, optimiser); SAELens SAEs on other hooks (attention z, MLP or attention outputs, heads), its other
architectures, per-token normalisations (constant_norm_rescale, layer_norm); SAELens's sparsity.safetensors.
An imported SAE is evaluated on the first tokens of its dataset (not necessarily held out from its training).
One imported with model_from_pretrained_kwargs center_writing_weights true on a LayerNorm model (GPT-2, Pythia)
read TransformerLens's centred residual stream: opening it prints a warning (`centring_caveat`).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from support import kinds

SAELENS_VERSION = "6.54.12"          # the version whose format this follows (tests/fixtures/saelens/VERSION)
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}       # SAELens → our sparsity
NORMALIZATIONS = ("none", "expected_average_only_in")                              # identities at inference
DTYPES = ("float32", "float64", "float16", "bfloat16")
HOOKS = ((re.compile(r"blocks\.(\d+)\.hook_resid_post"), 0),                      # TransformerLens names
         (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), -1),
         (re.compile(r"(?:model\.layers|transformer\.h|gpt_neox\.layers)\.(\d+)"), 0))  # HF block modules
HOOKS_TEXT = ("blocks.L.hook_resid_post, blocks.L.hook_resid_pre (L >= 1) and the block outputs model.layers.L, "
              "transformer.h.L, gpt_neox.layers.L")
TL_ALIASES = {"gpt2-small": "gpt2"}                              # TransformerLens names that are not HF names
TL_PREFIXES = {"pythia-": "EleutherAI/", "gemma-": "google/"}    # pythia-70m-deduped → EleutherAI/pythia-70m-deduped
LAYERNORM_LMS = ("gpt2", "gpt_neox", "gpt_neo", "gptj", "opt", "bloom", "phi")   # TransformerLens centres them
LEGACY_KEYS = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}             # handle_pre_6_0_config's renames
METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                 "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                 "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                 "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")  # LLM_METADATA_KEYS


# ----------------------------------------------------------------------------------------
# Import: a SAELens folder as our config.json-shaped meta, and as a sae.SAE
# ----------------------------------------------------------------------------------------


def is_saelens_folder(path) -> bool:
    """A folder with SAELens's cfg.json and no config.json of ours (the weights are checked by `check`)."""
    path = Path(path)
    return (path / CFG).is_file() and not (path / "config.json").is_file()


def read_cfg(folder: Path) -> dict:
    """cfg.json as SAELens 6 reads it ({architecture, d_in, d_sae, dtype, ..., metadata}): a pre-6.0 one
    (no sae_lens_version >= 6, metadata at the top level) converted as handle_pre_6_0_config does."""
    file = folder / CFG
    try:
        cfg = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(file)!r} holds {type(cfg).__name__}, not a JSON object: not a SAELens cfg.json")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    major = re.match(r"\d+", str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or ""))
    if major and int(major[0]) >= 6:                             # handle_config_defaulting's test
        return {**cfg, "metadata": meta}
    old = {LEGACY_KEYS.get(key, key): v for key, v in cfg.items()}
    old.setdefault("architecture", "standard")
    old.setdefault("apply_b_dec_to_input", True)
    topk = (old.get("activation_fn_kwargs") or {}).get("k")
    if old.get("activation_fn") == "topk" and topk is not None:
        old.update(architecture="topk", k=topk)
    norm = old.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:                  # a pre-6.0 boolean
        old["normalize_activations"] = "expected_average_only_in" if norm else "none"
    old["metadata"] = {key: v for key, v in old.items() if key in METADATA_KEYS}   # a nested one is dropped
    return old


def layer_of_hook(hook: str, model: str = "the model") -> int:
    """Our layer l (the output of block l) of a SAELens hook name; ValueError for any other hook."""
    for pattern, shift in HOOKS:
        m = pattern.fullmatch(hook)
        if m and int(m[1]) + shift >= 0:
            return int(m[1]) + shift
        if m:
            raise ValueError(f"cannot map hook {hook!r} to a residual-stream block output of {model}: it is the "
                             f"embedding (the input of block 0); only {HOOKS_TEXT} are harvested here")
    raise ValueError(f"cannot map hook {hook!r} to a residual-stream block output of {model}: only {HOOKS_TEXT} "
                     f"are harvested here")


def hf_model_name(name: str) -> str:
    """The name load_lm takes for a SAELens model_name: a TransformerLens alias (gpt2-small, pythia-70m-deduped,
    gemma-2-2b) becomes its HF hub name; any other name (an HF name, a short name, a folder) stays."""
    if name in TL_ALIASES:
        return TL_ALIASES[name]
    for prefix, org in TL_PREFIXES.items():
        if name.startswith(prefix) and "/" not in name and not Path(name).expanduser().exists():
            return org + name
    return name


def positive_int(cfg: dict, key: str, file: Path) -> int:
    v = cfg.get(key)
    if v is None:
        raise ValueError(f"{str(file)!r} has no {key!r}: SAELens's load_from_disk needs it too")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{str(file)!r}: {key} must be a positive integer, got {v!r}")
    return v


def checked_fields(cfg: dict, file: Path) -> tuple[str, int, int, str, str]:
    """(architecture, d_in, d_sae, dtype, normalize_activations) of cfg.json, each one we can map."""
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        hint = (" (a SAELens training checkpoint: SAE.load_from_disk refuses it too; save it with "
                "save_inference_model, which writes jumprelu)" if arch in ("batchtopk", "matryoshka_batchtopk") else "")
        raise ValueError(f"{str(file)!r}: architecture {arch!r} cannot be loaded here: only "
                         f"{', '.join(ARCHITECTURES)} map to sae.SAE{hint}")
    d_in, d_sae = positive_int(cfg, "d_in", file), positive_int(cfg, "d_sae", file)
    dtype = str(cfg.get("dtype") or "").removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"{str(file)!r}: " + (f"dtype {cfg['dtype']!r} is not one of {', '.join(DTYPES)}"
                         if cfg.get("dtype") else "no 'dtype' (SAELens's load_from_disk fails on it too): add "
                         "e.g. \"dtype\": \"float32\""))
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALIZATIONS:
        raise ValueError(f"{str(file)!r}: normalize_activations {norm!r} cannot be loaded here: only "
                         f"{', '.join(NORMALIZATIONS)} (the identity at inference) are (FORMAT.md §4)")
    return arch, d_in, d_sae, dtype, norm


def model_and_layer(cfg: dict, file: Path) -> tuple[str, str, int]:
    """(metadata.model_name, the hook name, our layer) of cfg.json."""
    md = cfg["metadata"]
    if cfg.get("reshape_activations", "none") != "none" or md.get("hook_head_index") is not None:
        raise ValueError(f"{str(file)!r}: an SAE on attention heads (reshape_activations "
                         f"{cfg.get('reshape_activations')!r}, hook_head_index {md.get('hook_head_index')!r}) "
                         f"does not read a residual stream block output")
    model = md.get("model_name")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{str(file)!r} has no metadata.model_name: cannot tell which LM it reads")
    hook = md.get("hook_name") or md.get("hf_hook_name")
    if not isinstance(hook, str):
        raise ValueError(f"{str(file)!r} has no metadata.hook_name: cannot tell which layer of {model} it reads")
    try:
        return model, hook, layer_of_hook(hook, model)
    except ValueError as e:
        raise ValueError(f"{str(file)!r}: {e}") from None


def describe(folder) -> dict:
    """The meta dict of a SAELens folder, shaped like our config.json: {"kind": "sae", "config": sae.SAEConfig
    fields, "run": {"model", "layers": [l], "context", "dataset", ...}, "train": {"fold_scale": true} (the
    weights read raw activations), "saelens": what cfg.json said}. Reads cfg.json only; one-line
    ValueErrors naming it for what cannot be mapped."""
    folder = Path(folder)
    file = folder / CFG
    cfg = read_cfg(folder)
    md = cfg["metadata"]
    arch, d_in, d_sae, dtype, norm = checked_fields(cfg, file)
    model, hook, layer = model_and_layer(cfg, file)
    if arch == "topk":
        k = positive_int({"k": cfg.get("k", 100)}, "k", file)    # SAELens's TopKSAEConfig default: 100
    else:                                                       # unused by relu and jumprelu: a training k if any
        k = (md.get("training_architecture_details") or {}).get("k")
        k = int(k) if isinstance(k, (int, float)) and 1 <= k < d_sae else 1
    config = {"d_in": d_in, "n_latents": d_sae, "k": k, "sparsity": ARCHITECTURES[arch], "decoder_norm": "free",
              "input_scale": [1.0]}
    try:
        kinds.kind_classes("sae")[1](**config)
    except ValueError as e:
        raise ValueError(f"{str(file)!r} does not fit sae.SAE ({e})") from None
    context = md.get("context_size")
    if context is not None and not (isinstance(context, int) and not isinstance(context, bool) and context >= 2):
        raise ValueError(f"{str(file)!r}: metadata.context_size must be an integer >= 2, got {context!r:.40}")
    import activations

    exported = md.get("exported_from") if isinstance(md.get("exported_from"), dict) else {}
    rule = exported["drop_outliers"] if "drop_outliers" in exported else activations.DROP_OUTLIERS  # ours records it
    run = {"model": hf_model_name(model), "layers": [layer], "context": context or 128, "drop_outliers": rule,
           "dataset": md.get("dataset_path") or None, "lm_dtype": "float32", "cache": None, "dict": "sae",
           "name": folder.resolve().name, "hooks": [md["hf_hook_name"]] if md.get("hf_hook_name") else None}
    saelens = {"folder": str(folder), "architecture": arch, "dtype": dtype, "d_in": d_in, "d_sae": d_sae,
               "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)), "normalize_activations": norm,
               "rescale_acts_by_decoder_norm": arch == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm")),
               "hook_name": hook, "model_name": model, "metadata": md}
    return {"kind": "sae", "config": config, "run": run, "train": {"fold_scale": True}, "saelens": saelens}


def expected_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """The tensors SAELens's state dict holds for s["architecture"] (it loads strictly)."""
    d, f = s["d_in"], s["d_sae"]
    shapes = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
    return {**shapes, "threshold": (f,)} if s["architecture"] == "jumprelu" else shapes


def check(folder) -> dict:
    """`describe`, and sae_weights.safetensors's header against it (names and shapes; nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    meta = describe(folder)
    s, file = meta["saelens"], folder / WEIGHTS
    if not file.is_file():
        other = " (sae.safetensors: an EleutherAI sparsify folder, not SAELens's format)" \
            if (folder / "sae.safetensors").is_file() else ""
        raise ValueError(f"{str(file)!r} is missing: a SAELens folder holds cfg.json and {WEIGHTS}{other}")
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{str(file)!r} is truncated or damaged ({e})") from e
    want = expected_shapes(s)
    shapes.pop("scaling_factor", None)       # legacy; `load` refuses it unless all ones (as SAELens drops it)
    missing, extra = [n for n in want if n not in shapes], sorted(set(shapes) - set(want))
    if missing or extra:
        raise ValueError(f"{str(file)!r} holds {sorted(shapes)}: a SAELens {s['architecture']} SAE holds exactly "
                         f"{list(want)}" + (f" (missing {missing})" if missing else f" (extra {extra})"))
    for name, shape in want.items():
        if shapes[name] != shape:
            raise ValueError(f"{str(file)!r}: {name} has shape {shapes[name]}, expected {shape} (d_in {s['d_in']}, "
                             f"d_sae {s['d_sae']} in cfg.json)")
    return meta


@torch.no_grad()
def our_weights(tensors: dict[str, Tensor], s: dict) -> dict[str, Tensor]:
    """SAELens's tensors → sae.SAE's (float32), folding apply_b_dec_to_input false into b_enc and, for topk with
    rescale_acts_by_decoder_norm, the decoder norms n into W_enc, b_enc, W_dec (SAELens's _fold_norm_topk).
    The folds run in float64."""
    W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = (tensors[k].double() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not s["apply_b_dec_to_input"]:             # x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc_F = b_enc_F + b_dec_D @ W_enc_DF
    if s["rescale_acts_by_decoder_norm"]:         # select by pre·n, decode z/n: fold n into the weights
        n_F = W_dec_FD.norm(dim=-1)
        W_enc_DF, b_enc_F, W_dec_FD = W_enc_DF * n_F, b_enc_F * n_F, W_dec_FD / n_F[:, None]
    out = {"W_enc": W_enc_DF, "b_enc": b_enc_F, "W_dec": W_dec_FD, "b_dec": b_dec_D}
    if s["architecture"] == "jumprelu":
        out["threshold"] = tensors["threshold"].double()
    return {k: v.float().contiguous() for k, v in out.items()}


def load(folder, device="cpu"):
    """(sae.SAE in eval mode on `device`, its meta (see `describe`)) of a SAELens folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = check(folder)
    tensors = load_file(str(folder / WEIGHTS))
    kinds.check_finite(tensors, folder / WEIGHTS, "take the SAE from its source again")
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise ValueError(f"{str(folder / WEIGHTS)!r} holds a scaling_factor that is not all ones (a pre-6.0 "
                         f"finetuning scale): not supported")
    cls, config_cls = kinds.kind_classes("sae")
    model = cls(config_cls(**meta["config"]))
    weights = our_weights(tensors, meta["saelens"])
    with torch.no_grad():
        for name, t in weights.items():
            getattr(model, name).copy_(t)
    return model.to(device).eval(), meta


def local_lm_config(model: str):
    """The LM's (text) config when it is known without a download: a short name (activations.py), a local
    folder, or a hub name already in the Hugging Face cache; else None."""
    import activations
    from transformers import AutoConfig

    try:
        if model in activations.SHORT_NAMES or Path(model).expanduser().is_dir():
            return activations.lm_config(model)
        return AutoConfig.from_pretrained(model, local_files_only=True).get_text_config()
    except (OSError, ValueError, KeyError):      # not local, not a valid name, or a model type transformers lacks
        return None


def check_lm(folder, meta: dict) -> None:
    """ValueError (one line) if the LM's width or depth, when known without a download, does not fit the
    SAELens folder's d_in and layer (its activations could not be read); a printed warning if the SAE read
    TransformerLens's centred residual stream (`centring_caveat`)."""
    run, s = meta["run"], meta["saelens"]
    config = local_lm_config(run["model"])
    if config is None:
        return
    width, depth = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    file = str(Path(folder) / CFG)
    if width is not None and width != s["d_in"]:
        raise ValueError(f"{file!r}: d_in {s['d_in']} does not match the width {width} of model {run['model']!r} "
                         f"(hidden_size): this SAE reads another model's activations")
    if depth is not None and run["layers"][0] >= depth:
        raise ValueError(f"{file!r}: hook {s['hook_name']!r} is layer {run['layers'][0]}, but model "
                         f"{run['model']!r} has {depth} blocks (0 to {depth - 1})")
    caveat = centring_caveat(s["metadata"], getattr(config, "model_type", None))
    if caveat:
        print(f"warning: {file}: {caveat}", file=sys.stderr)


def centring_caveat(md: dict, model_type: str | None) -> str | None:
    """SAELens loads a HookedTransformer with from_pretrained_no_processing(**model_from_pretrained_kwargs)
    (load_model.py; its training default kwargs are {"center_writing_weights": false}), whose residual stream
    is the HF block output. Kwargs with center_writing_weights true (some pretrained releases) centre every
    weight writing to the residual stream of a LayerNorm model: the SAE then read the block output minus its
    mean over d, not what it reads here."""
    kwargs = md.get("model_from_pretrained_kwargs") or {}
    if md.get("model_class_name", "HookedTransformer") != "HookedTransformer" or model_type not in LAYERNORM_LMS \
            or kwargs.get("center_writing_weights") is not True:
        return None
    return (f"metadata.model_from_pretrained_kwargs says center_writing_weights true: SAELens trained it on "
            f"TransformerLens's centred residual stream of this {model_type} model (the block output minus its mean "
            f"over d), here it reads the HF block output")


if __name__ == "__main__":     # `python -m support.saelens export ...`: the exporter builds on this module
    from support.saelens_export import main
    sys.exit(main())

"""A saved dictionary (config.json + model.safetensors, by registered name), and opening a run folder.

    save(model, DIR)        DIR/model.safetensors, then DIR/config.json {"kind", "config", ...}, each written whole
    load(DIR)               the dictionary back, of any kind in KINDS (one call)
    open_run(RUN)           [(layers, dictionary, config.json)] after checking every file: one-line errors

A dictionary is saved under its kind ("sae", "crosscoder", "fmxcoder", "polysae"), not under a module path,
so renaming a file breaks no run folder; KINDS is the one table that names the module and class of each
kind (imported when a folder of that kind is loaded: nothing here imports a model file at import time).
Folders written before kinds existed name a class ("sae.SAE", ...): LEGACY maps those.

A run folder (train.py --out) holds one dictionary (config.json at its root) or a per-layer set
(layer_<l>/config.json for each layer); `open_run` checks that every file is usable (JSON, the kind,
the config, the safetensors header, "complete" in summary.json), so a missing, truncated, foreign or
interrupted run is one ValueError naming the file and the fix, never a traceback. Loading refuses weights
holding nan or inf (`check_finite`, naming the tensor) and an input scale that is not finite and > 0.

A SAELens folder (cfg.json + sae_weights.safetensors, support/saelens.py) is accepted wherever a run folder
or a saved dictionary is (as run_dir itself, or as its layer_<l>/): it loads as a sae.SAE with a meta shaped
like our config.json, and counts as complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch

from support.files import json_text, write_atomic
from support.kinds import KINDS, LEGACY, RERUN, check_finite, kind_classes, kind_of, meta_kind  # noqa: F401

def weights_digest(path) -> str:
    """sha256 of a weights file (results record it: a result of another model is detected when read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_scale(config: dict, file) -> None:
    """ValueError unless config.input_scale (if given) is a list of finite numbers > 0 (x_model = s · x_raw)."""
    scale = config.get("input_scale")
    if scale is not None and not (isinstance(scale, list) and scale and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in scale)):
        raise ValueError(f"{str(file)!r}: config.input_scale must be finite numbers > 0, one per layer, got "
                         f"{scale!r:.80}: {RERUN}")


def config_of(kind: str, config: dict):
    """The config object of a config.json's "config". A crosscoder saved before `norm_every` moved into
    fmxcoder.py (issue 29) records it: it is dropped, whatever its value, because it only ever changed which
    stale decoder norms *training* selected with (evaluation selects with exact norms either way), so the
    saved weights mean the same; training such a crosscoder further is refused by train.py's flags."""
    if kind == "crosscoder" and "norm_every" in config:
        config = {k: v for k, v in config.items() if k != "norm_every"}
    return kind_classes(kind)[1](**config)


def upgrade_tensors(kind: str, tensors: dict) -> dict:
    """A crosscoder's state before issue 29 held norm_every's buffers (now the fmxcoder's): drop them."""
    return {k: v for k, v in tensors.items() if not (kind == "crosscoder" and k in ("steps_done", "score_scale"))}


def save(model, path, extra: dict | None = None) -> None:
    """Write path/model.safetensors, then path/config.json (kind, config, the digest of the weights and
    `extra`), each whole: a folder with a config.json always has the weights that go with it."""
    from safetensors.torch import save as to_bytes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = to_bytes({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    write_atomic(path / "model.safetensors", data)
    meta = {"kind": kind_of(model), "config": dataclasses.asdict(model.config),
            "weights_sha256": hashlib.sha256(data).hexdigest(), **(extra or {})}
    write_atomic(path / "config.json", json_text(meta, indent=2))


def load(path, device="cpu"):
    """The dictionary saved in `path` (sae, crosscoder, fmxcoder or polysae), in eval mode on `device`."""
    from safetensors.torch import load_file

    path = Path(path)
    if is_saelens(path):
        return saelens().load(path, device)[0]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}: not a saved dictionary")
    meta = json.loads((path / "config.json").read_text())
    kind = meta_kind(meta)
    check_scale(meta["config"], path / "config.json")
    model = kind_classes(kind)[0](config_of(kind, meta["config"]))
    tensors = load_file(str(path / "model.safetensors"))
    check_finite(tensors, path / "model.safetensors")
    model.load_state_dict(upgrade_tensors(kind, tensors))
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------


def saelens():
    """support.saelens, imported when a SAELens folder is met (it imports this module)."""
    from support import saelens as module
    return module


def is_saelens(folder: Path) -> bool:
    return saelens().is_saelens_folder(folder)


def dictionary_dirs(run_dir) -> list[Path]:
    """The folders holding one saved dictionary (or SAELens folder) each: run_dir itself, or its layer_<l>/ by l."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file() or is_saelens(run_dir):
        return [run_dir]
    layer_dirs = [p for p in run_dir.glob("layer_*") if p.name[6:].isdigit()
                  and ((p / "config.json").is_file() or is_saelens(p))]
    return sorted(layer_dirs, key=lambda p: int(p.name[6:]))


def set_members(run_dir) -> list[Path]:
    """The folders of a set of dictionaries trained together (train.py with several --dict: run_dir/<name>/
    each, in the order summary.json lists them); [] for a run folder of one dictionary or a per-layer set."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or dictionary_dirs(run_dir):
        return []
    try:
        names = json.loads((run_dir / "summary.json").read_bytes()).get("dictionaries")
    except (OSError, ValueError, AttributeError):
        names = None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        names = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [run_dir / n for n in names if (run_dir / n).is_dir() and dictionary_dirs(run_dir / n)]


def load_run(path, device="cpu") -> list[tuple[list[int], torch.nn.Module, dict]]:
    """What `train.py --out path` wrote: [(layers, dictionary, config.json)], one per dictionary (per-layer
    sets: one per layer). No checks beyond load's: command lines use `open_run`."""
    dirs = dictionary_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"{str(path)!r} holds no config.json nor layer_*/config.json")
    out = []
    for d in dirs:
        if is_saelens(d):
            model, meta = saelens().load(d, device)
            out.append((meta["run"]["layers"], model, meta))
            continue
        meta = json.loads((d / "config.json").read_text())
        out.append((list(meta.get("run", {}).get("layers", [])), load(d, device), meta))
    return out


def check_saved(folder: Path) -> dict:
    """What load needs of a folder, checked without building the model: config.json is JSON with a
    registered kind and a config its class accepts, model.safetensors is there and its header covers the
    file. Returns the parsed config.json (a SAELens folder: support.saelens.check's meta)."""
    from safetensors import SafetensorError, safe_open

    if is_saelens(folder):
        return saelens().check(folder)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    try:
        meta = json.loads(cfg_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON, truncated? ({e}): {RERUN}") from e
    kind = meta_kind(meta) if isinstance(meta, dict) else None
    if kind is None and isinstance(meta, dict) and isinstance(meta.get("class"), str):
        raise ValueError(f"{str(cfg_file)!r} names the class {meta['class']!r}, which this version of the code does "
                         f"not know (one of {', '.join(LEGACY)}); {RERUN}")
    if kind is None or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{str(cfg_file)!r} has no \"kind\" (or \"class\") and \"config\" entries: not a dictionary "
                         f"saved by support.saved.save; {RERUN}")
    if kind not in KINDS:
        raise ValueError(f"{str(cfg_file)!r} names the kind {kind!r}, which this version of the code does not know "
                         f"(one of {', '.join(KINDS)})")
    check_scale(meta["config"], cfg_file)
    try:
        config_of(kind, meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(cfg_file)!r}: its \"config\" does not fit a {kind} ({e}): the run was written by "
                         f"another version of this code") from e
    check_run_entry(meta, cfg_file)
    if not weights.is_file():
        raise ValueError(f"{str(weights)!r} is missing: {RERUN}")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except SafetensorError as e:
        raise ValueError(f"{str(weights)!r} is truncated or damaged ({e}): {RERUN}") from e
    return meta


def marked_complete(record: dict) -> bool:
    """Did train.py mark this summary.json (or config.json "metrics") complete? Only JSON true counts: "false",
    0 or null do not. A record without the field (written before it existed) counts as complete."""
    return record.get("complete", True) is True


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


RUN_FIELDS = {      # what train.py writes into config.json's "run" entry (and support.saelens.describe's meta)
    "model": (lambda v: isinstance(v, str) and bool(v), "a model name"),
    "layers": (lambda v: isinstance(v, list) and bool(v) and all(_count(l) for l in v), "a list of block numbers"),
    "context": (lambda v: _count(v) and v >= 2, "an integer >= 2"),
    "dataset": (lambda v: v is None or isinstance(v, str), "a dataset name or null"),
    "cache": (lambda v: v is None or isinstance(v, str), "a folder or null"),
    "train_tokens": (_count, "an integer >= 0"),
    "eval_tokens": (_count, "an integer >= 0"),
    "drop_outliers": (lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and (
        v == 0 or 1 < v < math.inf), "0, null or a multiple of the median norm > 1"),
    "lm_dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    "hooks": (lambda v: v is None or isinstance(v, list), "a list of module paths or null"),
    "cache_tokens": (_count, "an integer >= 0"),
    "cache_fingerprint": (lambda v: isinstance(v, str), "a hex digest")}


def check_run_entry(meta: dict, file) -> None:
    """ValueError naming the file and the field when config.json's "run" entry (what the evaluators read:
    the LM, its layers, the held-out text and tokens) has a field of the wrong type or value."""
    run = meta.get("run")
    if run is None:                        # a dictionary saved without a run (save() from a script)
        return
    if not isinstance(run, dict):
        raise ValueError(f"{str(file)!r}: its \"run\" entry is {type(run).__name__}, not an object: {RERUN}")
    for key, (ok, want) in RUN_FIELDS.items():
        if key in run and not (run[key] is None and key in ("train_tokens", "eval_tokens")) and not ok(run[key]):
            raise ValueError(f"{str(file)!r}: run.{key} must be {want}, got {run[key]!r:.60}: {RERUN}")


def check_context(folder: Path, meta: dict) -> None:
    """ValueError when the run's context is longer than its LM's positions, when the LM's config is known
    without a download (a SAELens metadata.context_size of 10^6 would otherwise allocate terabytes)."""
    run = meta.get("run") or {}
    config = saelens().local_lm_config(run["model"]) if run.get("model") else None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and isinstance(run.get("context"), int) and run["context"] > limit:
        where, key = (folder / "cfg.json", "metadata.context_size") if "saelens" in meta else \
            (folder / "config.json", "run.context")
        raise ValueError(f"{str(where)!r}: {key} {run['context']:,} exceeds the {limit:,} positions of model "
                         f"{run['model']!r}")


def check_complete(run_dir: Path, metas: list[dict]) -> None:
    """ValueError if train.py marked the run interrupted: "complete": false in summary.json or in a
    config.json's "metrics" entry. Runs written before that field existed count as complete."""
    records = [m["metrics"] for m in metas if isinstance(m.get("metrics"), dict)]
    try:
        records.insert(0, json.loads((run_dir / "summary.json").read_bytes()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        pass                              # none, or damaged: the dictionaries' own config.json decide
    records = [r for r in records if isinstance(r, dict)]
    failed = next((r["failed"] for r in records if isinstance(r.get("failed"), str)), None)
    if failed:                            # finished, but of no use (support.runs.failure)
        raise ValueError(f"{str(run_dir)!r} holds a run that failed: {failed}; or pass --allow-incomplete to use it as "
                         f"it is")
    if not all(marked_complete(r) for r in records):
        steps, planned = records[0].get("steps"), records[0].get("steps_planned")
        where = (f" after {steps:,}" + (f" of {planned:,}" if isinstance(planned, int) else "") + " steps"
                 if isinstance(steps, int) else "")
        raise ValueError(f"{str(run_dir)!r} holds an interrupted run (training stopped{where}): resume it with "
                         f"python train.py <the same flags> --resume, or pass --allow-incomplete to use it as it is")


def check_run(run_dir, allow_incomplete: bool = False) -> list[dict]:
    """The config.json of every dictionary in a run folder, after check_saved on each and check_complete
    (unless allow_incomplete); the weights are not loaded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} " + ("is a file" if run_dir.exists() else "does not exist")
                         + ": pass a folder written by train.py --out")
    dirs = dictionary_dirs(run_dir)
    members = [] if dirs else set_members(run_dir)
    if members:
        names = ", ".join(m.name for m in members)
        raise ValueError(f"{str(run_dir)!r} holds {len(members)} dictionaries trained together ({names}): pass one "
                         f"of their folders, e.g. {str(members[0])!r} (metrics.py evaluates them all: python "
                         f"metrics.py {run_dir})")
    if not dirs:
        raise ValueError(f"{str(run_dir)!r} holds no run (no config.json nor layer_*/config.json): pass a folder "
                         f"written by train.py --out")
    metas = [check_saved(d) for d in dirs]
    for d, meta in zip(dirs, metas):
        if "saelens" in meta:            # its LM, when known without a download, must fit its d_in and layer
            saelens().check_lm(d, meta)
        check_context(d, meta)
    if not allow_incomplete:
        check_complete(run_dir, metas)
    return metas


def open_run(run_dir, device="cpu", allow_incomplete: bool = False) -> list[tuple[list[int], torch.nn.Module, dict]]:
    """load_run after check_run: a ValueError naming the file and the fix, never a traceback."""
    check_run(run_dir, allow_incomplete)
    try:
        return load_run(run_dir, device)
    except RuntimeError as e:         # load_state_dict: missing, unexpected or mis-shaped tensors
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"the weights in {str(run_dir)!r} do not fit their config.json ({detail}): {RERUN}") from e


def run_entry(run_dir, meta: dict, keys=("model",)) -> dict:
    """The "run" entry train.py writes into config.json, with `keys`; ValueError naming the file."""
    run = meta.get("run")
    missing = [k for k in keys if not isinstance(run, dict) or run.get(k) is None]
    if missing:
        raise ValueError(f"the config.json in {str(run_dir)!r} has no run.{missing[0]}: not a folder written by "
                         f"train.py")
    return run

"""Run folders: writing them (RunFolder), opening them (load_run/open_run), and the CLI plumbing
train/metrics/probe/features share (resolve_device, ArgParser, cli_error, check_min, check_writable).

What one `train.py --out DIR` run leaves behind, written so that no result can be lost, mixed up
with another run's, or read before it is finished:

    DIR/config.json          the dictionary (sae.save): class, config, the run description, metrics
    DIR/model.safetensors    its weights               (per-layer sets: DIR/layer_<l>/ for each layer)
    DIR/summary.json         steps, tokens, timing, held-out metrics, "complete": true | false
    DIR/checkpoint.pt        model + optimiser state of the last step, for --resume
    DIR/curve.jsonl          with --eval-every: one line of held-out metrics per evaluation step

Writing (`RunFolder`, used by train.py):
  * one writer: the folder is locked (flock on the directory) for the run's lifetime; a second
    train.py on the same --out fails at once with a one-line error. The lock goes with the
    process, so a killed run leaves no stale lock.
  * no mixture: a new run refuses a folder that already holds files unless it is told what to
    do with them: --resume (continue the run whose checkpoint.pt is there) or --overwrite
    (delete it first). An export writes the new contents into a fresh sibling folder and swaps
    it in with two renames, so a reader sees the old run or the new one, never parts of both
    (e.g. a stale layer_14/ of an earlier per-layer run next to a new crosscoder).
  * nothing half-written: every file is written atomically (sae.write_atomic: temp name, fsync,
    os.replace); the checkpoint too.
  * nothing faked: summary.json says whether the run completed all its steps. An interrupted run
    (Ctrl-C) still exports a loadable model, but with "complete": false, and train.py exits 130;
    metrics.py and probe.py refuse such folders unless told otherwise.
  * nothing left behind by a failure: a folder this run created is removed again if the run
    fails before writing anything into it.

Opening: `load_run(DIR)` gives [(layers, dictionary, config.json)], one per dictionary (sae.load of
DIR or of each DIR/layer_<l>/). `open_run` is load_run for command lines: it first checks every file
(`check_run`), so that each way a folder can be unusable (missing, truncated, written by another
version of the code, interrupted) is one ValueError naming the file and the fix, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import sae as sae_mod


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (one-line message naming the folder and the fix)."""


def read_summary(path: Path) -> dict | None:
    """The folder's summary.json, or None when there is none."""
    f = Path(path) / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


class RunFolder:
    """The --out folder of one run (see the module docstring). Use as a context manager:

        with RunFolder(out, resume=False, overwrite=False) as folder:
            ...train, folder.save_checkpoint(state) now and then...
            with folder.export() as new:   # write the run's files into `new`
                ...
    """

    def __init__(self, path, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise RunFolderError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
        self.path, self.resume, self.overwrite = Path(path), resume, overwrite
        self.created, self.fd = False, None

    # -- lifetime ------------------------------------------------------------------------
    def __enter__(self) -> "RunFolder":
        check_writable(self.path)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release()
            raise RunFolderError(f"--out {str(self.path)!r} is in use by another train.py run: wait for it to "
                                 f"finish or choose another --out") from None
        try:
            self._check_contents()
        except RunFolderError:
            self.__exit__(RunFolderError, None, None)
            raise
        return self

    def _check_contents(self) -> None:
        names = sorted(p.name for p in self.path.iterdir())
        if self.resume:
            if "checkpoint.pt" not in names:
                raise RunFolderError(f"--resume: {str(self.path)!r} holds no checkpoint.pt, so there is nothing to "
                                     f"resume; start a new run without --resume")
        elif names and not self.overwrite:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise RunFolderError(f"--out {str(self.path)!r} already holds a run ({shown}): pass --resume to continue "
                                 f"it, --overwrite to replace it, or choose another --out")
        elif names:                                    # --overwrite: the old run goes now
            for p in self.path.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()                          # a failed run leaves no empty folder behind
        self._release()

    def _release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)                          # closing the descriptor releases the flock
            self.fd = None

    # -- what is written ----------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        """torch.save `state` to checkpoint.pt atomically (a crash never leaves half a checkpoint)."""
        tmp = self.path / f".checkpoint.pt.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    @property
    def curve(self) -> Path:
        return self.path / "curve.jsonl"

    def append_curve(self, record: dict) -> None:
        """One line of curve.jsonl (flushed to disk: a killed run keeps every line it wrote)."""
        with open(self.curve, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_curve(self, step: int) -> None:
        """Drop the curve lines after `step` (written after the checkpoint a resumed run restarts from)."""
        if self.curve.exists():
            lines = [l for l in self.curve.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            sae_mod.write_atomic(self.curve, "".join(l + "\n" for l in lines))

    def export(self) -> "_Export":
        """Context manager yielding a fresh folder to write the run's files into; on success it
        replaces the contents of `path` as a whole (checkpoint and curve carried over, hard-linked)."""
        return _Export(self)


class _Export:
    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.new = folder.path.parent / f".{folder.path.name}.export-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.new, ignore_errors=True)
        self.new.mkdir()
        return self.new

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.new, ignore_errors=True)
            return
        path = self.folder.path
        for f in (self.folder.checkpoint, self.folder.curve):
            if f.exists():
                os.link(f, self.new / f.name)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)                           # the two renames: old run out, new run in
        os.rename(self.new, path)
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, models: dict, opts: dict, config) -> int:
    """Restore models and optimisers from `path`; return the step to continue from. The run's
    flags must equal the checkpoint's, except those that do not change the result, and --tokens
    when neither the learning rate nor the data depend on it (--decay none, and --cache-tokens given
    or --cache none: the first s steps of a longer run are then the same steps), so an interrupted
    constant-rate run can be extended."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    ignore = ("resume", "overwrite", "device", "ckpt_every", "log_every", "eval_every", "eval_panel")
    current = dataclasses.asdict(config)
    if all(c.get("decay") == "none" and (c.get("cache_tokens") or c.get("cache") == "none")
           for c in (current, state["config"])):
        ignore += ("tokens",)
    renamed = {"dict": "dictionary"}         # checkpoints written before TrainConfig.dict was renamed
    saved = {renamed.get(k, k): v for k, v in state["config"].items() if k not in ignore}
    now = {k: v for k, v in current.items() if k in saved}
    diff = {k: (saved[k], now.get(k)) for k in saved if saved[k] != now.get(k)}
    if diff:
        raise RunFolderError(f"cannot resume {str(path)!r}: flags differ from the checkpoint's (saved, now): {diff}")
    for k, m in models.items():
        m.load_state_dict(state["models"][str(k)])
        if state.get("aux_limits", {}).get(str(k)) is not None:   # host-side AuxK size (sae.refresh_dead_mirror)
            m.aux_limit = tuple(state["aux_limits"][str(k)])
    for k, o in opts.items():
        o.load_state_dict(state["opts"][str(k)])
    return state["step"]


def checkpoint_state(models: dict, opts: dict, step: int, config) -> dict:
    """What checkpoint.pt holds: every model and optimiser state, the host-side AuxK size of each model
    (sae.refresh_dead_mirror: a resumed run selects the AuxK entries the first run selected), the
    step and the flags."""
    return {"models": {str(k): m.state_dict() for k, m in models.items()},
            "opts": {str(k): o.state_dict() for k, o in opts.items()},
            "aux_limits": {str(k): getattr(m, "aux_limit", None) for k, m in models.items()},
            "step": step, "config": dataclasses.asdict(config)}


# ----------------------------------------------------------------------------------------
# Opening a run folder: every way it can be unusable is one ValueError naming the file and the fix
# ----------------------------------------------------------------------------------------

RERUN = "rerun training or delete the folder"


def dictionary_dirs(run_dir: Path) -> list[Path]:
    """The folders holding one saved dictionary each: run_dir itself, or its layer_<l>/ by l."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file():
        return [run_dir]
    layer_dirs = [p for p in run_dir.glob("layer_*") if p.name[6:].isdigit() and (p / "config.json").is_file()]
    return sorted(layer_dirs, key=lambda p: int(p.name[6:]))


def load_run(path, device: str | torch.device = "cpu") -> list[tuple[list[int], torch.nn.Module, dict]]:
    """Load what `train.py --out path` wrote: a list of (layers, dictionary, metadata).

    A run folder holds either one dictionary (config.json at its root) or, for the per-layer
    baselines, one sub-folder `layer_<l>/` per layer. The metadata is the whole config.json (its
    "run" entry records model, hooks, layers and data). No checks beyond sae.load's: command lines
    use `open_run`."""
    dirs = dictionary_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"{str(path)!r} holds no config.json nor layer_*/config.json")
    out = []
    for d in dirs:
        meta = json.loads((d / "config.json").read_text())
        out.append((list(meta.get("run", {}).get("layers", [])), sae_mod.load(d, device), meta))
    return out


def check_saved(folder: Path) -> dict:
    """What sae.load needs of a folder written by sae.save, checked without building the model:
    config.json is JSON with "class" (importable) and "config" (accepted by the class's config),
    model.safetensors is there and its header covers the file. Returns the parsed config.json."""
    from safetensors import SafetensorError, safe_open

    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    try:
        meta = json.loads(cfg_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON, truncated? ({e}): {RERUN}") from e
    if not (isinstance(meta, dict) and isinstance(meta.get("class"), str) and "." in meta["class"]
            and isinstance(meta.get("config"), dict)):
        raise ValueError(f"{str(cfg_file)!r} has no \"class\" and \"config\" entries: not a dictionary saved by "
                         f"sae.save; {RERUN}")
    module, name = meta["class"].rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"{str(cfg_file)!r} names the class {meta['class']!r}, whose module cannot be imported "
                         f"({e}): run from the repository root or put {module}.py on PYTHONPATH") from e
    except AttributeError:
        raise ValueError(f"{str(cfg_file)!r} names the class {meta['class']!r}, which {module}.py does not "
                         f"define: the run was written by another version of this code") from None
    try:
        cls.config_class(**meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(cfg_file)!r}: its \"config\" does not fit {meta['class']} ({e}): the run was "
                         f"written by another version of this code") from e
    if not weights.is_file():
        raise ValueError(f"{str(weights)!r} is missing: {RERUN}")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except SafetensorError as e:
        raise ValueError(f"{str(weights)!r} is truncated or damaged ({e}): {RERUN}") from e
    return meta


def check_complete(run_dir: Path, metas: list[dict]) -> None:
    """ValueError if train.py marked the run interrupted: "complete": false in summary.json or in a
    config.json's "metrics" entry. Runs written before that field existed count as complete."""
    records = [m["metrics"] for m in metas if isinstance(m.get("metrics"), dict)]
    try:
        records.insert(0, json.loads((run_dir / "summary.json").read_bytes()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        pass                              # none, or damaged: the dictionaries' own config.json decide
    records = [r for r in records if isinstance(r, dict)]
    if any(r.get("complete") is False for r in records):
        steps, planned = records[0].get("steps"), records[0].get("steps_planned")
        where = (f" after {steps:,}" + (f" of {planned:,}" if isinstance(planned, int) else "") + " steps"
                 if isinstance(steps, int) else "")
        raise ValueError(f"{str(run_dir)!r} holds an interrupted run (training stopped{where}): resume it with "
                         f"python train.py <the same flags> --resume, or pass --allow-incomplete to use it as it is")


def check_run(run_dir, allow_incomplete: bool = False) -> list[dict]:
    """The config.json of every dictionary in a run folder, after check_saved on each and
    check_complete (unless allow_incomplete); the weights are not loaded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} " + ("is a file" if run_dir.exists() else "does not exist")
                         + ": pass a folder written by train.py --out")
    dirs = dictionary_dirs(run_dir)
    if not dirs:
        raise ValueError(f"{str(run_dir)!r} holds no run (no config.json nor layer_*/config.json): pass a folder "
                         f"written by train.py --out")
    metas = [check_saved(d) for d in dirs]
    if not allow_incomplete:
        check_complete(run_dir, metas)
    return metas


def open_run(run_dir, device="cpu", allow_incomplete: bool = False) -> list[tuple[list[int], torch.nn.Module, dict]]:
    """load_run(run_dir, device) after check_run: a ValueError naming the file and the fix,
    never a traceback from json, safetensors or importlib."""
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


# ----------------------------------------------------------------------------------------
# Command-line plumbing: flags checked before any work, user mistakes as one line `error: ...`
# ----------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda when torch sees one, else cpu) | cpu | cuda | cuda:N, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= n:
        raise ValueError(f"--device {name!r} requested but " + ("CUDA is not available" if n == 0 else
                         f"torch sees {n} CUDA device{'s' * (n > 1)} (cuda:0 to cuda:{n - 1})"))
    return device


def check_writable(folder) -> None:
    """RunFolderError (a ValueError) now, rather than after the work, unless files can be written into
    `folder` or it can be created: its nearest existing ancestor must be a folder we may write into.
    Nothing is created."""
    folder = Path(folder)
    parent = folder
    while not parent.exists():
        parent = parent.parent
    why = ("a file, not a folder" if not parent.is_dir()
           else None if os.access(parent, os.W_OK | os.X_OK) else "no permission to write, or read-only")
    if why:
        head = "" if parent == folder else f"{str(folder)!r} is not writable: "
        raise RunFolderError(f"{head}cannot write into {str(parent)!r} ({why})")


def check_min(*flags: tuple[str, float | None, float]) -> None:
    """(flag, value, lowest) triples: ValueError naming the first flag below its lowest value (None: unset)."""
    for flag, v, lo in flags:
        if v is not None and v < lo:
            raise ValueError(f"{flag} must be at least {lo}, got {v}")


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ValueError (main prints it as one line), not usage + exit."""

    def error(self, message):
        raise ValueError(message)


def cli_error(e: BaseException) -> int:
    """Print a user mistake as one line `error: ...` on stderr; the exit code 2."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2


USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)

"""A run folder: what one `train.py --out DIR` run leaves behind, written so that no result can be
lost, mixed up with another run's, or read before it is finished.

    DIR/config.json          the dictionary (sae.save): class, config, the run description, metrics
    DIR/model.safetensors    its weights               (per-layer sets: DIR/layer_<l>/ for each layer)
    DIR/summary.json         steps, tokens, timing, held-out metrics, "complete": true | false
    DIR/checkpoint.pt        model + optimiser state of the last step, for --resume
    DIR/curve.jsonl          with --eval-every: one line of held-out metrics per evaluation step

The rules (`RunFolder`):
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
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch

from sae import write_atomic


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (one-line message naming the folder and the fix)."""


def check_writable(out: Path) -> None:
    """Fail unless `out` is a folder or can be created as one, without creating anything."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {str(out)!r} is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {str(out)!r} is not writable ({str(parent)!r} does not let us write)")


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
            write_atomic(self.curve, "".join(l + "\n" for l in lines))

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
    if all(getattr(config, "decay", None) == "none" and (c.cache_tokens or c.cache == "none")
           for c in (config, argparse.Namespace(**state["config"]))):
        ignore += ("tokens",)
    renamed = {"dict": "dictionary"}         # checkpoints written before TrainConfig.dict was renamed
    saved = {renamed.get(k, k): v for k, v in state["config"].items() if k not in ignore}
    now = {k: v for k, v in dataclasses.asdict(config).items() if k in saved}
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

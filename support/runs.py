"""Run folders: writing them (RunFolder) and the checkpoints that resume them (support/saved.py opens them).

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
    (delete it first).
  * never what is not ours: --out must be a folder of its own (never "", ".", the current folder or
    one above it, "/" or $HOME: `check_out`), and a folder holding anything a run does not write
    (`foreign_entries`: a .git, notes, photos) is refused whatever the flags, so --overwrite only
    ever deletes a run. An export writes the new contents into a fresh sibling folder and swaps
    it in with two renames, so a reader sees the old run or the new one, never parts of both
    (e.g. a stale layer_14/ of an earlier per-layer run next to a new crosscoder).
  * nothing half-written: every file is written atomically (support/files.py: temp name, fsync,
    os.replace); the checkpoint too.
  * nothing faked: summary.json says whether the run completed all its steps ("complete": JSON true).
    An interrupted run (Ctrl-C) still exports a loadable model, but with "complete": false, and train.py
    exits 130; a finished run of no use (`failure`: no step trained, a held-out FVU not finite or above
    DIVERGED_FVU) is exported with "complete": false and "failed": why, and train.py exits 1. metrics.py
    and probe.py refuse such folders unless told otherwise. A checkpoint is written only when every tensor
    is finite (a diverged run keeps its last good one), and every JSON file is valid JSON (nan/inf: null).
  * nothing left behind by a failure: a folder this run created is removed again if the run
    fails before writing anything into it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from support.cli import check_writable
from support.files import check_free, disk_full, json_text, pid_alive, remove_stale, temp_path, write_atomic


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (one-line message naming the folder and the fix)."""


RUN_FILES = ("config.json", "model.safetensors", "summary.json", "checkpoint.pt", "curve.jsonl", "eval.json",
             "probe.json", "features.json", "features.html", "autointerp.json", "autointerp_cache.jsonl", "wandb.json")
"""The files train.py and the evaluators write into a run folder (and into each dictionary's folder of a set)."""
LAYER_DIR = re.compile(r"^layer_\d+$")                    # a per-layer set's layer_<l>/
TEMPORARY = re.compile(r"^\..+\.[a-z]+-\d+$")             # support/files.py's .<name>.<what>-<pid>


MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_member_names(names: list[str]) -> None:
    """ValueError for a name of a set's dictionary (its folder, --out/<name>/) that is not unique, not a plain
    file name, or one that the run folder itself uses (RUN_FILES, layer_<l>: the export would collide with
    it, or the set would read as a per-layer run). Checked before anything expensive."""
    for n in names:
        if not MEMBER_NAME.match(n):
            raise ValueError(f"--name {n!r} must start with a letter or digit and hold only letters, digits, '.', "
                             f"'_' and '-'")
        if names.count(n) > 1:
            raise ValueError(f"--name {n!r} names two dictionaries: each needs a name of its own")
        if n.lower() in RUN_FILES or LAYER_DIR.match(n.lower()):
            raise ValueError(f"--name {n!r} is the name of a file or folder the run folder holds "
                             f"({', '.join(RUN_FILES)}, layer_<l>): choose another")


def run_root(path) -> Path:
    """The folder train.py wrote (and locks) that holds `path`: path itself, or, for the folder of one
    dictionary inside a run (a set's <name>/, a per-layer set's layer_<l>/, or a layer of a member), the
    outermost run folder around it."""
    p = Path(path).absolute()
    while p.parent != p and part_of_run(p):
        p = p.parent
    return p


def part_of_run(p: Path) -> bool:
    """Is `p` a dictionary's folder inside the run folder p.parent (its layer_<l>/, or a member its
    summary.json lists)?"""
    summary = p.parent / "summary.json"
    if not (summary.is_file() or (p.parent / "checkpoint.pt").is_file()):
        return False
    if LAYER_DIR.match(p.name):
        return True
    try:
        members = json.loads(summary.read_bytes()).get("dictionaries")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(members, list) and p.name in members


def enclosing_run(path) -> Path | None:
    """The run folder that `path` is, or lies inside (the nearest existing one holding summary.json,
    checkpoint.pt or one of our config.json), else None."""
    for p in [Path(path).absolute(), *Path(path).absolute().parents]:
        if p.is_dir() and ((p / "summary.json").is_file() or (p / "checkpoint.pt").is_file()
                           or (p / "config.json").is_file() and ours(p / "config.json")):
            return run_root(p)
    return None


def check_out(path) -> None:
    """RunFolderError unless `path` can be a run folder of its own: an export replaces the folder as a whole
    (two renames) and --overwrite empties it, so it is never "", ".", the current folder or a folder above
    it, the root or the home folder."""
    if not str(path).strip():
        raise RunFolderError("--out is empty: name the run folder, e.g. --out runs/latest")
    full, cwd = Path(os.path.realpath(Path(path).expanduser())), Path.cwd().resolve()
    what = ("the root folder" if full == Path(full.anchor) else
            "your home folder" if full == Path.home().resolve() else
            "the current folder" if full == cwd else
            "a folder above the current one" if full in cwd.parents else None)
    if what:
        raise RunFolderError(f"--out {str(path)!r} is {what}: train.py replaces its run folder as a whole, so the run "
                             f"needs a folder of its own, e.g. --out runs/latest")
    root = run_root(path)
    if root != Path(path).absolute():
        raise RunFolderError(f"--out {str(path)!r} is one dictionary of the run in {str(root)!r}: that run is "
                             f"written (and replaced) as a whole, so train into a folder of its own")


def ours(config_json: Path) -> bool:
    """Is this config.json one that support.saved.save wrote (a "kind" or old "class" entry)? A damaged
    one (not JSON) counts as ours: a truncated run is still a run."""
    try:
        meta = json.loads(config_json.read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return True
    return isinstance(meta, dict) and ("kind" in meta or "class" in meta)


def foreign_entries(folder, top: bool = True) -> list[str]:
    """The entries of `folder` that no run writes (a folder's name ends in /): everything but RUN_FILES
    (a config.json only if it is ours), temporaries, layer_<l>/ folders and, at the top, the folders of
    a set's dictionaries, each holding nothing foreign either. Symbolic links are foreign."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if TEMPORARY.match(p.name):
            continue
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            out.append(p.name)
        elif p.is_file():
            if p.name not in RUN_FILES or (p.name == "config.json" and not ours(p)):
                out.append(p.name)
        elif not ((LAYER_DIR.match(p.name) or top and not p.name.startswith("."))
                  and any(p.iterdir()) and not foreign_entries(p, top=False)):
            out.append(p.name + "/")
    return out


def recover_export(path) -> None:
    """Finish or undo an export that a killed train.py left between its two renames (_Export): the old run
    moved out to .<name>.old-<pid>, the new one not yet moved in from .<name>.export-<pid>. A complete
    export (it is renamed only after every file is written) whose run folder is gone is moved in; what is
    left of dead processes (an export killed while writing, the old run) is removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for what in ("export", "old"):       # the new run if it was written whole, else the old one back
        for p in sorted(path.parent.iterdir()):
            kind, _, pid = p.name.removeprefix(f".{path.name}.").rpartition("-")
            if p.name.startswith(f".{path.name}.") and kind == what and pid.isdigit() and not pid_alive(int(pid)) \
                    and not path.exists():
                os.rename(p, path)
                print(f"note: {'finished' if what == 'export' else 'undid'} the export of {str(path)!r} that an "
                      f"interrupted train.py left half done")
    remove_stale(path.parent, path.name)


@contextlib.contextmanager
def reading(run_dir):
    """Hold a shared lock on a run folder while it is evaluated (metrics.py, probe.py, latents): train.py,
    which holds an exclusive one while it writes, can then not replace the folder under the evaluator, and
    an evaluator refuses a folder that train.py is writing. Results computed inside carry the digests of
    the weights they read (`model_digests`). One lock per run: the lock is taken on `run_root(run_dir)`, so
    evaluating one dictionary of a set (or one layer_<l>/) excludes train.py on the whole set, and back."""
    missing = Path(run_dir).absolute()
    while not missing.exists() and missing.parent != missing and not missing.parent.exists():
        missing = missing.parent          # a set whose export was interrupted: the set is what moved
    recover_export(missing if not Path(run_dir).exists() else run_dir)
    if not Path(run_dir).is_dir():        # nothing to lock: the opening reports what is there instead
        yield
        return
    fd = os.open(run_root(run_dir), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(f"{str(run_dir)!r} is being written by a train.py run: evaluate it once that run has "
                             f"finished") from None
    try:
        yield
    finally:
        os.close(fd)


def model_digests(run_dir) -> dict[str, str]:
    """{folder of each dictionary, relative to run_dir ("." for the run itself): sha256 of its weights}, as
    config.json records it (support.saved.save), else computed."""
    from support.saved import dictionary_dirs, weights_digest

    out = {}
    for d in dictionary_dirs(run_dir):
        meta = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        weights = next((d / n for n in ("model.safetensors", "sae_weights.safetensors") if (d / n).is_file()), None)
        out[str(d.relative_to(run_dir))] = meta.get("weights_sha256") or (weights_digest(weights) if weights else None)
    return out


def read_result(run_dir, name: str) -> dict:
    """run_dir/<name> (eval.json, probe.json, features.json), checked to be of the model now in run_dir:
    ValueError when it was computed from other weights (the run was replaced since). Results written
    before they recorded their weights cannot be checked and are returned as they are."""
    path = Path(run_dir, name)
    try:
        result = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"no {name} in {str(run_dir)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}): compute it again") from e
    if "weights_sha256" in result and result["weights_sha256"] != model_digests(run_dir):  # (older: unchecked)
        raise ValueError(f"{str(path)!r} was computed from other weights than the model now in {str(run_dir)!r} "
                         f"(the run was replaced since): compute it again")
    return result


DIVERGED_FVU = 1.0
"""A held-out FVU above this (the dictionary reconstructs the held-out tokens worse than their mean does) and
above the dictionary's own at step 0 marks a finished run as failed: the training diverged, whatever its
weights. (Above 1 alone is not enough: a short run can still be on its way down from a start above 1.)"""


def failure(summary: dict) -> str | None:
    """Why a finished run is of no use ("<what>; <fix>"), or None. It is, and train.py saves it marked
    incomplete ("complete": false, "failed": this), when it trained no step at all, or when a dictionary's
    held-out FVU is not finite (the held-out activations do not vary, or the reconstruction overflowed), or
    is above DIVERGED_FVU and above its FVU at step 0 (summary["fvu_start"], the same held-out tokens before
    the first step): the training diverged."""
    if summary["steps"] == 0:
        why = " (the data ran out first)" if summary.get("data_exhausted") else ""
        return (f"it trained no step{why}, so its dictionaries are their initialisation; train it on more data "
                f"(or a smaller --batch-size)")
    start = summary.get("fvu_start") or {}
    for key, e in (summary.get("eval") or {}).items():     # "all", "<layer>", "<name>/all", "<name>/<layer>"
        name, _, sub = key.rpartition("/")
        who = " ".join(([name] if name else []) + ([] if sub == "all" else [f"layer {sub}"])) or "the dictionary"
        fvu, fvu0 = e.get("fvu") if isinstance(e, dict) else None, start.get(key)
        if fvu is not None and not math.isfinite(fvu):
            return (f"the held-out FVU of {who} is {fvu} (the held-out activations do not vary, or the "
                    f"reconstruction overflowed); check the activations")
        if fvu is not None and fvu > DIVERGED_FVU and (fvu0 is None or fvu > fvu0):
            since = f" and above its {fvu0:.4g} at step 0" if fvu0 is not None else ""
            return (f"the held-out FVU of {who} is {fvu:.4g}, above {DIVERGED_FVU:g}{since}: it reconstructs the "
                    f"held-out tokens worse than their mean does, the training diverged; train it again with a lower "
                    f"--lr")
    return None


def read_summary(path: Path) -> dict | None:
    """The folder's summary.json, or None when there is none."""
    f = Path(path) / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


SLACK = 2**20
"""Bytes a run writes beside its tensors (JSON files, the checkpoint's pickling), reserved by check_space."""


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
        self.saved_step = None                 # the step of checkpoint.pt (set by save_checkpoint, or a resume)
        self.fvu_start = None                  # the held-out FVUs at step 0, kept in every checkpoint (failure)
        self.tracker = None                    # support.tracking.Tracker of --wandb: the curve goes there too

    # -- lifetime ------------------------------------------------------------------------
    def __enter__(self) -> "RunFolder":
        check_out(self.path)
        recover_export(self.path)
        check_writable(self.path, "the run folder")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise RunFolderError(f"cannot create the run folder {str(self.path)!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release()
            raise RunFolderError(f"--out {str(self.path)!r} is in use by another train.py run or an evaluation of "
                                 f"it: wait for it to finish or choose another --out") from None
        remove_stale(self.path)                    # temporaries of a killed run (a half-written checkpoint)
        try:
            self._check_contents()
        except RunFolderError:
            self.__exit__(RunFolderError, None, None)
            raise
        return self

    def _check_contents(self) -> None:
        names = sorted(p.name for p in self.path.iterdir())
        others = foreign_entries(self.path)
        if others:
            shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
            raise RunFolderError(f"--out {str(self.path)!r} holds files that train.py did not write ({shown}): a run "
                                 f"folder is replaced as a whole (--overwrite deletes only a run), so choose a new or "
                                 f"empty --out")
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
        if self.tracker is not None:                   # the W&B run ends with the run, however it ends
            self.tracker.finish()
            self.tracker = None
        if self.fd is not None:
            os.close(self.fd)                          # closing the descriptor releases the flock
            self.fd = None

    def check_space(self, checkpoint_bytes: int, weights_bytes: int, periodic: bool) -> None:
        """DiskFull before the work when the folder's disk cannot hold what the run will write: checkpoint.pt
        (twice while a periodic one replaces the last, unless a resumed run's is already there) and the
        exported weights (the export hard-links the checkpoint)."""
        twice = periodic and not self.resume
        copies = ", twice while one replaces the other" if twice else ""
        check_free(self.path, (2 if twice else 1) * checkpoint_bytes + weights_bytes + SLACK,
                   f"the run (checkpoint.pt of {checkpoint_bytes:,} bytes{copies}, {weights_bytes:,} bytes of exported "
                   f"weights and 1 MiB for the rest)")

    # -- what is written ----------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        """torch.save `state` to checkpoint.pt atomically (a crash never leaves half a checkpoint), after
        checking that every weight and optimiser tensor is finite: a diverged run never replaces the last
        good checkpoint (RunFolderError naming the tensor and the step the checkpoint keeps)."""
        bad = first_nonfinite(state)
        if bad is not None:
            keeps = f"it keeps step {self.saved_step}" if self.saved_step is not None else "no checkpoint was saved"
            lr = (state.get("config") or {}).get("lr")
            raise RunFolderError(f"the training diverged: {bad} holds nan or inf at step {state.get('step')}, so "
                                 f"{str(self.checkpoint)!r} was not replaced ({keeps}); lower --lr (it is {lr:g}) or "
                                 f"check the activations")
        tmp, needed = temp_path(self.checkpoint), tensor_bytes(state)
        try:
            torch.save({**state, "fvu_start": self.fvu_start}, tmp)
            os.replace(tmp, self.checkpoint)
        except (OSError, RuntimeError) as e:    # (torch.save reports a full disk as an obscure RuntimeError)
            tmp.unlink(missing_ok=True)
            if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(self.path).free < needed:
                raise disk_full(self.checkpoint, needed) from None
            raise
        self.saved_step = state.get("step")

    def saved_note(self, planned: int) -> str:
        """What a run stopped while saving leaves: the step checkpoint.pt holds and how to finish, or nothing."""
        if self.saved_step is None:
            return "nothing was saved"
        return (f"{str(self.checkpoint)!r} holds step {self.saved_step} of {planned}: continue with the same flags "
                f"and --resume, which exports it")

    @property
    def curve(self) -> Path:
        return self.path / "curve.jsonl"

    def append_curve(self, record: dict) -> None:
        """One line of curve.jsonl (flushed to disk: a killed run keeps every line it wrote)."""
        with open(self.curve, "a") as f:
            f.write(json_text(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tracker is not None:
            self.tracker.curve(record)

    def truncate_curve(self, step: int) -> None:
        """Drop the curve lines after `step` (written after the checkpoint a resumed run restarts from)."""
        if self.curve.exists():
            lines = [l for l in self.curve.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            write_atomic(self.curve, "".join(l + "\n" for l in lines))

    def split_curve(self, path: Path, name: str) -> None:
        """The curve lines of dictionary `name` of a set (eval keys "<name>/<sub>"), keyed by <sub>, into `path`."""
        if self.curve.exists():
            rows = [json.loads(l) for l in self.curve.read_text().splitlines() if l.strip()]
            for r in rows:
                r["eval"] = {k.split("/", 1)[1]: v for k, v in r["eval"].items() if k.split("/", 1)[0] == name}
            write_atomic(path, "".join(json_text(r) + "\n" for r in rows))

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
        for f in (self.folder.checkpoint, self.folder.curve, path / "wandb.json"):
            if f.exists():
                os.link(f, self.new / f.name)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)                           # the two renames: old run out, new run in
        os.rename(self.new, path)
        shutil.rmtree(old, ignore_errors=True)


IGNORED = ("resume", "overwrite", "device", "ckpt_every", "log_every", "eval_every", "eval_panel", "out", "time_limit",
           "wandb")
"""Flags a resumed run may change: they do not change the result (--out: a copied or moved run resumes)."""


def read_checkpoint(path: Path, config) -> dict:
    """checkpoint.pt, after checking that the run's flags equal the checkpoint's (but IGNORED, and --tokens
    when neither the learning rate nor the data depend on it: --decay none, and --cache-tokens given or
    --cache none, so that the first s steps of a longer run are the same steps and a constant-rate run can
    be extended). RunFolderError naming the differences."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved, now = state.get("config"), dataclasses.asdict(config)
    if not isinstance(saved, dict) or "dictionaries" not in saved:
        raise RunFolderError(f"cannot resume {str(path)!r}: it was written by an earlier version of train.py (before "
                             f"--dict groups); finish it with that version, or start a new run")
    ignore = IGNORED
    if all(c.get("decay") == "none" and (c.get("cache_tokens") or c.get("cache") == "none") for c in (now, saved)):
        ignore += ("tokens",)
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if k not in ignore and saved.get(k) != now.get(k)}
    if diff:
        raise RunFolderError(f"cannot resume {str(path)!r}: flags differ from the checkpoint's (saved, now): {diff}")
    return state


def check_data(state: dict, data, path: Path) -> None:
    """A resumed run trains on what it trained on before: RunFolderError if the cache's tokens changed
    (rebuilt by another run with other tokens), and the run's own scale replaces a re-estimated one."""
    saved = state.get("data")
    if saved is None:                                   # checkpoints written before the data identity
        return
    now = data.identity
    if saved.get("fingerprint") != now.get("fingerprint") or saved.get("n_tokens") != now.get("n_tokens"):
        raise RunFolderError(f"cannot resume {str(path)!r}: the activation cache {now.get('cache')!r} no longer holds "
                             f"the tokens this run trained on (rebuilt since, with other tokens); rebuild it as it was "
                             f"(--cache-tokens {saved.get('n_tokens')}) into another --cache folder, or start a new run")
    if saved["scale"] != now["scale"]:
        print("note: the cache's per-layer scale was re-estimated since this run started (another run rebuilt it); "
              "resuming with the run's own scale")
        data.scale_L = torch.tensor(saved["scale"], dtype=torch.float32)
        data.identity = {**now, "scale": saved["scale"]}


def restore(state: dict, models: dict, opts: dict, name) -> int:
    """Load read_checkpoint's state into the models and optimisers (keys named by `name(key)`); the step."""
    for k, m in models.items():
        sd = state["models"][name(k)]
        if not hasattr(m, "steps_done"):    # a crosscoder's checkpoint before issue 29 held the fmxcoder's norm_every buffers
            sd = {n: t for n, t in sd.items() if n not in ("steps_done", "score_scale")}
        m.load_state_dict(sd)
        limit = state["aux_limits"].get(name(k))           # host-side AuxK size (core.DeadLatents)
        m.dead.aux_limit = tuple(limit) if limit is not None else None
    for k, o in opts.items():
        o.load_state_dict(state["opts"][name(k)])
    return state["step"]


def checkpoint_state(models: dict, opts: dict, step: int, config, name, data_identity: dict) -> dict:
    """What checkpoint.pt holds: every model and optimiser state, each model's host-side AuxK size
    (core.DeadLatents.aux_limit: a resumed run selects the AuxK entries the first run selected), the step,
    the flags and the identity of the data (check_data)."""
    return {"models": {name(k): m.state_dict() for k, m in models.items()},
            "opts": {name(k): o.state_dict() for k, o in opts.items()},
            "aux_limits": {name(k): m.dead.aux_limit for k, m in models.items()},
            "step": step, "config": dataclasses.asdict(config), "data": data_identity}


def named_tensors(obj, prefix: str = ""):
    """(path, tensor) of every tensor in a nested dict/list, the path joined with '.'."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))


def first_nonfinite(state: dict) -> str | None:
    """"model 'key', W_enc" (or "optimiser 'key', state.0.exp_avg") of the first floating-point tensor of a
    checkpoint state that holds nan or inf; None when all are finite (one host sync)."""
    named = [(f"{what} {key!r}, {name}", t) for part, what in (("models", "model"), ("opts", "optimiser"))
             for key, sd in (state.get(part) or {}).items() for name, t in named_tensors(sd)
             if t.is_floating_point() and t.numel()]
    if not named:
        return None
    flags = [torch.isfinite(t).all() for _, t in named]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return next((name for (name, _), good in zip(named, ok) if not good), None)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (what torch.save of it needs, near enough)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_json(path: Path, obj) -> None:
    write_atomic(path, json_text(obj, indent=2))

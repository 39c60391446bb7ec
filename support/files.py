"""Files written whole: a reader sees the old content or the new one, never a part, and a failed write
leaves nothing behind.

Every file or folder is first written under a temporary name in the same folder, `.<name>.tmp-<pid>`
(or `.<name>.<what>-<pid>`), then renamed into place (os.replace, atomic on POSIX). The pid in the name
lets a later process tell a temporary of a dead process (removed by `remove_stale`) from one that is
being written now. A write that fails for lack of space raises DiskFull, a ValueError whose message
names the path and the bytes needed, after removing what it had written.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path


class DiskFull(ValueError):
    """No space left where a file was being written (one line: the path and the bytes needed)."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path(path: Path, what: str = "tmp") -> Path:
    """`.<name>.<what>-<pid>` beside `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{what}-{os.getpid()}")


def remove_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries `.<name>.<what>-<pid>` in `folder` (of `name`, or of any name) whose
    process is gone; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\.(?P<name>.+)\.[a-z]+-(?P<pid>\d+)$")
    removed = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def disk_full(path, needed: int | None = None) -> DiskFull:
    need = f": {needed:,} bytes needed" if needed else ""
    try:
        free = f", {shutil.disk_usage(Path(path).parent if not Path(path).is_dir() else path).free:,} free"
    except OSError:
        free = ""
    return DiskFull(f"disk full at {str(path)!r}{need}{free}: free some space or write elsewhere")


def check_free(folder, needed: int, what: str) -> None:
    """DiskFull before any work when `folder` (or its nearest existing parent) has fewer than `needed` bytes."""
    p = Path(folder)
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < needed:
        raise DiskFull(f"{what} needs {needed:,} bytes at {str(folder)!r} but only {free:,} are free: free some "
                       f"space, write elsewhere or ask for less")


def finite_json(obj):
    """obj with every float that is nan or ±inf replaced by None (JSON null): Python's json writes them as
    NaN / Infinity, which is not JSON (other readers refuse the file)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj, **kw) -> str:
    """json.dumps of finite_json(obj): always valid JSON (a non-finite number is null)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kw)


def write_atomic(path, data: str | bytes) -> None:
    """Write a whole file: a temporary in the same folder, flushed to disk, then os.replace. A full disk
    raises DiskFull and leaves no temporary."""
    path = Path(path)
    tmp = temp_path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(path, len(raw)) from None
        raise

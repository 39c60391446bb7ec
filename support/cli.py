"""The command lines of every entry point, in one style: flags derived from a dataclass, every mistake
one line `error: ...` (exit code 2), checked before any expensive work.

A dataclass field becomes a flag when its metadata has a "help" (core.opt(default, help)): `n_latents` →
`--n-latents`, bool → `--x/--no-x`, `int | list[int]` → "32" or "8,16,16", integers also as "3e8". The
dataclass's own `check(name)` validates the values before the object is built, with `name` = `flag`, so
errors name the flag a user typed (`--k must be smaller than --n-latents`), while a library caller who
builds the object sees the field names.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)
FLAG_NAMES = {"dictionary": "dict"}         # the design card's --dict (a field named dict would shadow the builtin)


def flag(name: str) -> str:
    """The command-line flag of a field."""
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ValueError (main prints it as one line), not usage + exit."""

    def error(self, message):
        raise ValueError(message)


def cli_error(e: BaseException, code: int = 2) -> int:
    """Print a user mistake as one line `error: ...` on stderr; the exit code (2)."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return code


def interrupted(written: str) -> int:
    """Ctrl-C in an evaluator: one line on stderr saying that nothing was left half-written; exit code 130."""
    print(f"\ninterrupted: nothing was left half-written ({written} is written whole, at the end)", file=sys.stderr)
    return 130


def parse_int(text: str) -> int:
    """An integer, also written as 3e8 or 1_000 (a float that is not whole is refused)."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer like 300000000 or 3e8, got {text!r}") from None
    if not v.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer like 300000000 or 3e8, got {text!r}")
    return int(v)


def parse_ints(text: str) -> int | list[int]:
    """"32" → 32, "8,16,16" → [8, 16, 16]."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        vals = [parse_int(p) for p in parts]
    except argparse.ArgumentTypeError:
        vals = []
    if not vals:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers like 1,2,5, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def parse_int_list(text: str) -> list[int]:
    v = parse_ints(text)
    return v if isinstance(v, list) else [v]


def _parser_of(typ):
    """The argparse type for a field's annotation."""
    if typing.get_origin(typ) in (list, tuple):                                     # list[int]
        return parse_int_list
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typ is int or args == [int]:
        return parse_int
    if typ is float or args == [float]:
        return float
    if typ is str or args == [str]:
        return str
    if int in args and any(typing.get_origin(a) is list for a in args):          # int | list[int]
        return parse_ints
    if any(typing.get_origin(a) in (list, tuple) for a in args):                  # list[int] | tuple | None
        return parse_int_list
    raise TypeError(f"no command-line parser for {typ}")


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that are flags (they carry a help text)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_flags(p: argparse.ArgumentParser, cls, defaults: bool = True, group: str | None = None,
              skip: set[str] = frozenset()) -> set[str]:
    """One flag per flag field of `cls` (but those in `skip`); returns the field names added. defaults=False:
    the parsed value is None unless given (to tell a flag given from one left at its default)."""
    hints = typing.get_type_hints(cls)
    target = p.add_argument_group(group) if group else p
    added = set()
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata['help']} (default: {default})".replace("%", "%%")     # argparse %-formats help
        if hints[f.name] is bool or set(typing.get_args(hints[f.name])) == {bool, type(None)}:   # bool | None: unset
            target.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default if defaults else None, help=help_)
        else:
            target.add_argument(flag(f.name), dest=f.name, type=_parser_of(hints[f.name]),
                                default=default if defaults else None, help=help_)
        added.add(f.name)
    return added


def values(ns, cls, given_only: bool = False) -> dict:
    """{field: value} of `cls`'s flag fields in the parsed namespace `ns` (given_only: those not None)."""
    out = {f.name: getattr(ns, f.name) for f in flag_fields(cls) if hasattr(ns, f.name)}
    return {k: v for k, v in out.items() if v is not None} if given_only else out


def build(cls, **kw):
    """cls(**kw) after cls.check names the flags: the fields' defaults, then kw, checked as a namespace."""
    ns = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
          for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    ns.update(kw)
    if hasattr(cls, "check"):
        cls.check(types.SimpleNamespace(**ns), flag)
    return cls(**kw)


def check_min(*flags: tuple[str, float | None, float]) -> None:
    """(flag, value, lowest) triples: ValueError naming the first flag below its lowest value (None: unset)."""
    for name, v, lo in flags:
        if v is not None and v < lo:
            raise ValueError(f"{name} must be at least {lo}, got {v}")


def resolve_device(name: str):
    """--device: auto (cuda when torch sees one, else cpu) | cpu | cuda | cuda:N, checked."""
    import torch

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


def free_memory(device) -> int | None:
    """Bytes free on `device`: a CUDA device's free memory, or the host's available memory (MemAvailable of
    /proc/meminfo, else the free pages); None when unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(device, needed: int, what: str, fix: str) -> None:
    """ValueError before any work when `needed` bytes of `what` cannot fit in the free memory of `device`."""
    free = free_memory(device)
    if free is not None and needed > free:
        raise ValueError(f"{what} need {needed:,} bytes on {device} but only {free:,} are free: {fix}")


def check_writable(folder, what: str = "") -> None:
    """ValueError now, rather than after the work, unless files can be written into `folder` or it can
    be created: its nearest existing ancestor must be a folder we may write into. Nothing is created."""
    folder = Path(folder)
    parent = folder
    while not parent.exists():
        parent = parent.parent
    why = ("a file, not a folder" if not parent.is_dir()
           else None if os.access(parent, os.W_OK | os.X_OK) else "no permission to write, or read-only")
    if why:
        head = (f"cannot create {what} {str(folder)!r}: " if what else
                "" if parent == folder else f"{str(folder)!r} is not writable: ")
        raise ValueError(f"{head}cannot write into {str(parent)!r} ({why})")


# ----------------------------------------------------------------------------------------
# Several dictionaries on one command line: the --dict grammar (train.py)
# ----------------------------------------------------------------------------------------


def parse_dicts(argv: list[str], run_cls, kinds, config_class, default: str, description: str = "",
                command: str = "python train.py") -> tuple[dict, list[dict]]:
    """The run flags given and one {"kind", "name", "options"} per dictionary, from a command line that
    names several dictionaries (train.py):

        [FLAG ...] --dict KIND [--name NAME] [FLAG ...] --dict KIND [--name NAME] [FLAG ...] ...

    A FLAG is a run flag (a flag field of `run_cls`, allowed anywhere) or a dictionary flag (a flag field of
    `config_class(KIND)`). `--dict KIND` starts a dictionary (KIND one of `kinds`; `--dict a,b` is
    `--dict a --dict b`; none: one `default`); the dictionary flags after it up to the next --dict are its
    own, and a flag its kind lacks is refused. Dictionary flags before the first --dict apply to every
    dictionary whose kind has them (one that no kind has is refused). `--name` names the --dict before it;
    the default names are the kind, then kind-2, kind-3, ... `-h`/`--help` prints the run flags and each
    named kind's flags with their defaults (under `description`) and exits. Only the flags given are
    returned (the dataclasses' defaults apply when they are built); ValueError for a bad flag or kind.
    """
    head, groups = _split_dicts(argv, kinds)
    groups = groups or [(default, [])]
    named = [k for k, _ in groups]
    if "-h" in argv or "--help" in argv:           # the run flags, then each named kind's flags with its defaults
        first, *others = dict.fromkeys(named)
        _dict_parser(run_cls, [first], config_class, description, help_=True).print_help()
        for kind in others:                         # a parser each: kinds share flags (--n-latents, --k, ...)
            p, cls = ArgParser(add_help=False, usage=argparse.SUPPRESS), config_class(kind)
            add_flags(p, cls, defaults=True, group=f"--dict {kind} ({cls.__module__}.{cls.__name__})")
            print(p.format_help())
        raise SystemExit(0)
    parser = _dict_parser(run_cls, kinds, config_class, description)  # every kind's flags: a misplaced one is named
    run_flags, run = {f.name for f in flag_fields(run_cls)}, {}
    fields = {kind: {f.name for f in flag_fields(config_class(kind))} for kind in dict.fromkeys(named)}

    def parse(args: list[str]) -> dict:
        given = {k: v for k, v in vars(parser.parse_args(args)).items() if v is not None}
        run.update({k: v for k, v in given.items() if k in run_flags})
        return {k: v for k, v in given.items() if k not in run_flags}

    common = parse(head)
    if "name" in common and len(groups) > 1:
        raise ValueError("--name names the --dict before it: put it after that --dict")
    specs = []
    for kind, args in groups:
        own = {**({"name": common["name"]} if "name" in common else {}), **parse(args)}
        bad = [k for k in own if k != "name" and k not in fields[kind]]
        if bad:
            raise ValueError(f"{flag(bad[0])} is not an option of --dict {kind} ({command} --dict {kind} "
                             f"--help lists them)")
        options = {k: v for k, v in common.items() if k in fields[kind]}
        specs.append({"kind": kind, "name": own.pop("name", None), "options": {**options, **own}})
    unused = [k for k in common if k != "name" and not any(k in fields[s["kind"]] for s in specs)]
    if unused:
        raise ValueError(f"{flag(unused[0])} is not an option of --dict {', '.join(dict.fromkeys(named))}")
    for i, s in enumerate(specs):
        if s["name"] is None:
            n = sum(t["kind"] == s["kind"] for t in specs[:i]) + 1
            s["name"] = s["kind"] if n == 1 else f"{s['kind']}-{n}"
    return run, specs


def _split_dicts(argv: list[str], kinds) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The arguments before the first --dict, and (kind, its arguments) for each --dict (a,b: two)."""
    head, groups, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--dict" or a.startswith("--dict="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in a else 2
            for kind in value.split(","):
                if kind not in kinds:
                    raise ValueError(f"--dict must be one of {', '.join(kinds)}, got {kind!r}")
                groups.append((kind, []))
            continue
        (groups[-1][1] if groups else head).append(a)
        i += 1
    return head, groups


def _dict_parser(run_cls, kinds, config_class, description: str, help_: bool = False) -> ArgParser:
    """The run flags and the dictionary flags of `kinds` (a flag two kinds share: once): None unless given,
    or (help_) with their defaults and help, a group per kind."""
    p = ArgParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    added = add_flags(p, run_cls, defaults=help_, group="run flags" if help_ else None)
    for kind in dict.fromkeys(kinds):
        cls = config_class(kind)
        added |= add_flags(p, cls, defaults=help_, group=f"--dict {kind} ({cls.__module__}.{cls.__name__})"
                           if help_ else None, skip=set() if help_ else added)
    p.add_argument("--name", default=None, help="the name of the --dict before it (its run folder)")
    return p

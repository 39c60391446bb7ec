"""How long `python metrics.py RUN` takes, now and at an earlier commit, side by side in one run.

    python bench/bench_metrics.py runs/latest [RUN ...] --before 9d0daa9 [--after REV] [--now-flags "--thorough"]

For each run folder: the wall-clock time of metrics.py as that commit had it (a `git worktree` of the
revision in a temporary folder, its own defaults), then as it is now (the working tree, or a worktree of
--after) with its defaults, and now with
`--now-flags` (default --thorough: the settings the old defaults had). The commands run one after another
(never two at once), each in a fresh process, on a copy of the run folder (the eval.json each one writes
stays apart). Prints a Markdown table of seconds, with the training time from the run's summary.json
beside them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by train.py")
    p.add_argument("--before", default=None, help="git revision to compare with (e.g. 9d0daa9)")
    p.add_argument("--after", default=None, help="git revision of 'now' (default: the working tree)")
    p.add_argument("--now-flags", default="--thorough", help="flags of the third column ('' to skip it)")
    p.add_argument("--metrics", default="metrics.py", help="the script, relative to the repository root")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        tmp = Path(tmp)
        trees = {}
        for name, rev in (("before", a.before), ("after", a.after)):
            if rev:
                trees[name] = tmp / name
                subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), rev], cwd=ROOT, check=True,
                               capture_output=True)
        old, now = trees.get("before"), trees.get("after", ROOT)
        try:
            head = f"| run | training (s) |{' before (s) |' if old else ''} now (s) |"
            head += f" now {a.now_flags} (s) |" if a.now_flags else ""
            print(head)
            print("|" + "---|" * (head.count("|") - 1))
            for run in a.runs:
                summary = json.loads(Path(run, "summary.json").read_text())
                row = f"| {run} | {summary['time']['loop_s']:.0f} |"
                variants = ([(old, [])] if old else []) + [(now, [])] + ([(now, shlex.split(a.now_flags))]
                                                                         if a.now_flags else [])
                for i, (where, flags) in enumerate(variants):
                    copy = tmp / f"run{i}"
                    shutil.rmtree(copy, ignore_errors=True)
                    shutil.copytree(run, copy)
                    quiet = ["--quiet"] if where == now else []         # (the old metrics.py had no bars)
                    row += f" {timed([sys.executable, a.metrics, str(copy), *quiet, *flags], where):.0f} |"
                print(row, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

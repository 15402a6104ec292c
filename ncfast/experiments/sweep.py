"""`ncfast sweep`: one training run per combination of override values and seeds, each in its own
folder under <runs_dir>/<sweep name>/. Finished runs are skipped, interrupted ones resumed
(`ncfast train --resume`), several run at once on one machine (--jobs), or the commands are
printed for a cluster scheduler (--print)."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..train import checkpoint as ckpt
from ..train.config import ConfigError, load
from .runs import is_finished


@dataclass
class PlannedRun:
    """One run of a sweep: its overrides, its folder and what has to happen to it."""
    name: str
    config: str | None  # a YAML file or preset name; None: the digits default
    overrides: list[str]
    run_dir: Path
    state: str  # "finished", "resume", "restart" (no checkpoint yet) or "new"

    def command(self, installed: bool = False) -> list[str]:
        """The `ncfast train` command of this run: through this Python, or (``installed``) as
        the console script a cluster node has on its PATH."""
        head = ["ncfast", "train"] if installed else [sys.executable, "-m", "ncfast", "train"]
        head += ["--config", self.config] if self.config else []
        flag = {"resume": ["--resume"], "restart": ["--overwrite"]}.get(self.state, [])
        return head + self.train_overrides() + flag

    def train_overrides(self) -> list[str]:
        return self.overrides + [f"name={self.name}", f"runs_dir={self.run_dir.parent}",
                                 "progress=false"]


def split_values(text: str) -> list[str]:
    """'ce,mse' -> ['ce', 'mse']; commas inside brackets belong to a list value:
    '[256,256],[64]' -> ['[256,256]', '[64]']."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def grid(axes: list[str]) -> list[list[str]]:
    """``key=v1,v2`` items -> every combination, each a list of ``key=v`` overrides (the first
    axis varies slowest)."""
    parsed = []
    for item in axes:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"sweep axis {item!r} must be key=value[,value...] "
                              f"(e.g. loss.name=ce,mse)")
        values = split_values(text)
        if any(v == "" for v in values):
            raise ConfigError(f"sweep axis {item!r} has an empty value")
        parsed.append([f"{key.strip()}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*parsed)] if parsed else [[]]


def run_name(overrides: list[str]) -> str:
    """A folder name from the overrides: 'loss.name=ce__seed=0', 'model.hidden=32-32' for
    model.hidden=[32, 32] (no '/', brackets, quotes or spaces)."""
    cleaned = []
    for o in overrides:
        for old, new in (("/", "_"), ("\\", "_"), (",", "-"), (" ", ""), ("[", ""), ("]", ""),
                         ("'", ""), ('"', "")):
            o = o.replace(old, new)
        cleaned.append("".join(c if c.isprintable() else "_" for c in o))
    name = "__".join(cleaned) or "run"
    data = name.encode("utf-8", "surrogatepass")
    if len(data) > 120:  # folder names stay short (in bytes, as the OS counts) and distinct
        name = (data[:100].decode("utf-8", "ignore") + "__"
                + hashlib.sha1(data).hexdigest()[:10])
    return name


def plan(runs: list[tuple[str | None, list[str]]], runs_dir: str | Path,
         names: list[str] | None = None) -> list[PlannedRun]:
    """Runs given as (config, overrides), each config checked (so a bad value stops the sweep
    before any run starts), named after its overrides unless ``names`` are given, its state read
    from its folder under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    planned = []
    seen = set()
    for i, (config, overrides) in enumerate(runs):
        name = names[i] if names else run_name(overrides)
        cfg = load(config, [*overrides, f"name={name}"])  # raises ConfigError naming the key
        if name in seen:
            raise ConfigError(f"sweep runs {name!r} repeat: an axis lists a value twice")
        seen.add(name)
        run_dir = runs_dir / name
        if is_finished(run_dir, cfg.epochs):
            state = "finished"
        elif (run_dir / ckpt.CHECKPOINT).is_file():
            state = "resume"
        elif run_dir.is_dir() and any(run_dir.iterdir()):
            state = "restart"  # killed before its first checkpoint: nothing to resume
        else:
            state = "new"
        planned.append(PlannedRun(name, config, overrides, run_dir, state))
    return planned


def execute(runs: list[PlannedRun], jobs: int = 1, threads: int = 0,
            log=print) -> list[PlannedRun]:
    """Run every unfinished run, ``jobs`` at a time, each with ``threads`` torch threads (0:
    the machine's cores shared among the jobs). One job with the default threads runs in this
    process; otherwise each run is an `ncfast train` process whose output goes to
    <run folder>.log. Returns the runs that failed."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"--threads must be an integer >= 0, got {threads!r}")
    todo = [r for r in runs if r.state != "finished"]
    for r in runs:
        if r.state == "finished":
            log(f"skip   {r.name} (finished)")
    if jobs == 1 and threads == 0:
        return [r for r in todo if not _train_here(r, log)]
    per_job = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(per_job), "MKL_NUM_THREADS": str(per_job)}
    running: list[tuple[PlannedRun, subprocess.Popen, object]] = []
    failed = []
    while todo or running:
        while todo and len(running) < jobs:
            r = todo.pop(0)
            r.run_dir.parent.mkdir(parents=True, exist_ok=True)
            logfile = open(r.run_dir.parent / f"{r.name}.log", "a")
            log(f"{r.state if r.state != 'new' else 'start'} {r.name}")
            try:
                proc = subprocess.Popen(r.command(), stdout=logfile, stderr=subprocess.STDOUT,
                                        env=env)
            except OSError as err:  # this run cannot start: close its log, go on with the rest
                logfile.close()
                failed.append(r)
                log(f"FAILED {r.name} (could not start: {err})")
                continue
            running.append((r, proc, logfile))
        time.sleep(0.2)
        for item in list(running):
            r, proc, logfile = item
            if proc.poll() is not None:
                logfile.close()
                running.remove(item)
                if proc.returncode == 0:
                    r.state = "finished"
                    log(f"done   {r.name}")
                else:
                    failed.append(r)
                    log(f"FAILED {r.name} (exit {proc.returncode}; see "
                        f"{r.run_dir.parent / (r.name + '.log')})")
    return failed


def _train_here(r: PlannedRun, log) -> bool:
    from ..train import run

    log(f"{r.state if r.state != 'new' else 'start'} {r.name}")
    try:
        run(load(r.config, r.train_overrides()), resume=r.state == "resume",
            overwrite=r.state == "restart")
    except Exception as err:  # one failed run does not stop the sweep
        log(f"FAILED {r.name} ({type(err).__name__}: {err})")
        return False
    r.state = "finished"
    log(f"done   {r.name}")
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncfast sweep",
        description="Train one run per combination of the given values (key=v1,v2,... each an "
                    "axis; seed=0,1,2 for seeds), each in <runs-dir>/<name>/<key=value__...>/. "
                    "Finished runs are skipped and interrupted ones resumed, so rerunning the "
                    "same command completes a sweep.",
        epilog="example: ncfast sweep --config digits loss.name=ce,mse,rescaled_mse seed=0,1,2 "
               "--jobs 2")
    parser.add_argument("axes", nargs="*", metavar="KEY=V1,V2",
                        help="config keys and their values (brackets group list values)")
    parser.add_argument("--config", default=None,
                        help="a YAML file or preset name the runs start from (default: the "
                             "digits default)")
    parser.add_argument("--name", default="sweep", help="the sweep's folder (default sweep)")
    parser.add_argument("--runs-dir", default="runs", help="where the sweep folder goes")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on this machine")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: the cores divided among the jobs)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the commands of the unfinished runs, one per line, and "
                             "run nothing (for a cluster scheduler)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)  # options may sit between the positionals
    try:
        runs = plan([(args.config, o) for o in grid(args.axes)], Path(args.runs_dir) / args.name)
        if args.print_only:
            for r in runs:
                if r.state != "finished":
                    print(shlex.join(r.command(installed=True)))
            return
        failed = execute(runs, args.jobs, args.threads)
    except ConfigError as err:
        raise SystemExit(f"ncfast sweep: {err}") from None
    done = sum(r.state == "finished" for r in runs)
    print(f"{done}/{len(runs)} runs finished in {Path(args.runs_dir) / args.name}")
    if failed:
        raise SystemExit(1)

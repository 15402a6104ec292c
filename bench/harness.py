"""Shared benchmark harness: environment record, timing, correctness gate, markdown output and
the command-line options common to every bench script."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.utils.benchmark as tbench

import ncfast

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
               torch.float16: "fp16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# (rtol, atol as a fraction of max|expected|). The absolute part is relative to the scale of
# the expected tensor because gradients shrink like 1/B: a fixed atol would be meaningless at
# one shape and vacuous at another.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    # A few roundings of 2^-9 (bf16) / 2^-12 (fp16) each, in eager's unfused intermediates.
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (4e-3, 1e-4),
}


# ---------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_revision() -> str:
    """Short HEAD, with "-dirty" when tracked files differ from it (untracked ones don't count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    if os.environ.get("NCFAST_GIT_REVISION"):  # set by whoever copied the tree without .git
        return os.environ["NCFAST_GIT_REVISION"]
    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def environment(device: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Everything a results table needs to be reproduced or compared: machine, versions, build,
    the command line, then `extra` (e.g. the bench's settings)."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["GPU"] = (f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
                      f"sm_{props.major}{props.minor})")
    env["CPU"] = _cpu_model()
    env["CPU threads (torch)"] = str(torch.get_num_threads())
    env["python"] = platform.python_version()
    env["torch"] = torch.__version__
    env["CUDA (torch build)"] = torch.version.cuda or "none"
    env["ncfast"] = ncfast.__version__
    env["ncfast build"] = ", ".join(f"{k}={v}" for k, v in ncfast.build_info().items())
    env["git revision"] = git_revision()
    argv = list(getattr(sys, "orig_argv", sys.argv))
    # The interpreter by name only: its path is the measuring machine's, not the reader's.
    argv[0] = os.path.basename(argv[0])
    env["command"] = " ".join(argv)
    env.update(extra or {})
    # Other processes on a small machine distort CPU timings; this makes that visible.
    env["load average at start (1/5/15 min)"] = load_average()
    return env


def close_environment(env: dict, others: "OtherCpuUse") -> None:
    """The environment block's end-of-run lines: the load and other processes' CPU use."""
    env["load average at end (1/5/15 min)"] = load_average()
    env["CPU used by other processes during the run"] = others.report()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


class OtherCpuUse:
    """CPU seconds that processes other than this one (and its reaped children) used between
    construction and `report()`: on a 2-core machine one busy neighbour ruins the timings."""

    def __init__(self) -> None:
        self._start = self._sample()
        self._t0 = timeit.default_timer()

    @staticmethod
    def _sample() -> tuple[float, float] | None:
        try:
            total = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = sum(total[:3]) + sum(total[5:7])  # user nice system, irq softirq
        own_busy = sum(int(x) for x in own[11:15])  # utime stime cutime cstime
        return busy / hz, own_busy / hz

    def report(self) -> str:
        end = self._sample()
        if self._start is None or end is None:
            return "n/a"
        others = (end[0] - self._start[0]) - (end[1] - self._start[1])
        wall = timeit.default_timer() - self._t0
        return (f"{max(others, 0.0):.1f} CPU s in {wall:.0f} s "
                f"({100 * max(others, 0.0) / wall:.0f}% of one core)")


# ---------------------------------------------------------------------------------- timing

def _sync_timer(device: str) -> Callable[[], float]:
    # Explicit rather than relying on Timer's default: a block's time must include the queued
    # kernels. One sync per block of calls, so launches still overlap within a block.
    if device == "cuda":
        def timer() -> float:
            torch.cuda.synchronize()
            return timeit.default_timer()
        return timer
    return timeit.default_timer


def median_time(fn: Callable[[], Any], device: str, min_run_time: float) -> float:
    """Median seconds per call of `fn()`, from Timer.blocked_autorange."""
    timer = tbench.Timer(
        stmt="fn()",
        globals={"fn": fn},
        timer=_sync_timer(device),
        # Timer defaults to one thread; CPU numbers must use what a user's process gets.
        num_threads=torch.get_num_threads(),
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


# ------------------------------------------------------------------------ correctness gate

class CorrectnessError(AssertionError):
    """A candidate disagreed with the reference; the benchmark stops rather than time it."""


def check_close(label: str, actual: torch.Tensor, expected: torch.Tensor,
                dtype: torch.dtype) -> None:
    """assert_close at the tolerance of `dtype` (the candidate's compute dtype); `expected` may
    be a higher-precision reference, both are compared in float64."""
    rtol, atol_rel = TOLERANCES[dtype]
    expected = expected.detach().to(torch.float64)
    atol = atol_rel * float(expected.abs().max()) if expected.numel() else 0.0
    try:
        torch.testing.assert_close(actual.detach().to(torch.float64), expected,
                                   rtol=rtol, atol=atol)
    except AssertionError as err:
        raise CorrectnessError(
            f"correctness gate failed for {label} (rtol={rtol:g}, atol={atol:.3g}): {err}"
        ) from None


# ------------------------------------------------------------------------------- formatting

def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def fmt_rate(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   caption: str | None = None) -> str:
    """A markdown table with `columns` as headers, in that order; missing cells stay empty."""
    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|")

    lines = []
    if caption:
        lines += [caption, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def render_results(title: str, env: Mapping[str, str], sections: Iterable[str]) -> str:
    """A results document: title, environment block, then each section (e.g. a table)."""
    parts = [f"# {title}", "\n".join(f"- {k}: {v}" for k, v in env.items())]
    parts += sections
    return "\n\n".join(parts) + "\n"


def emit(text: str, out: str | None) -> None:
    """Print the results, and write them to `out` when given."""
    print(text, end="")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"\nwritten to {path}", file=sys.stderr)


# ------------------------------------------------------------------------ command line

def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"256x10,4096x1000" -> [(256, 10), (4096, 1000)]."""
    try:
        return [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 256x10,4096x1000, got {text!r}")


def parse_dtypes(text: str) -> list[torch.dtype]:
    try:
        return [DTYPES_BY_NAME[name] for name in text.split(",") if name]
    except KeyError as err:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {err.args[0]!r}; use {', '.join(DTYPES_BY_NAME)}")


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", metavar="PATH", help="also write the markdown results here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: short measurements, the largest CPU shapes skipped")
    parser.add_argument("--shapes", type=parse_shapes, metavar="BxK,...",
                        help="override the shape list, e.g. 256x10,4096x1000")
    parser.add_argument("--dtypes", type=parse_dtypes, metavar="fp32,bf16,...",
                        help="override the dtype list of the device")
    parser.add_argument("--min-run-time", type=float, metavar="SECONDS",
                        help="per measurement (default 1.0, or 0.2 with --quick)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 1.0
    return args

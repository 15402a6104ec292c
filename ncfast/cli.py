"""The `ncfast` command. Each subcommand lives in its own module with a ``main(argv)`` and its
own argparse parser (so ``ncfast X --help`` is that command's help); add one by adding a row to
SUBCOMMANDS."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name: (module whose main(argv) runs it, one line for `ncfast --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ncfast.train.command",
              "train a classifier and track neural collapse (NC1-NC4) as it trains"),
    "ufm": ("ncfast.ufm_experiment",
            "UFM landscape experiment: GD to the closed form, saddles, curvature vs alpha and M"),
    "sweep": ("ncfast.experiments.sweep",
              "one run per combination of override values and seeds; resumable, parallel"),
    "plot": ("ncfast.experiments.plotting",
             "overlay runs: NC1-NC4 and errors against the epoch, mean and band over seeds"),
    "figure": ("ncfast.experiments.figures",
               "the paper's figures by name (ncfast figure --list), with their numbers"),
    "measure": ("ncfast.experiments.posthoc",
                "NC measured post hoc over the checkpoints a run kept at its tracking epochs"),
    "miniimagenet": ("ncfast.experiments.miniimagenet",
                     "convert the mini-ImageNet pickles to the official split as ImageFolder"),
    "info": ("ncfast.info", "versions, build information, kernels per op and device"),
}


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    table = "\n".join(f"  {name:<10}{text}" for name, (_, text) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ncfast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fast tooling for neural-collapse research.",
        epilog=f"commands:\n{table}\n\n`ncfast COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"ncfast {__version__}")
    parser.add_argument("command", metavar="COMMAND", choices=list(SUBCOMMANDS),
                        help=f"one of: {', '.join(SUBCOMMANDS)}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.print_help()
        return
    parsed = parser.parse_args(argv)
    module, _ = SUBCOMMANDS[parsed.command]
    try:
        importlib.import_module(module).main(parsed.args)
        sys.stdout.flush()  # inside the try: a closed pipe raises here, not at exit
    except BrokenPipeError:  # the reader stopped early (`ncfast train --list-keys | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()

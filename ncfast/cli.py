"""The `ncfast` command: `ncfast train`, `ncfast ufm`, `ncfast info`."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "train a classifier and track neural collapse (ncfast train --help)",
    "info": "versions, build information, kernels per op and device",
    "ufm": "UFM landscape experiment: GD to the closed form, saddles, curvature vs alpha and M",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ncfast COMMAND [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<8}{text}")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import command

        command.main(rest)
    elif command == "info":
        from . import info

        info.main()
    elif command == "ufm":
        from . import ufm_experiment

        ufm_experiment.main(rest)
    else:
        sys.exit(f"ncfast: unknown command {command!r}; choose one of {', '.join(COMMANDS)}")


if __name__ == "__main__":
    main()

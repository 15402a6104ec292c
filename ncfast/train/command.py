"""The `ncfast train` command line: ``ncfast train [--config FILE|PRESET] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CONFIG, CheckpointError
from .config import ConfigError, dump, file_exists, key_infos, list_presets, load


def keys_table() -> str:
    """Every config key, one per line: key, type, default, help."""
    rows = [(i.key, i.type, repr(i.default), i.help) for i in key_infos()]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    return "\n".join(f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {h}"
                     for k, t, d, h in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ncfast train",
        description="Train a classifier and track neural collapse (NC1-NC4) as it trains. "
                    "Without --config: the digits default (MLP with a 16-wide feature layer, "
                    "MSE with weight decay, SGD, 300 epochs). Overrides are dotted keys, e.g. optim.lr=0.1 epochs=100.")
    parser.add_argument("--config", help="a YAML file, or a preset's name (--list-presets)")
    parser.add_argument("--resume", action="store_true",
                        help="continue runs/<name> from its last checkpoint, with the config "
                             "saved there (overrides of epochs, workers, data.dir apply)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run runs/<name> (never a folder that is not "
                             "a run); the old run stays until the new one's first checkpoint")
    parser.add_argument("--data-dir", help="where the data set lives (the same as data.dir=...)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--list-keys", action="store_true",
                        help="list every config key with its type, default and help, and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, after --config and the "
                             "overrides) and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # flags may sit between the overrides
    if args.list_presets:
        import yaml

        for name, path in list_presets().items():
            about = (yaml.safe_load(path.read_text()) or {}).get("about", "")
            print(f"{name:<28}{about}")
        return
    if args.list_keys:
        print(keys_table())
        return
    from .loop import TrainingDiverged, run

    try:
        overrides = list(args.overrides)
        if args.data_dir is not None:
            overrides.append(f"data.dir={args.data_dir}")
        config = args.config
        if args.resume and config is None:  # continue the run as it was configured
            named = load(None, overrides)
            saved = Path(named.runs_dir) / named.name / CONFIG
            config = str(saved) if file_exists(saved) else None
        cfg = load(config, overrides)
        if args.print_config:
            print(dump(cfg), end="")
            return
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, TrainingDiverged) as err:
        sys.exit(f"ncfast train: {err}")

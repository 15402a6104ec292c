"""`ncfast measure RUN`: neural collapse measured after training, over the checkpoints a run
kept at its tracking epochs (``track.keep_checkpoints=true``), as the official code measures
every saved epoch. Records go to <run>/measured.jsonl, in the format of metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from ..train import checkpoint as ckpt
from ..train.config import ConfigError, all_keys, from_dict
from ..train.data import close_workers, load_splits, loaders
from ..train.loop import loss_function, measure_split
from ..train.models import build_model
from .runs import int_list, read_config

_KEPT = re.compile(r"^checkpoint-epoch(\d+)\.pt$")


def kept_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """{epoch: path} of the checkpoints a run kept at its tracking epochs."""
    found = {}
    for p in Path(run_dir).iterdir():
        match = _KEPT.match(p.name)
        if match:
            found[int(match.group(1))] = p
    return dict(sorted(found.items()))


def measure_run(run_dir: str | Path, splits: tuple[str, ...] = ("train", "test"),
                epochs: list[int] | None = None, device: str = "cpu",
                overrides: dict | None = None) -> list[dict]:
    """NC records (one per kept checkpoint and split) of the run in ``run_dir``, from its saved
    config; ``overrides`` may change keys that do not change the model (data.dir,
    data.eval_batch_size, data.workers, track.nc4). Writes <run_dir>/measured.jsonl (replaced
    atomically) and returns the records."""
    run_dir = Path(run_dir)
    flat = read_config(run_dir)
    cfg = from_dict({}, {**flat, **(overrides or {})})
    found = kept_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"run {str(run_dir)!r} kept no checkpoints at its tracking epochs; "
                          f"train it with track.keep_checkpoints=true")
    if epochs is not None:
        missing = sorted(set(epochs) - set(found))
        if missing:
            raise ConfigError(f"run {str(run_dir)!r} has no kept checkpoint for epochs "
                              f"{missing}; it has {list(found)}")
        found = {e: found[e] for e in epochs}
    for split in splits:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    data = load_splits(cfg.data, cfg.seed)
    _, train_eval, test = loaders(data, cfg.data, cfg.seed, 0, 1, device.startswith("cuda"))
    model = build_model(cfg.model, data.num_classes, data.input_shape).to(device)
    loss_fn = loss_function(cfg.loss)
    records = []
    try:
        for epoch, path in found.items():
            saved = ckpt.load_kept(path)
            try:
                model.load_state_dict(saved["model"])
            except RuntimeError as err:
                detail = " ".join(str(err).split())
                raise ckpt.CheckpointError(f"checkpoint {str(path)!r} does not fit the model "
                                           f"of {str(run_dir / ckpt.CONFIG)!r} ({detail})") \
                    from None
            for split, loader in (("train", train_eval), ("test", test)):
                if split in splits:
                    records.append(measure_split(model, model.fc, loader, loss_fn,
                                                 torch.device(device), cfg, split, epoch))
    finally:
        close_workers(train_eval, test)
    text = "".join(json.dumps(r) + "\n" for r in records)
    ckpt.atomic_write(run_dir / ckpt.MEASURED, lambda f: f.write(text.encode()))
    return records


ALLOWED = ("data.dir", "data.eval_batch_size", "data.workers", "track.nc4", "data.download")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncfast measure",
        description="Measure NC1-NC4 (and every other metric of ncfast train) post hoc over the "
                    "checkpoints a run kept at its tracking epochs (train it with "
                    "track.keep_checkpoints=true); writes RUN/measured.jsonl.")
    # One positional list: two (RUN..., KEY=VALUE...) would give argparse's greedy first one
    # every item. An override is a config key '=' a value (and no existing path).
    parser.add_argument("items", nargs="+", metavar="RUN or KEY=VALUE",
                        help="run folders, and overrides of " + ", ".join(ALLOWED) +
                             " (where the data lives now, how to read it)")
    parser.add_argument("--epochs", default=None,
                        help="comma-separated epochs (default: every kept checkpoint)")
    parser.add_argument("--splits", default="train,test", help="train, test or both")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)  # options may sit between the positionals
    runs, overrides = [], {}
    for item in args.items:
        key, sep, value = item.partition("=")
        if not sep or key not in all_keys() or Path(item).exists():
            runs.append(item)
        elif key in ALLOWED:
            overrides[key] = value
        else:
            raise SystemExit(f"ncfast measure: overrides must be key=value with key one of "
                             f"{', '.join(ALLOWED)}, got {item!r}")
    if not runs:
        raise SystemExit("ncfast measure: name at least one run folder")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"ncfast measure: --device must be cpu, cuda or cuda:N, got "
                         f"{args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ncfast measure: --device cuda, but torch sees no CUDA device")
    epochs = None if args.epochs is None else int_list(args.epochs, "ncfast measure: --epochs")
    for run in runs:
        try:
            records = measure_run(run, tuple(args.splits.split(",")), epochs, args.device,
                                  overrides)
        except (ConfigError, ckpt.CheckpointError, FileNotFoundError) as err:
            raise SystemExit(f"ncfast measure: {err}") from None
        last = records[-1]
        print(f"{run}: {len(records)} records -> {Path(run) / ckpt.MEASURED} (last: epoch "
              f"{last['epoch']} {last['split']} NC1 {last['nc1']:.4g})")

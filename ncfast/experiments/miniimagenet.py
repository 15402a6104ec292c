"""`ncfast miniimagenet`: the commonly distributed mini-ImageNet pickles
(mini-imagenet-cache-{train,val,test}.pkl: ``image_data``, an (n, 84, 84, 3) uint8 array with
each class's images consecutive, and ``class_dict``, {wnid: indices}) converted to the ImageFolder
tree that the mini-ImageNet presets read, with the official code's split: the 64 + 16 + 20
classes merged into 100, and per class the first 500 images for training and the last 100 for
testing (docs/theory.md 6.1)."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

FILES = ("mini-imagenet-cache-train.pkl", "mini-imagenet-cache-val.pkl",
         "mini-imagenet-cache-test.pkl")


class _Arrays(pickle.Unpickler):
    """Unpickles only what the mini-ImageNet pickles hold (dicts, lists, str, numbers and numpy
    arrays): a received file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "slice")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not an array or plain data")


def read_pickle(path: Path) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """(images, [(wnid, indices of its images)...]) of one pickle, classes in file order."""
    try:
        with open(path, "rb") as f:
            data = _Arrays(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a mini-ImageNet pickle ({err})") from None
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise ValueError(f"{str(path)!r} is not a mini-ImageNet pickle: expected a dict with "
                         f"'image_data' and 'class_dict'")
    images = np.asarray(data["image_data"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{str(path)!r}: image_data must be (n, height, width, 3) uint8, got "
                         f"{images.shape} {images.dtype}")
    if not isinstance(data["class_dict"], dict):
        raise ValueError(f"{str(path)!r}: class_dict must be a dict, got "
                         f"{type(data['class_dict']).__name__}")
    classes = [(str(w), np.asarray(idx, dtype=np.int64)) for w, idx in data["class_dict"].items()]
    for wnid, idx in classes:
        # the class name becomes a folder name: a received file must not write elsewhere
        if not wnid.isprintable() or any(c in wnid for c in "/\\"):
            raise ValueError(f"{str(path)!r}: class name {wnid!r} must be a folder name "
                             f"(printable, without '/' or '\\')")
        if idx.ndim != 1 or not len(idx):
            raise ValueError(f"{str(path)!r}: class {wnid} must list its image indices, got an "
                             f"array of shape {idx.shape}")
        if idx.min() < 0 or idx.max() >= len(images):
            raise ValueError(f"{str(path)!r}: class {wnid} indexes images outside "
                             f"0..{len(images) - 1}")
    classes.sort(key=lambda c: int(c[1].min()))  # file order: the official code's labels
    return images, classes


def convert(source: str | Path, out: str | Path, train_per_class: int = 500,
            test_per_class: int = 100, log=print) -> dict:
    """Write out/train/<label>_<wnid>/<i>.png and out/test/... from the three pickles in
    ``source``. Labels follow the official code (train, val, then test classes, in file order);
    the zero-padded label prefix makes ImageFolder's sorted class order the same. Per class the
    first ``train_per_class`` images train and the last ``test_per_class`` test. Returns counts."""
    from PIL import Image

    source, out = Path(source), Path(out)
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(source)!r} lacks {', '.join(missing)}: place the three "
                                f"mini-ImageNet pickles ({', '.join(FILES)}) there")
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"train_per_class and test_per_class must be >= 1, got "
                         f"{train_per_class} and {test_per_class}")
    for split in ("train", "test"):
        if (out / split).exists() and any((out / split).iterdir()):
            raise FileExistsError(f"{str(out / split)!r} already exists and is not empty; "
                                  f"choose another --out")
    need = max(train_per_class, test_per_class)
    for name in FILES:  # every pickle passes its checks before anything is written
        for wnid, idx in read_pickle(source / name)[1]:  # one pickle's images in memory at once
            if len(idx) < need:
                raise ValueError(f"{name}: class {wnid} has {len(idx)} images, fewer than "
                                 f"{need}")
    label = 0
    counts = {"classes": 0, "train": 0, "test": 0}
    for name in FILES:
        images, classes = read_pickle(source / name)
        for wnid, idx in classes:
            folder = f"{label:03d}_{wnid}"
            for split, chosen in (("train", idx[:train_per_class]),
                                  ("test", idx[len(idx) - test_per_class:])):
                target = out / split / folder
                target.mkdir(parents=True, exist_ok=True)
                for i in chosen:
                    Image.fromarray(images[i]).save(target / f"{int(i):06d}.png")
                counts[split] += len(chosen)
            label += 1
        log(f"{name}: {len(classes)} classes")
    counts["classes"] = label
    return counts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncfast miniimagenet",
        description="Convert the mini-ImageNet pickles (" + ", ".join(FILES) + ") into an "
                    "ImageFolder tree (OUT/train, OUT/test) with the official code's split: 100 "
                    "classes, per class the first 500 images train and the last 100 test.")
    parser.add_argument("source", help="folder holding the three pickles")
    parser.add_argument("--out", required=True, help="the tree to write (data.dir of the "
                        "miniimagenet presets)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        counts = convert(args.source, args.out, args.train_per_class, args.test_per_class)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"ncfast miniimagenet: {err}") from None
    print(f"wrote {counts['train']:,} training and {counts['test']:,} test images of "
          f"{counts['classes']} classes to {args.out}")

"""Run-folder files written so that a kill at any moment leaves a usable state: checkpoints and
the config are replaced atomically, metrics.jsonl is cut back to the checkpoint on resume.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool,
None, bytes), is read with ``torch.load(weights_only=True)`` so nothing in a received file can
run, and carries a SHA-256 digest of its payload that :func:`load` verifies. Saving a new one
keeps the one before it as ``checkpoint-previous.pt``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from .config import ConfigError, flatten, show_value

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint-previous.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
PLOT = "nc.png"
CSV_LOG = "metrics.csv"  # config log=[csv] (ncfast.train.logs)
TENSORBOARD_DIR = "tensorboard"  # config log=[tensorboard]
FORMAT = "ncfast.train/2"
PLOT_NUMBERS = "nc.json"  # the numbers behind nc.png
MEASURED = "measured.jsonl"  # what `ncfast measure RUN` computes over the kept checkpoints
# Every name a run folder may hold (glob patterns): a folder holding anything else is not a run,
# and --overwrite refuses to replace it. Add new run files here.
RUN_FILES = (CONFIG, METRICS, PLOT, PLOT_NUMBERS, MEASURED, CSV_LOG, TENSORBOARD_DIR,
             "checkpoint*.pt", ".*.tmp")

# What every checkpoint must hold, with the type of each entry (a hand-made or partial file is
# refused by name). Add new entries here.
FIELDS = {"epoch": int, "config": dict, "model": dict, "optimizer": dict, "scheduler": dict,
          "scaler": dict, "rng": dict, "train_time": float, "track_time": float}


@dataclasses.dataclass
class EpochProgress:
    """Where a checkpoint written inside an epoch (checkpoint_every_steps) stands: ``step``
    batches of the next epoch trained, and that epoch's running sums over every process so far.
    Stored as the entry "within_epoch" (a plain dict), None at an epoch's end."""
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


WITHIN_EPOCH = {f.name: type(f.default) for f in dataclasses.fields(EpochProgress)}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the run folder is left as it is."""


def atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ digest

def _feed(h, obj, where: str) -> None:
    """Hash ``obj`` unambiguously: a type tag, then its size or value, recursively."""
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_meta:  # no bytes of its own to hash
            raise TypeError(f"checkpoint entry {where} must be a dense tensor with data, got "
                            f"layout {obj.layout} on device {obj.device.type}")
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for key, value in obj.items():
            _feed(h, key, where)
            _feed(h, value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}[{i}]")
    elif isinstance(obj, bool) or obj is None:
        h.update({True: b"1", False: b"0", None: b"N"}[obj])
    elif isinstance(obj, int):
        h.update(b"I" + str(obj).encode() + b";")
    elif isinstance(obj, float):
        h.update(b"F" + obj.hex().encode() + b";")
    elif isinstance(obj, (str, bytes)):
        data = obj.encode("utf-8", "surrogatepass") if isinstance(obj, str) else obj
        h.update((b"S" if isinstance(obj, str) else b"B") + struct.pack("<q", len(data)) + data)
    else:
        raise TypeError(f"checkpoint entry {where} must be a tensor or plain data, got "
                        f"{type(obj).__name__}")


def digest(payload: dict) -> str:
    """SHA-256 of a checkpoint's payload (every tensor's bytes, dtype and shape, every value)."""
    h = hashlib.sha256()
    _feed(h, payload, "payload")
    return h.hexdigest()


# ------------------------------------------------------------------------------ RNG state

def rng_state() -> dict:
    """Every RNG's state as tensors and plain data (nothing that needs unpickling code)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                          int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; a state of the wrong shape raises CheckpointError and leaves
    every RNG as it was."""
    saved_torch = torch.get_rng_state()
    saved_numpy = None
    try:
        version, internal, gauss = state["python"]
        python = (version, tuple(internal), gauss)
        random.Random().setstate(python)  # rejects a bad state before anything changes
        torch_state = state["torch"]
        if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8):
            raise TypeError("torch state must be a uint8 tensor")
        torch.set_rng_state(torch_state)
        if state.get("numpy") is not None:
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            saved_numpy = np.random.get_state()
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            cuda = state["cuda"]
            if not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and
                                                   t.dtype == torch.uint8 for t in cuda)):
                raise TypeError("cuda state must be a list of uint8 tensors")
            # one state per GPU the run saw; on a machine with fewer, the missing GPUs' states
            # are dropped (set_rng_state_all would index a generator that does not exist), on
            # one with more, the extra GPUs keep their fresh seed
            for device, device_state in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(device_state, device)
    except Exception as err:  # whatever a malformed state makes the setters raise
        torch.set_rng_state(saved_torch)
        if saved_numpy is not None:
            import numpy as np

            np.random.set_state(saved_numpy)
        raise CheckpointError(f"cannot resume: the checkpoint's RNG state is malformed "
                              f"({type(err).__name__}: {err})") from None
    random.setstate(python)


# ------------------------------------------------------------------------------ save / load

def kept(epoch: int) -> str:
    """The name of the checkpoint kept at a tracking epoch (track.keep_checkpoints)."""
    return f"checkpoint-epoch{epoch:04d}.pt"


def save(path: Path, payload: dict, keep_previous: bool = True) -> None:
    """Write ``payload`` (tensors and plain data, the :data:`FIELDS` at least) atomically to
    ``path`` with its digest; the checkpoint it replaces becomes ``checkpoint-previous.pt``
    unless ``keep_previous`` is False (the checkpoints kept at tracking epochs)."""
    record = {"format": FORMAT, "digest": digest(payload), **payload}
    if keep_previous and path.is_file():
        previous = path.with_name(PREVIOUS)
        tmp = previous.with_name(f".{previous.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # the current file stays in place until the new one replaces it
        except OSError:  # a filesystem without hard links
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, previous)
    atomic_write(path, lambda f: torch.save(record, f))


def _read(path: Path, first_epoch: int = 1) -> dict:
    """The verified payload of one checkpoint file, or CheckpointError saying what is wrong.
    Checkpoints to resume from start at epoch 1; those kept at tracking epochs at 0."""
    where = repr(str(path))
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; truncation breaks it
        raise CheckpointError(f"checkpoint {where} is corrupt or unreadable (not the zip "
                              f"archive torch.save writes: truncated or another file)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it does not expect
            warnings.simplefilter("ignore")
            record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged archive, or an object weights_only does not allow
        text = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())
        refused = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), None)
        if isinstance(err, pickle.UnpicklingError) and refused:
            raise CheckpointError(f"checkpoint {where} holds objects other than tensors and "
                                  f"plain data; it was refused and nothing in it ran "
                                  f"({refused})") from None
        detail = next((ln.strip() for ln in str(err).splitlines()
                       if ln.strip().startswith("Unsupported")), text[:200])
        raise CheckpointError(f"checkpoint {where} is corrupt or unreadable "
                              f"({type(err).__name__}: {detail}); nothing in it ran") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{where} is not an ncfast train checkpoint (expected format "
                              f"{FORMAT!r}, found {found!r})")
    payload = {k: v for k, v in record.items() if k not in ("format", "digest")}
    try:
        actual = digest(payload)
    except TypeError as err:
        raise CheckpointError(f"checkpoint {where}: {err}") from None
    if record.get("digest") != actual:
        raise CheckpointError(f"checkpoint {where} is damaged: its contents do not match its "
                              f"digest (stored {record.get('digest')!r}, computed {actual!r})")
    for key, kind in FIELDS.items():
        if key not in payload:
            raise CheckpointError(f"checkpoint {where} lacks the entry {key!r}")
        value = payload[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"checkpoint {where}: entry {key!r} must be "
                                  f"{kind.__name__}, got {type(value).__name__}")
    within = payload.get("within_epoch")  # a checkpoint written inside the next epoch
    if within is not None and not (
            isinstance(within, dict) and set(within) == set(WITHIN_EPOCH)
            and all(type(within[k]) is kind for k, kind in WITHIN_EPOCH.items())
            and within["step"] >= 1 and within["correct"] >= 0 and within["seen"] >= 0):
        rule = ", ".join(f"{k} ({kind.__name__})" for k, kind in WITHIN_EPOCH.items())
        raise CheckpointError(f"checkpoint {where}: entry 'within_epoch' must be None or a "
                              f"dict of {rule} with step >= 1 and counts >= 0, got "
                              f"{show_value(within)}")
    least = 0 if within is not None else first_epoch
    if payload["epoch"] < least:
        raise CheckpointError(f"checkpoint {where}: entry 'epoch' must be >= {least}, got "
                              f"{payload['epoch']}")
    return payload


def load_kept(path: Path) -> dict:
    """The payload of a checkpoint kept at a tracking epoch (epoch 0 included), verified as
    :func:`load` verifies it."""
    return _read(path, first_epoch=0)


def load(path: Path) -> dict:
    """The payload of the checkpoint at ``path``, verified (format, digest, :data:`FIELDS`).
    Any failure is a CheckpointError that also says whether ``checkpoint-previous.pt`` beside
    it is intact, and how to resume from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {str(path)!r}")
    try:
        return _read(path)
    except CheckpointError as err:
        message = f"cannot resume: {err}; the run folder is unchanged"
    previous = path.with_name(PREVIOUS)
    if previous.is_file():
        try:
            epoch = _read(previous)["epoch"]
        except CheckpointError:
            message += f" (the previous checkpoint {str(previous)!r} is damaged too)"
        else:
            message += (f". The previous checkpoint {str(previous)!r} (epoch {epoch}) is intact: "
                        f"to resume from it, move it over {path.name} (mv {str(previous)!r} "
                        f"{str(path)!r}) and run --resume again")
    raise CheckpointError(message)


# ------------------------------------------------------------------------------ metrics

def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    records = []
    if path.is_file():
        for line in path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records.append(record)
    return records


def truncate_metrics(path: Path, epoch: int) -> list[dict]:
    """Keep the records up to ``epoch`` (those the checkpoint of that epoch had seen)."""
    kept = [r for r in read_metrics(path) if r["epoch"] <= epoch]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return kept


def check_same_config(saved: dict, current: dict, free: tuple[str, ...]) -> None:
    """A resumed run must be the same run: only the ``free`` keys may differ."""
    a, b = flatten(saved), flatten(current)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in free)
    if differ:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ)
        raise ConfigError(f"cannot resume with a different config ({details}); only "
                          f"{', '.join(free)} may change on --resume")

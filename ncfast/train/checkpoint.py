"""Run-folder files written so that a kill at any moment leaves a usable state: checkpoints and
the config are replaced atomically, metrics.jsonl is cut back to the checkpoint on resume."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .config import ConfigError, flatten

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
FORMAT = "ncfast.train/1"


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {str(path)!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, unpickling error
        raise CheckpointError(f"cannot resume: checkpoint {str(path)!r} is corrupt or "
                              f"unreadable ({type(err).__name__}: {err}); the run folder is "
                              f"unchanged") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"cannot resume: {str(path)!r} is not an ncfast train checkpoint "
                              f"(expected format {FORMAT!r})")
    return payload


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
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

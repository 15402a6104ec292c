"""Where a run's records go besides metrics.jsonl (config key ``log``): TensorBoard event files
(``tensorboard/``) and a CSV (``metrics.csv``), both written by rank 0 with the same tags."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .checkpoint import CSV_LOG, TENSORBOARD_DIR, atomic_write
from .config import ConfigError
# Record fields that label a record or are not a scalar of the run.
_NOT_SCALARS = ("kind", "epoch", "split", "empty_classes", "undefined")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as {tag: value}: ``train/loss``, ``train/lr``, ...,
    ``nc/train/nc1``, ``nc/test/accuracy``, ...; undefined (None) metrics left out."""
    prefix = "train/" if record["kind"] == "train" else f"nc/{record['split']}/"
    return {prefix + name: float(value) for name, value in record.items()
            if name not in _NOT_SCALARS and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


def check_available(backends: list[str]) -> None:
    """Raise a ConfigError now (before the run folder is touched) if a backend's library is
    missing."""
    if "tensorboard" in backends:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise ConfigError("config key 'log' includes 'tensorboard', but the tensorboard "
                              "package is not installed (pip install tensorboard)") from None


class RunLogs:
    """The extra logs of one run folder. On resume the CSV is rewritten from the records kept
    (those up to the checkpoint's epoch) and TensorBoard purges its later events, so both hold
    exactly what metrics.jsonl holds."""

    def __init__(self, folder: Path, backends: list[str], records: list[dict],
                 resumed_at: int | None) -> None:
        self._tb = self._csv = None
        if "csv" in backends:
            path = folder / CSV_LOG
            text = io.StringIO()
            rows = csv.writer(text)
            rows.writerow(["epoch", "tag", "value"])
            for record in records:
                rows.writerows([record["epoch"], tag, value]
                               for tag, value in scalars(record).items())
            atomic_write(path, lambda f: f.write(text.getvalue().encode()))
            self._csv = path.open("a", newline="")
            self._rows = csv.writer(self._csv)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(folder / TENSORBOARD_DIR),
                                     purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, record: dict) -> None:
        values = scalars(record)
        if self._csv is not None:
            self._rows.writerows([record["epoch"], tag, value] for tag, value in values.items())
            self._csv.flush()
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, record["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()

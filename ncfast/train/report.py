"""What a run shows: progress (a tqdm bar on a terminal, plain lines in logs), the plots of
NC1-NC4, error and loss against the epoch (ncfast.experiments.plotting) and the summary table
at the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path



class Progress:
    """Training progress. On a terminal: a tqdm bar per epoch (batches, samples/s, running
    loss). Elsewhere (SLURM logs, files): a plain line every ``every`` steps (0: none). Either
    way one line per finished epoch."""

    def __init__(self, enabled: bool, every: int = 0, stream=sys.stderr):
        self.enabled, self.every, self.stream = enabled, every, stream
        self.tty = enabled and stream.isatty()
        self._bar = None
        self._last = 0.0

    def update(self, epoch: int, epochs: int, batch: int, batches: int, samples: int,
               seconds: float, loss) -> None:
        """After step ``batch`` of ``batches``. ``loss`` may be a device tensor: it is read (a
        host sync) only when shown: at most five times a second on a terminal, every ``every``
        steps elsewhere."""
        if not self.enabled:
            return
        if not self.tty:
            if self.every and (batch % self.every == 0):
                self.stream.write(f"epoch {epoch}/{epochs} step {batch}/{batches}  "
                                  f"loss {float(loss.detach()):.4g}  "
                                  f"{samples / max(seconds, 1e-9):,.0f} samples/s\n")
                self.stream.flush()
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=batches, desc=f"epoch {epoch}/{epochs}", unit="batch",
                             leave=False, file=self.stream, dynamic_ncols=True)
        self._bar.update(batch - self._bar.n)
        now = time.perf_counter()
        if now - self._last >= 0.2 or batch == batches:
            self._last = now
            self._bar.set_postfix_str(f"loss {float(loss.detach()):.4g}  "
                                      f"{samples / max(seconds, 1e-9):,.0f} samples/s")

    def epoch_done(self, line: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            self.stream.write(line + "\n")
            self.stream.flush()


def plot(records: list[dict], path: Path, title: str) -> None:
    """Every NC metric (the paper's definitions and the other common ones, labelled), error
    and loss against the epoch, train and test, learning-rate drops marked: the run's nc.png
    (and nc.json, the numbers behind it)."""
    from ..experiments.plotting import FULL, draw
    from ..experiments.runs import Group, Run, read_config

    if any(r["kind"] == "nc" for r in records):  # the run's config says what its schedule is
        run = Run(path.parent, read_config(path.parent), records)
        draw([Group(title, [run])], path, title, FULL, columns=4)


# (record key, column) of the summary table: the paper's definitions first (docs/theory.md 5.9),
# then the other common ones, labelled as such.
SUMMARY_COLUMNS = (("accuracy", "accuracy"), ("loss", "loss"), ("nc1", "NC1"),
                   ("nc2_means", "NC2 (means)"), ("nc2_classifier", "NC2 (classifier)"),
                   ("nc3_gram", "NC3"), ("bias_norm", "NC4 = ‖Wμ_G+b‖"),
                   ("nc3_dual", "NC3 (dual form)"), ("nc4", "NC4 (NCM mismatch)"))


def summary(records: list[dict], train_time: float, track_time: float) -> str:
    """A table of the first and last measurement of each split, and the time spent."""
    nc = [r for r in records if r["kind"] == "nc"]
    rows = []
    for split in ("train", "test"):
        mine = [r for r in nc if r["split"] == split]
        if mine:
            rows += [(split, mine[0]), (split, mine[-1])] if len(mine) > 1 else [(split, mine[0])]
    if not rows:
        return "no NC measurement was taken"
    header = "| split | epoch | " + " | ".join(c for _, c in SUMMARY_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(SUMMARY_COLUMNS) + 2)]
    for split, r in rows:
        cells = [fmt(r.get(k)) for k, _ in SUMMARY_COLUMNS]
        lines.append(f"| {split} | {r['epoch']} | " + " | ".join(cells) + " |")
    overhead = track_time / train_time if train_time > 0 else float("nan")
    lines.append("")
    lines.append(f"training {train_time:.1f} s, NC tracking {track_time:.1f} s "
                 f"({100 * overhead:.1f}% of training time)")
    return "\n".join(lines)


def fmt(v) -> str:
    """A metric for a table: 4 significant digits, "-" when undefined."""
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)

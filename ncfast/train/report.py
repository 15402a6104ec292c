"""What a run shows: a progress line with throughput, the plots of NC1-NC4, accuracy and loss
against the epoch (log scales, as in the paper's figures) and the summary table at the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .checkpoint import atomic_write


class Progress:
    """One line per epoch, redrawn in place on a terminal (batches, samples/s, running loss)."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.tty = enabled and stream.isatty()
        self._last = 0.0

    def update(self, epoch: int, epochs: int, batch: int, batches: int, samples: int,
               seconds: float, loss) -> None:
        """``loss`` may be a device tensor: it is read (a host sync) only when the line is
        redrawn, at most five times a second."""
        now = time.perf_counter()
        if not self.tty or (now - self._last < 0.2 and batch < batches):
            return
        self._last = now
        width = 24
        filled = round(width * batch / max(batches, 1))
        self.stream.write(f"\repoch {epoch}/{epochs} [{'=' * filled}{' ' * (width - filled)}] "
                          f"{batch}/{batches}  {samples / max(seconds, 1e-9):,.0f} samples/s  "
                          f"loss {float(loss):.4g}  ")
        self.stream.flush()

    def epoch_done(self, line: str) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + line + "\n")
            self.stream.flush()


def plot(records: list[dict], path: Path, title: str) -> None:
    """NC1, NC2 (means and classifier), NC3, NC4, accuracy and loss against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nc = [r for r in records if r["kind"] == "nc"]
    if not nc:
        return
    panels = [
        ("NC1: Tr(Σ_W Σ_B⁺)/K", [("nc1", "train")]),
        ("NC2: distance to a simplex ETF", [("nc2_means", "train", "class means"),
                                            ("nc2_classifier", "train", "classifier")]),
        ("NC3: self-duality", [("nc3_dual", "train")]),
        ("NC4: nearest-mean mismatch rate", [("nc4", "train")]),
        ("error (1 - accuracy)", [("error", "train", "train"), ("error", "test", "test")]),
        ("loss", [("loss", "train", "train"), ("loss", "test", "test")]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (name, series) in zip(axes.flat, panels):
        zeros = False
        for key, split, *label in series:
            points = [(max(r["epoch"], 0.5), r.get(key) if key != "error" else 1 - r["accuracy"])
                      for r in nc if r["split"] == split]
            zeros |= any(v == 0 for _, v in points)
            points = [(e, v) for e, v in points if v is not None and v > 0]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=label[0] if label else None)
        ax.set_title(name + ("\n(values of 0 are off this log scale)" if zeros else ""),
                     fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("epoch (0 plotted at 0.5)")
        ax.grid(True, which="both", alpha=0.3)
        if any(len(s) > 2 for s in series) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def summary(records: list[dict], train_time: float, track_time: float) -> str:
    """A table of the first and last measurement of each split, and the time spent."""
    nc = [r for r in records if r["kind"] == "nc"]
    rows = []
    keys = ("accuracy", "loss", "nc1", "nc2_means", "nc2_classifier", "nc3_dual", "nc4",
            "cdnv", "bias_norm")
    for split in ("train", "test"):
        mine = [r for r in nc if r["split"] == split]
        if mine:
            rows += [(split, mine[0]), (split, mine[-1])] if len(mine) > 1 else [(split, mine[0])]
    if not rows:
        return "no NC measurement was taken"
    header = "| split | epoch | " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for split, r in rows:
        cells = [fmt(r.get(k)) for k in keys]
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

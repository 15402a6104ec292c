"""What a run shows: progress (a tqdm bar on a terminal, plain lines in logs), the plots of
NC1-NC4, accuracy and loss against the epoch (log scales, as in the paper's figures) and the
summary table at the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .checkpoint import atomic_write


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

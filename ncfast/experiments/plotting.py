"""Figures of neural collapse against the epoch, with the paper's metric names (docs/theory.md
5.9): one run (a run folder's nc.png) or several groups of runs, each a mean over its seeds with
a min-max band (`ncfast plot`, `ncfast figure`). Every figure is written with the numbers behind
it (a JSON file beside the PNG)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..train.config import ConfigError
from .runs import Group, Run, expand, group_runs, load_run


@dataclass(frozen=True)
class Series:
    key: str          # record key; "error" is 1 - accuracy
    split: str        # "train" or "test"
    label: str        # legend text inside a panel


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]


def _s(key: str, split: str, label: str = "") -> Series:
    return Series(key, split, label or split)


# The paper's layout (Zhou et al. 2022, the official code's plots): NC1-NC4 and the errors.
PAPER = (
    Panel("NC1", "NC1 = Tr(Σ_W Σ_B⁺) / K", (_s("nc1", "train"),)),
    Panel("NC2 (classifier)", "NC2 = ‖W_cW_cᵀ/‖·‖ − ETF‖",
          (_s("nc2_classifier", "train"),)),
    Panel("NC3 (paper's definition)", "NC3 = ‖W_cM_c/‖·‖ − ETF‖",
          (_s("nc3_gram", "train"),)),
    Panel("NC4 (paper's definition)", "NC4 = ‖W μ_G + b‖", (_s("bias_norm", "train"),)),
    Panel("training error", "1 − accuracy", (_s("error", "train"),)),
    Panel("test error", "1 − accuracy", (_s("error", "test"),)),
)

# A run's own nc.png: every metric, the test split beside the training split, and the other
# common definitions labelled as such.
FULL = (
    Panel("NC1", "NC1 = Tr(Σ_W Σ_B⁺) / K", (_s("nc1", "train"), _s("nc1", "test"))),
    Panel("NC2: distance to a simplex ETF", "NC2",
          (_s("nc2_classifier", "train", "classifier W"),
           _s("nc2_means", "train", "class means, train"),
           _s("nc2_means", "test", "class means, test"))),
    Panel("NC3: classifier vs class means", "NC3",
          (_s("nc3_gram", "train", "paper's NC3 (W_cM_c), train"),
           _s("nc3_gram", "test", "paper's NC3 (W_cM_c), test"),
           _s("nc3_dual", "train", "dual form (Papyan), train"))),
    Panel("NC4 (paper's definition)", "NC4 = ‖W μ_G + b‖",
          (_s("bias_norm", "train"), _s("bias_norm", "test"))),
    Panel("NC4 as nearest-class-mean mismatch", "mismatch rate (Papyan's NC4)",
          (_s("nc4", "train"), _s("nc4", "test"))),
    Panel("error", "1 − accuracy", (_s("error", "train"), _s("error", "test"))),
    Panel("loss", "loss (training objective, no decay)",
          (_s("loss", "train"), _s("loss", "test"))),
)
LAYOUTS = {"paper": PAPER, "full": FULL}


def _value(record: dict, key: str):
    if key == "error":
        acc = record.get("accuracy")
        return None if acc is None else 1.0 - acc
    return record.get(key)


def band(runs: list[Run], series: Series) -> list[dict]:
    """Per epoch: mean, min and max over the runs that have a value there, and their count."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for r in run.nc(series.split):
            v = _value(r, series.key)
            if v is not None and math.isfinite(v):
                by_epoch.setdefault(int(r["epoch"]), []).append(float(v))
    return [{"epoch": e, "mean": sum(vs) / len(vs), "min": min(vs), "max": max(vs),
             "runs": len(vs)} for e, vs in sorted(by_epoch.items())]


def numbers(groups: list[Group], panels=PAPER) -> dict:
    """The numbers a figure draws: per group, per panel series, the band over seeds."""
    out = {"groups": []}
    for g in groups:
        entry = {"label": g.label, "runs": [str(r.path) for r in g.runs],
                 "seeds": sorted({r.config.get("seed") for r in g.runs}), "series": {}}
        for p in panels:
            for s in p.series:
                entry["series"][f"{s.key}/{s.split}"] = band(g.runs, s)
        out["groups"].append(entry)
    return out


def _symlog_threshold(values: list[float]) -> float:
    """The linear range of a symlog axis: one decade below the smallest positive value, so a
    value of 0 sits visibly at the bottom and everything above it is on a log scale. Negative
    values (none of the metrics has them) would be drawn on the mirrored scale."""
    positive = [v for v in values if v > 0]
    if not positive:
        return 1e-3
    return 10.0 ** (math.floor(math.log10(min(positive))) - 1)


def draw(groups: list[Group], path: Path, title: str, panels=PAPER, columns: int = 3) -> dict:
    """Draw ``panels`` for ``groups`` (mean line, min-max band over seeds), mark learning-rate
    drops, and write ``path`` (PNG) and ``path`` with suffix .json (the numbers). Returns the
    numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.checkpoint import atomic_write

    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    drops = sorted({e for g in groups for r in g.runs for e in r.lr_drops()})
    for ax, panel in zip(axes.flat, panels):
        values = []
        for gi, g in enumerate(groups):
            for si, s in enumerate(panel.series):
                points = band(g.runs, s)
                if not points:
                    continue
                xs = [p["epoch"] for p in points]
                mean = [p["mean"] for p in points]
                values += [p["min"] for p in points] + mean
                colour = colours[(gi if len(groups) > 1 else si) % len(colours)]
                style = styles[si % len(styles)] if len(groups) > 1 else (
                    "--" if s.split == "test" else "-")
                parts = [g.label] if len(groups) > 1 else []
                parts += [s.label] if len(panel.series) > 1 else []
                ax.plot(xs, mean, style, color=colour, marker="o", markersize=2.5,
                        label=", ".join(parts) or None)
                if len(g.runs) > 1:
                    ax.fill_between(xs, [p["min"] for p in points], [p["max"] for p in points],
                                    color=colour, alpha=0.2, linewidth=0)
        for i, e in enumerate(drops):
            ax.axvline(e, color="grey", linestyle=":", linewidth=1,
                       label="lr drop" if i == 0 and ax is axes.flat[0] else None)
        if any(v == 0 for v in values):  # symlog: 0 on a short linear stretch at the bottom
            threshold = _symlog_threshold(values)
            ax.set_yscale("symlog", linthresh=threshold)
            ax.set_ylim(bottom=-0.5 * threshold)
        elif values:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title + "\n(log y axes, symlog where a value is 0: then 0 sits at the bottom; "
                 "bands: min-max over seeds; dotted: learning-rate drops)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    data = {"title": title, "panels": [p.title for p in panels], "lr_drops": drops,
            **numbers(groups, panels)}
    atomic_write(path.with_suffix(".json"),
                 lambda f: f.write(json.dumps(data, indent=1).encode()))
    return data


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncfast plot",
        description="Overlay runs: NC1-NC4 and the training and test errors against the epoch, "
                    "runs that differ only in their seed drawn as their mean with a min-max band. "
                    "Writes the PNG and a JSON file with the numbers behind it.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, or folders of run folders (e.g. a sweep's)")
    parser.add_argument("--out", default="plot.png", help="the PNG to write (default plot.png; "
                        "the numbers go to the same name with .json)")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="paper",
                        help="paper: NC1, NC2, NC3, NC4 and the errors as in the paper's "
                             "figures; full: every metric and definition, train and test")
    parser.add_argument("--title", default="", help="figure title")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)  # options may sit between the positionals
    try:
        runs = [load_run(p) for p in expand(args.runs)]
    except (FileNotFoundError, ConfigError) as err:
        raise SystemExit(f"ncfast plot: {err}") from None
    groups = group_runs(runs)
    draw(groups, Path(args.out), args.title or ", ".join(g.label for g in groups),
         LAYOUTS[args.layout])
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}: {len(runs)} runs in "
          f"{len(groups)} groups")

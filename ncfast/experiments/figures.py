"""`ncfast figure NAME`: the paper's figures by name. Each trains its variants over a few seeds
(`ncfast sweep` underneath: finished runs are reused, interrupted ones resumed) and draws them
in the paper's layout with the numbers behind it. On the embedded digits (or Gaussian) data by
default, minutes on a CPU; on CIFAR-10 or mini-ImageNet, from the paper's presets, when given
--data-dir."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..train.config import ConfigError
from . import plotting, sweep
from .runs import Group, int_list, load_run


@dataclass(frozen=True)
class Variant:
    label: str
    small: tuple[str, ...]                 # overrides of the digits / Gaussian default
    preset: str                            # the paper's run (configs/)
    paper: tuple[str, ...] = ()            # overrides of that preset


@dataclass(frozen=True)
class Figure:
    title: str
    about: str
    paper_data: str                        # what --data-dir must hold
    variants: tuple[Variant, ...]


_MLP = "model.hidden=[256,256]"  # model.feature_dim then adds the feature layer of width d
_CE = ("loss.name=ce", "optim.lr=0.05")  # cross-entropy's gradients are K times the MSE's
FIGURES: dict[str, Figure] = {
    "loss": Figure(
        "cross-entropy vs MSE vs rescaled MSE", "NC under the three losses",
        "cifar10", (
            Variant("MSE", (), "cifar10-resnet18-sgd"),
            Variant("cross-entropy", _CE, "cifar10-resnet18-sgd", ("loss.name=ce",)),
            Variant("rescaled MSE (k=5, M=5)", ("loss.name=rescaled_mse", "loss.k=5",
                                                "loss.M=5", "optim.lr=0.1"),
                    "cifar10-resnet18-sgd", ("loss.name=rescaled_mse", "loss.k=5", "loss.M=5")),
        )),
    "optimiser": Figure(
        "SGD vs Adam vs L-BFGS (MSE)", "NC appears under each optimiser (paper: O1-O3)",
        "cifar10", (
            Variant("SGD", (), "cifar10-resnet18-sgd"),
            Variant("Adam", ("optim.name=adam", "optim.lr=0.003"), "cifar10-resnet18-adam"),
            Variant("L-BFGS", ("optim.name=lbfgs", "optim.lr=0.5", "data.batch_size=512",
                               "optim.lbfgs_max_iter=5"), "cifar10-resnet18-lbfgs"),
        )),
    "classifier": Figure(
        "learned vs fixed simplex-ETF classifier, wide vs d = K",
        "a fixed ETF classifier with d = K (paper: E1-E4)", "cifar10", (
            Variant("learned, d=256", (_MLP, "model.feature_dim=256"),
                    "cifar10-resnet18-learned-d512"),
            Variant("fixed ETF, d=256", (_MLP, "model.feature_dim=256", "model.fixed_etf=true"),
                    "cifar10-resnet18-etf-d512"),
            Variant("learned, d=10", (_MLP, "model.feature_dim=10"),
                    "cifar10-resnet18-learned-d10"),
            Variant("fixed ETF, d=10", (_MLP, "model.feature_dim=10", "model.fixed_etf=true"),
                    "cifar10-resnet18-etf-d10"),
        )),
    "feature-dim": Figure(
        "feature dimension d against K - 1 = 9", "d < K-1: collapse without an ETF "
        "(theory.md 4.2 case F; paper: D1-D5)", "cifar10", (
            Variant("d=5", (_MLP, "model.feature_dim=5"), "cifar10-resnet18-d5"),
            Variant("d=8", (_MLP, "model.feature_dim=8"), "cifar10-resnet18-d8"),
            Variant("d=9", (_MLP, "model.feature_dim=9"), "cifar10-resnet18-d9"),
            Variant("d=10", (_MLP, "model.feature_dim=10"), "cifar10-resnet18-learned-d10"),
            Variant("d=256", (_MLP, "model.feature_dim=256"), "cifar10-resnet18-learned-d512"),
        )),
    "k-sweep": Figure(
        "rescaled MSE: the weight k of the true class (M = 1)", "effect of k (paper: R-alpha)",
        "imagefolder", tuple(
            Variant(f"k={k}", ("loss.name=rescaled_mse", f"loss.k={k}"),
                    f"miniimagenet-resnet18-k{k}") for k in (1, 5, 15, 20))),
    "M-sweep": Figure(
        "rescaled MSE: the target scale M (k = 1)", "effect of M (paper: R-M)", "imagefolder",
        tuple(Variant(f"M={M}", ("loss.name=rescaled_mse", f"loss.M={M}",
                                 f"optim.lr={0.5 / M:g}"),
                      "miniimagenet-resnet18-k1" if M == 1 else f"miniimagenet-resnet18-M{M}")
              for M in (1, 3, 5, 7, 10))),
}


def runs_of(figure: Figure, data: str, seeds: list[int], data_dir: str | None,
            extra: list[str]) -> tuple[list[tuple[str | None, list[str]]], list[str]]:
    """(config, overrides) and a folder name for every variant x seed."""
    items, names = [], []
    for v in figure.variants:
        for seed in seeds:
            if data_dir:
                items.append((v.preset, [*v.paper, f"data.dir={data_dir}", f"seed={seed}",
                                         *extra]))
            else:
                small = [] if data == "digits" else ["data.name=gaussian"]
                items.append((None, [*small, *v.small, f"seed={seed}", *extra]))
            names.append(f"{_folder(v)}__seed={seed}")
    return items, names


def _folder(v: Variant) -> str:
    """A variant's folder name: 'fixedETF_d=10' for 'fixed ETF, d=10'."""
    return sweep.run_name([v.label.replace(" ", "").replace(",", "_")])


def make(name: str, out: Path, seeds: list[int], data: str = "digits",
         data_dir: str | None = None, extra: list[str] | None = None, jobs: int = 1,
         threads: int = 0, log=print) -> dict:
    """Train what figure ``name`` needs (reusing finished runs) and write out/<name>.png and
    out/<name>.json. Returns the numbers."""
    figure = FIGURES[name]
    items, names = runs_of(figure, data, seeds, data_dir, list(extra or []))
    planned = sweep.plan(items, out / "runs", names)
    failed = sweep.execute(planned, jobs, threads, log)
    if failed:
        raise RuntimeError(f"ncfast figure {name}: {len(failed)} runs failed: "
                           f"{', '.join(r.name for r in failed)} (logs in {out / 'runs'})")
    # one group per variant, its seeds the band (the runs are listed variant by variant)
    groups = [Group(v.label, [load_run(out / "runs" / n)
                              for n in names[i * len(seeds):(i + 1) * len(seeds)]])
              for i, v in enumerate(figure.variants)]
    where = data_dir or data
    return plotting.draw(groups, out / f"{name}.png", f"{figure.title} ({where}, seeds "
                         f"{', '.join(map(str, seeds))})", plotting.PAPER)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncfast figure",
        description="Reproduce one of the paper's figures by name: train its variants over a "
                    "few seeds and draw NC1-NC4 and the errors against the epoch (mean and "
                    "min-max band over seeds), with the numbers in a JSON file beside the PNG.")
    parser.add_argument("name", nargs="?", choices=list(FIGURES), metavar="NAME",
                        help=f"one of: {', '.join(FIGURES)}")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("--out", default=None, help="output folder (default figures/NAME)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--data", choices=("digits", "gaussian"), default="digits",
                        help="the small data set used without --data-dir")
    parser.add_argument("--data-dir", default=None,
                        help="run the paper's presets on this data instead: CIFAR-10 "
                             "(cifar-10-batches-py/ inside) or mini-ImageNet as an ImageFolder "
                             "tree (ncfast miniimagenet converts the pickles)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on this machine")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="applied to every run (e.g. epochs=50)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # options may sit between the positionals
    if args.list or not args.name:
        for name, f in FIGURES.items():
            data = "CIFAR-10" if f.paper_data == "cifar10" else "mini-ImageNet"
            print(f"{name:<12} {f.title}: {f.about}; {len(f.variants)} variants "
                  f"(with --data-dir: {data})")
        return
    seeds = int_list(args.seeds, "ncfast figure: --seeds")
    out = Path(args.out or Path("figures") / args.name)
    try:
        make(args.name, out, seeds, args.data, args.data_dir, args.overrides, args.jobs,
             args.threads)
    except (ConfigError, RuntimeError) as err:
        raise SystemExit(f"ncfast figure: {err}") from None
    print(f"wrote {out / (args.name + '.png')} and {out / (args.name + '.json')}")

"""Run folders as the experiment tools read them: a run's config and metric records, whether it
finished, and groups of runs that differ only in their seed (for means and bands over seeds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..train import checkpoint as ckpt
from ..train.config import flatten, read_yaml

# Keys that say where or how a run was made, not what it computes: never a group's label.
INCIDENTAL = ("name", "about", "runs_dir", "progress", "seed", "data.dir", "data.download",
              "data.workers", "data.pin_memory", "data.persistent_workers",
              "track.keep_checkpoints")


@dataclass
class Run:
    """One run folder: its resolved config (flat dotted keys) and its metrics.jsonl records."""
    path: Path
    config: dict
    records: list[dict]

    @property
    def epochs(self) -> int:
        return int(self.config["epochs"])

    @property
    def finished(self) -> bool:
        return is_finished(self.path)

    def nc(self, split: str) -> list[dict]:
        """The NC measurements of one split ("train" or "test"), in epoch order."""
        return [r for r in self.records if r.get("kind") == "nc" and r.get("split") == split]

    def lr_drops(self) -> list[int]:
        """Epochs after which a step schedule lowered the learning rate (a warm-up's rises and
        a cosine's decay, which change it every epoch, are not drops)."""
        if self.config.get("schedule.name", "step") != "step":
            return []
        train = [r for r in self.records if r.get("kind") == "train"]
        return [b["epoch"] - 1 for a, b in zip(train, train[1:]) if b["lr"] < a["lr"]]


def read_config(run_dir: Path) -> dict:
    """A run's config.yaml as flat dotted keys; ConfigError when the file is not a config."""
    path = Path(run_dir) / ckpt.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder: it has no {ckpt.CONFIG}")
    return flatten(read_yaml(path))


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    return Run(run_dir, read_config(run_dir), ckpt.read_metrics(run_dir / ckpt.METRICS))


def is_finished(run_dir: str | Path, epochs: int | None = None) -> bool:
    """True when the run measured NC at its last epoch (the loop's final act before the plot),
    and that epoch is ``epochs`` when given (a sweep asking for more epochs resumes it)."""
    run_dir = Path(run_dir)
    try:
        config = read_config(run_dir)
    except (FileNotFoundError, ValueError):
        return False
    last = int(config.get("epochs", -1))
    if epochs is not None and last != epochs:
        return False
    return any(r.get("kind") == "nc" and r.get("epoch") == last and r.get("split") == "train"
               for r in ckpt.read_metrics(run_dir / ckpt.METRICS))


def expand(paths: list[str | Path]) -> list[Path]:
    """Run folders from the command line: a run folder itself, or a folder of run folders (a
    sweep's), taken in sorted order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / ckpt.CONFIG).is_file():
            found.append(p)
        elif p.is_dir():
            inner = sorted(q for q in p.iterdir() if (q / ckpt.CONFIG).is_file())
            if not inner:
                raise FileNotFoundError(f"{str(p)!r} holds no run folder (no {ckpt.CONFIG} in it "
                                        f"or its subfolders)")
            found += inner
        else:
            raise FileNotFoundError(f"run folder {str(p)!r} does not exist")
    return found


@dataclass
class Group:
    """Runs that differ only in incidental keys (the seed above all): one curve, a band."""
    label: str
    runs: list[Run]


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs by their config without the incidental keys; label each group by the keys in
    which the groups differ (``loss.name=ce``), or by its config name when only one group."""
    keyed: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, repr(v)) for k, v in run.config.items() if k not in INCIDENTAL))
        keyed.setdefault(key, []).append(run)
    if len(keyed) == 1:
        (members,) = keyed.values()
        return [Group(str(members[0].config.get("name", members[0].path.name)), members)]
    varying = sorted({k for key in keyed for k, _ in key
                      if len({dict(other).get(k) for other in keyed}) > 1})
    groups = []
    for key, members in keyed.items():
        values = dict(key)
        label = ", ".join(f"{k}={_plain(values.get(k))}" for k in varying)
        groups.append(Group(label, members))
    return groups


def int_list(text: str, option: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] for a command-line option; SystemExit naming the option otherwise."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"{option} must be comma-separated integers, got {text!r}") from None


def _plain(text: str | None) -> str:
    return "-" if text is None else text.strip("'\"")

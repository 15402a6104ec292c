"""The training configuration: typed dataclasses, loaded from YAML, overridden by ``key=value``
arguments (dotted keys, e.g. ``optim.lr=0.1``), saved with every run."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..measurement import EXTRAS


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key, the rule and the value."""


def setting(default: Any, help: str):
    """A config key: its default and the one line ``ncfast train --list-keys`` shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    name: str = setting("digits", "digits (scikit-learn's bundled 8x8), gaussian (synthetic "
                        "mixture), mnist, fashion_mnist, cifar10, cifar100, imagefolder")
    dir: str = setting("data", "where the data set lives (imagefolder: dir/train, dir/val)")
    download: bool = setting(False, "torchvision data sets only; nothing downloads without it")
    num_classes: int = setting(0, "K; 0: taken from the data, else must agree (gaussian: K, "
                               "default 10)")
    batch_size: int = setting(128, "training batch, global: split evenly across processes")
    eval_batch_size: int = setting(1024, "batch of the NC measurement sweeps")
    augment: str = setting("auto", "auto (the data set's standard), none, crop_flip, imagenet")
    image_size: int = setting(0, "imagefolder: crop size (0: 224; mini-ImageNet presets use 84)")
    workers: int = setting(0, "DataLoader worker processes")
    decode: str = setting("cpu", "imagefolder training batches: cpu (PIL in the workers) or cuda "
                          "(workers read the JPEG bytes; nvJPEG decode and augmentation on "
                          "the GPU)")
    pin_memory: bool = setting(True, "pinned host memory for the loaders (on CUDA only)")
    persistent_workers: bool = setting(True, "keep loader workers alive between epochs "
                                       "(when workers > 0)")
    test_fraction: float = setting(0.2, "digits: fraction held out for the test set "
                                   "(stratified, fixed seed)")
    gaussian_dim: int = setting(32, "gaussian: input dimension")
    gaussian_train_per_class: int = setting(200, "gaussian: training samples per class")
    gaussian_test_per_class: int = setting(50, "gaussian: test samples per class")
    gaussian_separation: float = setting(3.0, "gaussian: class means ~ N(0, separation^2/dim "
                                         "per coordinate), unit noise")


@dataclass
class ModelConfig:
    arch: str = setting("mlp", "mlp, resnet18, resnet34, resnet50, wrn28_10")
    stem: str = setting("cifar", "resnets: cifar (3x3, no max-pool) or imagenet (torchvision's)")
    hidden: list[int] = setting([256, 256, 16], "mlp: hidden layer widths (the last is the "
                                "feature dimension d unless model.feature_dim adds a layer)")
    batch_norm: bool = setting(True, "mlp: BatchNorm after each hidden layer")
    feature_dim: int = setting(0, "d, the width before the classifier; 0: the architecture's own")
    fixed_etf: bool = setting(False, "classifier fixed to a simplex ETF (not trained, not "
                              "decayed)")
    bias: bool = setting(True, "classifier bias")
    sync_batch_norm: bool = setting(True, "under DDP: BatchNorm over the global batch "
                                    "(nn.SyncBatchNorm on CUDA), as one process trains")


@dataclass
class LossConfig:
    name: str = setting("mse", "ce, mse, rescaled_mse")
    k: float = setting(1.0, "rescaled_mse: weight of the true class (Hui & Belkin's k, alpha)")
    M: float = setting(1.0, "rescaled_mse: target scale")
    normalize: str = setting("element", "mse/rescaled_mse: element (the paper's) or sample")


@dataclass
class OptimConfig:
    name: str = setting("sgd", "sgd, adam, adamw, lbfgs")
    lr: float = setting(0.5, "learning rate (the digits default: element-normalised MSE has "
                        "gradients 1/K small)")
    momentum: float = setting(0.9, "sgd: momentum")
    weight_decay: float = setting(5e-3, "coupled L2 on every trainable parameter (adamw: "
                                  "decoupled)")
    betas: list[float] = setting([0.9, 0.999], "adam/adamw: the two moment decays")
    eps: float = setting(1e-8, "adam/adamw: denominator epsilon")
    lbfgs_history: int = setting(10, "lbfgs: history size")
    lbfgs_max_iter: int = setting(20, "lbfgs: iterations per step")
    lr_reference_batch: int = setting(0, "linear scaling: the lr is lr x data.batch_size / this "
                                      "(0: lr as given)")


@dataclass
class ScheduleConfig:
    name: str = setting("step", "step, cosine, none")
    step_epochs: int = setting(100, "step: multiply the lr by gamma every step_epochs epochs")
    gamma: float = setting(0.1, "step: the lr factor")
    min_lr: float = setting(0.0, "cosine: the final lr")
    warmup_epochs: int = setting(0, "linear warm-up over this many epochs, per step (from the "
                                 "unscaled lr when optim.lr_reference_batch is set, which must "
                                 "then be < data.batch_size)")


@dataclass
class TrackConfig:
    every: int = setting(10, "NC tracking every N epochs, always at epoch 0 and at the last")
    test: bool = setting(True, "also measure the test set")
    nc4: bool = setting(True, "measure NC4 (a second sweep, of the model if the features "
                        "exceed 1 GiB)")
    subset_per_class: int = setting(0, "measure the training set on this many samples per "
                                    "class, a fixed subset drawn from seed (0: all of it)")
    extras: list[str] = setting(["unc3"], "extra metrics (theory.md 5.10-5.12): unc3, gnc2, "
                                "cosine_margin, ncc_accuracy, nf_ratio")
    ood: str = setting("none", "out-of-distribution inputs for NC5 (theory.md 5.11), as many "
                       "as the test set (at most 10,000), from a seed of their own: none, noise "
                       "(standard normal inputs in the data's shape), gaussian (a Gaussian "
                       "mixture in the input dimension; flat inputs only)")
    keep_checkpoints: bool = setting(False, "also keep the model at every tracking epoch "
                                     "(checkpoint-epochNNNN.pt) for ncfast measure RUN")


@dataclass
class TrainConfig:
    """The defaults are the digits run of the README (MLP with a 16-wide feature layer, MSE,
    SGD with weight decay 5e-3, 300 epochs, seed 0); the paper's runs are presets (configs/,
    ``ncfast train --list-presets``)."""

    name: str = setting("digits", "run folder: <runs_dir>/<name>")
    about: str = setting("", "one line on what the run is for (shown by --list-presets)")
    runs_dir: str = setting("runs", "folder holding the run folders")
    epochs: int = setting(300, "training epochs")
    seed: int = setting(0, "seeds initialisation, shuffling, augmentation and the digits "
                        "split")
    deterministic: bool = setting(False, "torch's deterministic algorithms (slower on CUDA)")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda")
    precision: str = setting("fp32", "fp32, bf16, fp16 (autocast; CUDA only)")
    channels_last: bool = setting(False, "channels_last memory format (CUDA only)")
    compile: bool = setting(False, "torch.compile the model")
    checkpoint_every: int = setting(1, "write checkpoint.pt every N epochs (and at the end)")
    checkpoint_every_steps: int = setting(0, "also write it every N optimisation steps, for an "
                                          "exact mid-epoch resume (0: epoch ends only)")
    progress: bool = setting(True, "show progress: a tqdm bar on a terminal, else plain lines")
    progress_every: int = setting(50, "without a terminal (SLURM logs): a progress line every "
                                  "N steps (0: one line per epoch only)")
    log: list[str] = setting([], "logs besides metrics.jsonl: tensorboard (tensorboard/), csv "
                             "(metrics.csv); NC metrics included")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


CHOICES = {
    "data.name": ("digits", "gaussian", "mnist", "fashion_mnist", "cifar10", "cifar100",
                  "imagefolder"),
    "data.augment": ("auto", "none", "crop_flip", "imagenet"),
    "data.decode": ("cpu", "cuda"),
    "model.arch": ("mlp", "resnet18", "resnet34", "resnet50", "wrn28_10"),
    "model.stem": ("cifar", "imagenet"),
    "loss.name": ("ce", "mse", "rescaled_mse"),
    "loss.normalize": ("element", "sample"),
    "optim.name": ("sgd", "adam", "adamw", "lbfgs"),
    "schedule.name": ("step", "cosine", "none"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "track.ood": ("none", "noise", "gaussian"),
}
LOG_BACKENDS = ("tensorboard", "csv")
TRAIN_EXTRAS = tuple(e for e in EXTRAS if e != "nc5")  # NC5 comes with track.ood
INT_MAX = 2**31 - 1  # sizes and counts stay within C int (torch, numpy, the kernels)
# (keys, test, rule): every numeric key has one (a test checks), so no value fails later
RULES = [
    (("epochs", "checkpoint_every", "data.batch_size", "data.eval_batch_size", "track.every",
      "schedule.step_epochs", "optim.lbfgs_history", "optim.lbfgs_max_iter",
      "data.gaussian_dim", "data.gaussian_train_per_class", "data.gaussian_test_per_class"),
     lambda v: 1 <= v <= INT_MAX, "in [1, 2^31 - 1]"),
    (("data.workers", "data.image_size", "model.feature_dim", "optim.lr_reference_batch",
      "schedule.warmup_epochs", "track.subset_per_class", "checkpoint_every_steps",
      "progress_every"),
     lambda v: 0 <= v <= INT_MAX, "in [0, 2^31 - 1]"),
    (("data.num_classes",), lambda v: v == 0 or 2 <= v <= INT_MAX,
     "0 (taken from the data) or in [2, 2^31 - 1] (a classifier needs two classes)"),
    (("seed",), lambda v: 0 <= v <= 2**32 - 1, "in [0, 2^32 - 1]"),
    (("optim.lr", "optim.eps", "schedule.gamma", "loss.k"),
     lambda v: 0 < v < math.inf, "finite and > 0"),
    (("optim.weight_decay", "schedule.min_lr", "data.gaussian_separation"),
     lambda v: 0 <= v < math.inf, "finite and >= 0"),
    (("loss.M",), math.isfinite, "finite"),
    (("optim.momentum",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("data.test_fraction",), lambda v: 0 < v < 1, "in (0, 1)"),
    (("model.hidden",), lambda v: all(1 <= w <= INT_MAX for w in v),
     "a list of widths in [1, 2^31 - 1]"),
    (("optim.betas",), lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
     "two numbers in [0, 1)"),
    (("log",), lambda v: all(b in LOG_BACKENDS for b in v),
     f"a list of {', '.join(LOG_BACKENDS)}"),
    (("track.extras",), lambda v: all(e in TRAIN_EXTRAS for e in v),
     f"a list of {', '.join(TRAIN_EXTRAS)} (NC5 is measured when track.ood names OOD "
     f"data)"),
]
NAME_BYTES = 200  # a folder name, with room for the run's hidden lock and staging names


def show_value(value: Any) -> str:
    """A value for a message: its repr, cut short (a YAML alias bomb or a 300-character name
    must not flood the terminal)."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = 80
    short.maxlist = short.maxtuple = short.maxdict = 8
    short.maxlevel = 3
    return short.repr(value)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class KeyInfo:
    """One settable key, as ``ncfast train --list-keys`` shows it."""

    key: str
    type: str
    default: Any
    help: str


def key_infos(cls=TrainConfig, prefix: str = "") -> list[KeyInfo]:
    """Every settable dotted key with its type, default and one-line help."""
    infos = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for name, f in _fields(cls).items():
        if dataclasses.is_dataclass(hints[name]):
            infos += key_infos(hints[name], f"{prefix}{name}.")
        else:
            kind = getattr(hints[name], "__name__", None)
            if typing.get_origin(hints[name]) is list:
                kind = f"list[{typing.get_args(hints[name])[0].__name__}]"
            infos.append(KeyInfo(prefix + name, kind, getattr(defaults, name),
                                 f.metadata.get("help", "")))
    return infos


def _hints(cls=TrainConfig, prefix: str = "") -> dict[str, Any]:
    hints = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            hints.update(_hints(hint, f"{prefix}{name}."))
        else:
            hints[prefix + name] = hint
    return hints


_HINTS = _hints()


def all_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key."""
    return [info.key for info in key_infos(cls, prefix)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # a bare leaf name ("lr") matches its dotted key by the part after the dot
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


class _CommandLine(str):
    """An override's text: taken as is for a str key, read as YAML for any other."""


def _coerce(key: str, value: Any, hint) -> Any:
    """A YAML or command-line value as the field's type."""
    if isinstance(value, _CommandLine):
        value = str(value) if hint is str else _yaml_scalar(value)
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            (item,) = typing.get_args(hint)
            if isinstance(value, str):
                import yaml

                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_coerce(key, v, item) for v in value]
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        raise AssertionError(f"unhandled config type {hint} for {key}")
    raise ConfigError(f"config key {key!r} must be {_type_name(hint)}, got {show_value(value)}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"list[{typing.get_args(hint)[0].__name__}]"
    return hint.__name__


def _has_type(value: Any, hint) -> bool:
    """Whether ``value`` is already of the config type ``hint`` (an int is a float)."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _set(cfg, key: str, value: Any) -> None:
    parts = key.split(".")
    node, cls = cfg, type(cfg)
    for i, part in enumerate(parts):
        fields = _fields(cls)
        if part not in fields:
            raise _unknown(key)
        hint = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"config key {key!r} is a section; set one of its keys "
                                  f"({', '.join(all_keys(hint, key + '.'))})")
            setattr(node, part, _coerce(key, value, hint))
        else:
            if not dataclasses.is_dataclass(hint):
                raise _unknown(key)
            node, cls = getattr(node, part), hint


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict (YAML, or a config as a dict) as {dotted key: value}. Sections hold
    values, never further sections, so a YAML alias that refers to itself (or a bomb of
    aliases) stops at the second level."""
    flat = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {show_value(key)}")
        if isinstance(value, dict):
            if prefix:
                raise ConfigError(f"config key {prefix + key!r} must be a value, not a mapping "
                                  f"(sections hold keys, not sections)")
            flat.update(flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _check_name(name: str) -> None:
    rule = None
    if not name or name in (".", "..") or name.startswith("."):
        rule = "a folder name, not empty and not starting with '.'"
    elif any(c in name for c in "/\\") or not name.isprintable():
        rule = "a folder name, without '/', '\\' or control characters"
    else:
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            rule = "a folder name in UTF-8"
        else:
            if size > NAME_BYTES:
                rule = f"a folder name of at most {NAME_BYTES} bytes ({size} given)"
    if rule:
        raise ConfigError(f"config key 'name' must be {rule}, got {show_value(name)}")


def validate(cfg: TrainConfig) -> None:
    """Types, choices, ranges and combinations of every key, so that no value fails later (or
    inside torch); raises ConfigError naming the key, the rule and the value."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    for name, hint in typing.get_type_hints(TrainConfig).items():
        section = getattr(cfg, name)
        if dataclasses.is_dataclass(hint) and not isinstance(section, hint):
            raise ConfigError(f"config key {name!r} must be a section ({hint.__name__}), got "
                              f"{show_value(section)}")
    flat = flatten(to_dict(cfg))
    for key, hint in _HINTS.items():
        value = flat[key]
        if not _has_type(value, hint):
            raise ConfigError(f"config key {key!r} must be {_type_name(hint)}, got "
                              f"{show_value(value)}")
        if isinstance(value, str) and "\0" in value:
            raise ConfigError(f"config key {key!r} must not hold a NUL character, got "
                              f"{show_value(value)}")
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, "
                              f"got {show_value(flat[key])}")
    for keys, test, rule in RULES:
        for key in keys:
            if not test(flat[key]):
                raise ConfigError(f"config key {key!r} must be {rule}, got {show_value(flat[key])}")
    _check_name(cfg.name)
    if not cfg.runs_dir:
        raise ConfigError("config key 'runs_dir' must be a folder, got ''")
    if cfg.loss.name == "ce" and (cfg.loss.k != 1.0 or cfg.loss.M != 1.0):
        raise ConfigError("config keys 'loss.k' and 'loss.M' apply to mse/rescaled_mse, "
                          "not to loss.name='ce'")
    if cfg.loss.name == "mse" and (cfg.loss.k != 1.0 or cfg.loss.M != 1.0):
        raise ConfigError("loss.name='mse' is k = M = 1; use loss.name='rescaled_mse' to set "
                          f"loss.k={cfg.loss.k:g} and loss.M={cfg.loss.M:g}")
    if cfg.schedule.name == "cosine" and cfg.schedule.min_lr > peak_lr(cfg):
        start = (f"optim.lr x data.batch_size / optim.lr_reference_batch ({peak_lr(cfg):g})"
                 if cfg.optim.lr_reference_batch else f"optim.lr ({cfg.optim.lr:g})")
        raise ConfigError(f"config key 'schedule.min_lr' must be <= {start} with "
                          f"schedule.name='cosine' (the lr would rise), got "
                          f"{cfg.schedule.min_lr!r}")
    ref = cfg.optim.lr_reference_batch
    if ref >= cfg.data.batch_size and cfg.schedule.warmup_epochs:
        # The warm-up ramps from the unscaled lr up to the scaled one (warmup_factor): with no
        # scaling up there is nothing to ramp, and a silent no-op is worse than a refusal.
        raise ConfigError(
            f"config key 'schedule.warmup_epochs' must be 0 when optim.lr_reference_batch "
            f"({ref}) >= data.batch_size ({cfg.data.batch_size}): the warm-up ramps from the "
            f"unscaled lr up to the scaled one, which is not larger (optim.lr_reference_batch=0 "
            f"warms up from 0), got {cfg.schedule.warmup_epochs}")
    if cfg.data.decode == "cuda" and cfg.data.name != "imagefolder":
        raise ConfigError(f"config key 'data.decode' may be 'cuda' for data.name='imagefolder' "
                          f"(JPEG files) only, got data.name={cfg.data.name!r}")


def peak_lr(cfg: TrainConfig) -> float:
    """optim.lr, scaled linearly with the batch when optim.lr_reference_batch is set (Goyal et
    al. 2017: lr x batch / reference)."""
    ref = cfg.optim.lr_reference_batch
    return cfg.optim.lr * cfg.data.batch_size / ref if ref else cfg.optim.lr


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated config from a nested dict (YAML) plus dotted-key overrides."""
    cfg = TrainConfig()
    for key, value in flatten(tree or {}).items():
        _set(cfg, key, value)
    for key, value in (overrides or {}).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def preset_dirs() -> list[Path]:
    """Where presets live: installed with the package, or the source tree's configs/."""
    here = Path(__file__).resolve().parent
    return [d for d in (here.parent / "configs", here.parents[1] / "configs") if d.is_dir()]


def list_presets() -> dict[str, Path]:
    presets = {}
    for d in preset_dirs():
        for path in sorted(d.glob("*.yaml")):
            presets.setdefault(path.stem, path)
    return presets


def load(path: str | None = None, overrides: list[str] | dict[str, Any] | None = None
         ) -> TrainConfig:
    """Load ``path`` (a YAML file, or a preset's name) and apply ``overrides`` (``key=value``
    strings, or a dict of dotted keys)."""
    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file_exists(file):
            presets = list_presets()
            if path in presets:
                file = presets[path]
            else:
                close = difflib.get_close_matches(path, list(presets), n=1)
                hint = f"; did you mean preset {close[0]!r}?" if close else ""
                raise ConfigError(f"config file {show_value(path)} does not exist and is not a "
                                  f"preset name{hint} (ncfast train --list-presets)")
        tree = read_yaml(file)
    if isinstance(overrides, dict):
        parsed = dict(overrides)
    else:
        parsed = {}
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} must be key=value (e.g. optim.lr=0.1)")
            parsed[key.strip()] = _CommandLine(value)
    return from_dict(tree, parsed)


def read_yaml(file: Path) -> dict:
    """The mapping a config file holds (a run's config.yaml or a user's), or a ConfigError
    saying why the file cannot be one."""
    import yaml

    where = show_value(str(file))
    try:
        tree = yaml.safe_load(file.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {where} is not UTF-8 text (byte {err.start}: "
                          f"{err.reason})") from None
    except OSError as err:
        raise ConfigError(f"config file {where} cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:  # on one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"config file {where} is not valid YAML ({at}{problem})") from None
    except RecursionError:
        raise ConfigError(f"config file {where} is nested too deeply to be a config") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {where} must hold a mapping, got {type(tree).__name__}")
    return tree


def file_exists(path: Path) -> bool:
    """Path.is_file, with a name the OS refuses (too long, NUL) as no file."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _yaml_scalar(text: str) -> Any:
    """'0.1' -> 0.1, 'true' -> True, '[1, 2]' -> [1, 2], anything else stays a string."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        return text


def dump(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

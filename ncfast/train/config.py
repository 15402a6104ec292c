"""The training configuration: typed dataclasses, loaded from YAML, overridden by ``key=value``
arguments (dotted keys, e.g. ``optim.lr=0.1``), saved with every run."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key, the rule and the value."""


@dataclass
class DataConfig:
    # digits (scikit-learn's bundled 8x8 digits), gaussian (synthetic mixture), mnist,
    # fashion_mnist, cifar10, cifar100 (torchvision, from dir), imagefolder (dir/train, dir/val)
    name: str = "digits"
    dir: str = "data"
    download: bool = False  # torchvision data sets only; never without this flag
    num_classes: int = 0  # 0: taken from the data, else must agree (gaussian: K, default 10)
    batch_size: int = 64  # global: split evenly across processes under torchrun
    eval_batch_size: int = 1024
    augment: str = "auto"  # auto (the data set's standard), none, crop_flip, imagenet
    image_size: int = 0  # imagefolder: crop size (0: 224, mini-ImageNet presets use 84)
    workers: int = 0
    pin_memory: bool = True  # on CUDA only
    persistent_workers: bool = True  # when workers > 0
    # digits: fraction held out for the test set (stratified, fixed seed)
    test_fraction: float = 0.2
    # gaussian mixture
    gaussian_dim: int = 32
    gaussian_train_per_class: int = 200
    gaussian_test_per_class: int = 50
    gaussian_separation: float = 3.0


@dataclass
class ModelConfig:
    # mlp, resnet18, resnet34, resnet50, wrn28_10
    arch: str = "mlp"
    stem: str = "cifar"  # resnets: cifar (3x3, no max-pool) or imagenet (torchvision's)
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp widths
    batch_norm: bool = True  # mlp
    feature_dim: int = 0  # d before the classifier; 0: the architecture's own width
    fixed_etf: bool = False  # classifier fixed to a simplex ETF (not trained, not decayed)
    bias: bool = True  # classifier bias


@dataclass
class LossConfig:
    name: str = "mse"  # ce, mse, rescaled_mse
    k: float = 1.0  # rescaled_mse: weight of the true class (Hui & Belkin's k, alpha)
    M: float = 1.0  # rescaled_mse: target scale
    normalize: str = "element"  # mse/rescaled_mse: element (the paper's) or sample


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd, adam, adamw, lbfgs
    lr: float = 0.5  # the digits default (element-normalised MSE has gradients 1/K small)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # coupled L2 on every trainable parameter (adamw: decoupled)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lbfgs_history: int = 10
    lbfgs_max_iter: int = 20


@dataclass
class ScheduleConfig:
    name: str = "step"  # step, cosine, none
    step_epochs: int = 60  # step: multiply the lr by gamma every step_epochs epochs
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine


@dataclass
class TrackConfig:
    every: int = 10  # NC tracking every N epochs, always at epoch 0 and at the last epoch
    test: bool = True  # also measure the test set
    nc4: bool = True  # NC4 needs a second sweep (of the model, if the features exceed 1 GiB)


@dataclass
class TrainConfig:
    """The defaults are the digits run of the README (MLP, MSE, SGD, 150 epochs); the paper's
    runs are presets (configs/, ``ncfast train --list-presets``)."""

    name: str = "digits"  # run folder: <runs_dir>/<name>
    about: str = ""  # one line on what the run is for (shown by --list-presets)
    runs_dir: str = "runs"
    epochs: int = 150
    seed: int = 6
    deterministic: bool = False
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    precision: str = "fp32"  # fp32, bf16, fp16 (autocast; CUDA only)
    channels_last: bool = False
    compile: bool = False
    checkpoint_every: int = 1  # epochs
    progress: bool = True
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
    "model.arch": ("mlp", "resnet18", "resnet34", "resnet50", "wrn28_10"),
    "model.stem": ("cifar", "imagenet"),
    "loss.name": ("ce", "mse", "rescaled_mse"),
    "loss.normalize": ("element", "sample"),
    "optim.name": ("sgd", "adam", "adamw", "lbfgs"),
    "schedule.name": ("step", "cosine", "none"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
}
POSITIVE = ("epochs", "checkpoint_every", "data.batch_size", "data.eval_batch_size",
            "track.every", "schedule.step_epochs", "optim.lbfgs_history",
            "optim.lbfgs_max_iter", "data.gaussian_dim", "data.gaussian_train_per_class",
            "data.gaussian_test_per_class")
NON_NEGATIVE = ("data.num_classes", "data.workers", "data.image_size", "model.feature_dim",
                "optim.weight_decay", "optim.momentum", "schedule.min_lr")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def all_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key."""
    keys = []
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys += all_keys(hints[name], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


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
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled config type {hint} for {key}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key {key!r} must be {name}, got {value!r}")


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
    """A nested dict (YAML, or a config as a dict) as {dotted key: value}."""
    flat = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}")
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def validate(cfg: TrainConfig) -> None:
    """Choices, ranges and combinations; raises ConfigError naming the key."""
    flat = flatten(to_dict(cfg))
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, "
                              f"got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] >= 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if not flat[key] >= 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {flat[key]!r}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr!r}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"config key 'data.test_fraction' must be in (0, 1), got "
                          f"{cfg.data.test_fraction!r}")
    if not cfg.loss.k > 0:
        raise ConfigError(f"config key 'loss.k' must be > 0, got {cfg.loss.k!r}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must have two entries, got "
                          f"{cfg.optim.betas!r}")
    if cfg.loss.name == "ce" and (cfg.loss.k != 1.0 or cfg.loss.M != 1.0):
        raise ConfigError("config keys 'loss.k' and 'loss.M' apply to mse/rescaled_mse, "
                          "not to loss.name='ce'")
    if cfg.loss.name == "mse" and (cfg.loss.k != 1.0 or cfg.loss.M != 1.0):
        raise ConfigError("loss.name='mse' is k = M = 1; use loss.name='rescaled_mse' to set "
                          f"loss.k={cfg.loss.k:g} and loss.M={cfg.loss.M:g}")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"config key 'name' must be a folder name, got {cfg.name!r}")


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
    import yaml

    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            presets = list_presets()
            if path in presets:
                file = presets[path]
            else:
                close = difflib.get_close_matches(path, list(presets), n=1)
                hint = f"; did you mean preset {close[0]!r}?" if close else ""
                raise ConfigError(f"config file {path!r} does not exist and is not a preset "
                                  f"name{hint} (ncfast train --list-presets)")
        try:
            tree = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(file)!r} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(file)!r} must hold a mapping, got "
                              f"{type(tree).__name__}")
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


def _yaml_scalar(text: str) -> Any:
    """'0.1' -> 0.1, 'true' -> True, '[1, 2]' -> [1, 2], anything else stays a string."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def dump(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

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
    batch_size: int = setting(64, "training batch, global: split evenly across processes")
    eval_batch_size: int = setting(1024, "batch of the NC measurement sweeps")
    augment: str = setting("auto", "auto (the data set's standard), none, crop_flip, imagenet")
    image_size: int = setting(0, "imagefolder: crop size (0: 224; mini-ImageNet presets use 84)")
    workers: int = setting(0, "DataLoader worker processes")
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
    hidden: list[int] = setting([256, 256], "mlp: hidden layer widths")
    batch_norm: bool = setting(True, "mlp: BatchNorm after each hidden layer")
    feature_dim: int = setting(0, "d, the width before the classifier; 0: the architecture's own")
    fixed_etf: bool = setting(False, "classifier fixed to a simplex ETF (not trained, not "
                              "decayed)")
    bias: bool = setting(True, "classifier bias")


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
    weight_decay: float = setting(5e-4, "coupled L2 on every trainable parameter (adamw: "
                                  "decoupled)")
    betas: list[float] = setting([0.9, 0.999], "adam/adamw: the two moment decays")
    eps: float = setting(1e-8, "adam/adamw: denominator epsilon")
    lbfgs_history: int = setting(10, "lbfgs: history size")
    lbfgs_max_iter: int = setting(20, "lbfgs: iterations per step")


@dataclass
class ScheduleConfig:
    name: str = setting("step", "step, cosine, none")
    step_epochs: int = setting(60, "step: multiply the lr by gamma every step_epochs epochs")
    gamma: float = setting(0.1, "step: the lr factor")
    min_lr: float = setting(0.0, "cosine: the final lr")


@dataclass
class TrackConfig:
    every: int = setting(10, "NC tracking every N epochs, always at epoch 0 and at the last")
    test: bool = setting(True, "also measure the test set")
    nc4: bool = setting(True, "measure NC4 (a second sweep, of the model if the features "
                        "exceed 1 GiB)")


@dataclass
class TrainConfig:
    """The defaults are the digits run of the README (MLP, MSE, SGD, 150 epochs); the paper's
    runs are presets (configs/, ``ncfast train --list-presets``)."""

    name: str = setting("digits", "run folder: <runs_dir>/<name>")
    about: str = setting("", "one line on what the run is for (shown by --list-presets)")
    runs_dir: str = setting("runs", "folder holding the run folders")
    epochs: int = setting(150, "training epochs")
    seed: int = setting(6, "seeds initialisation, shuffling and augmentation")
    deterministic: bool = setting(False, "torch's deterministic algorithms (slower on CUDA)")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda")
    precision: str = setting("fp32", "fp32, bf16, fp16 (autocast; CUDA only)")
    channels_last: bool = setting(False, "channels_last memory format (CUDA only)")
    compile: bool = setting(False, "torch.compile the model")
    checkpoint_every: int = setting(1, "write checkpoint.pt every N epochs (and at the end)")
    progress: bool = setting(True, "show a progress bar")
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

"""`ncfast train`: a thin training loop for neural-collapse runs (config, data, models, loop,
checkpoints, reports). ``ncfast.train.run(ncfast.train.load("digits"))`` is the default run."""

from .config import ConfigError, TrainConfig, list_presets, load
from .loop import RunResult, run

__all__ = ["ConfigError", "RunResult", "TrainConfig", "list_presets", "load", "run"]

"""Experiments over many runs: sweeps (`ncfast sweep`), overlays with a band over seeds
(`ncfast plot`), the paper's figures by name (`ncfast figure`), NC measured post hoc over kept
checkpoints (`ncfast measure`), the mini-ImageNet converter (`ncfast miniimagenet`) and the check
of the digits default (`python -m ncfast.experiments.default_run`). Importing this package
loads none of matplotlib, torchvision or scikit-learn."""

from .runs import Group, Run, group_runs, is_finished, load_run

__all__ = ["Group", "Run", "group_runs", "is_finished", "load_run"]

"""ncfast inside the tools people already use. Each adapter imports its library only when it
is used, so ``import ncfast`` needs none of them:

- :class:`NeuralCollapseMetric`: a streaming NC metric (a ``torchmetrics.Metric`` where
  torchmetrics is installed), exact under torch.distributed;
- :class:`NeuralCollapseCallback`: a Lightning callback measuring NC at chosen epochs;
- :func:`as_linear_operator`: any ncfast HVP as a ``scipy.sparse.linalg.LinearOperator``;
- :func:`to_curvlinops` / :func:`from_curvlinops`: ncfast HVPs as curvlinops operators and back.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NeuralCollapseMetric": "metric",
    "NeuralCollapseCallback": "lightning",
    "as_linear_operator": "scipy",
    "to_curvlinops": "curvlinops",
    "from_curvlinops": "curvlinops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

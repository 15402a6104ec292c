"""ncfast: fast tooling for neural-collapse research (fused rescaled-MSE loss, ...).

Importing ncfast never needs a GPU. The kernels live in the extension ncfast._C and are
reached through torch.ops.ncfast.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _load_extension():
    import torch

    try:
        from . import _C
    except ImportError as err:
        try:
            from ._build_config import TORCH_VERSION as built_for
        except ImportError:
            built_for = "unknown (ncfast is not built: pip install --no-build-isolation -e .)"
        raise ImportError(
            f"ncfast._C failed to load: it was built for torch {built_for}, and the torch "
            f"found is {torch.__version__} ({torch.__file__}). Rebuild ncfast against this "
            f"torch with `pip install --no-build-isolation -e .` (or `make build`). "
            f"Loader error: {err}"
        ) from err
    return _C


_C = _load_extension()

from . import _ops  # noqa: E402  (registers fakes and vmap rules)
from .losses import (  # noqa: E402
    RescaledMSELoss, check_errors, cuda_target_checks, rescaled_mse_loss, set_cuda_target_checks)
from .linear_loss import LinearRescaledMSELoss, linear_rescaled_mse_loss  # noqa: E402
from .stats import ClassStats  # noqa: E402
from .measurement import Measurement, measure  # noqa: E402
from . import hessian, metrics, ufm  # noqa: E402


def build_info() -> dict:
    """How the extension was built: torch version, CUDA kernels, arch list, compilers."""
    return dict(_C.build_info())


__all__ = [
    "ClassStats",
    "Measurement",
    "hessian",
    "measure",
    "metrics",
    "ufm",
    "LinearRescaledMSELoss",
    "RescaledMSELoss",
    "build_info",
    "check_errors",
    "cuda_target_checks",
    "linear_rescaled_mse_loss",
    "rescaled_mse_loss",
    "set_cuda_target_checks",
    "__version__",
]

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
    # An extension built from older sources (an editable install not rebuilt after a pull)
    # lacks ops the Python layer registers: say so, rather than fail inside torch.library.
    missing = [op for op in _REQUIRED_OPS if not hasattr(torch.ops.ncfast, op)]
    if missing:
        raise _stale_extension_error(missing)
    return _C


def _stale_extension_error(missing: list[str]) -> ImportError:
    return ImportError(
        f"ncfast._C is older than ncfast's Python code: it lacks the ops "
        f"{', '.join(missing)}. Rebuild it with `pip install --no-build-isolation -e .` "
        f"(or `make build`)."
    )


# The newest ops (csrc/registration.cpp); each one an older build lacks. check_guard_budget,
# newer still, is checked where it is used (the linear loss's guard budget), so that a build
# without it still serves everything else.
_REQUIRED_OPS = ("rescaled_mse_reduced", "rescaled_mse_reduced_backward", "check_labels")


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

"""ncfast's Hessian-vector products inside curvlinops (its trace, diagonal and spectral
estimators take ncfast operators) and curvlinops' operators inside ncfast.hessian (Lanczos,
Hutch++, SLQ). curvlinops is imported when one of these is called."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .scipy import resolve

__all__ = ["from_curvlinops", "to_curvlinops"]


def to_curvlinops(hvp, n: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None):
    """``hvp`` (as for :func:`ncfast.integrations.as_linear_operator`) as a self-adjoint
    ``curvlinops`` ``PyTorchLinearOperator`` acting on flat (n,) vectors, so that
    ``curvlinops.hutchinson_trace``, ``hutchpp_trace``, ``xtrace``, ``hutchinson_diag``,
    ``lanczos_approximate_spectrum`` and operator algebra (``A + B``, ``2 * A``, ``A @ B``)
    work on it. A matrix (n, k) is applied one column at a time; ``.to_scipy()`` gives a SciPy
    operator."""
    from curvlinops._torch_base import PyTorchLinearOperator

    flat, n, dtype_, device_ = resolve("ncfast.integrations.to_curvlinops", hvp, n, dtype,
                                       device)

    class NcfastLinearOperator(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self) -> None:
            super().__init__([(n,)], [(n,)])

        def _matmat(self, X: list[Tensor]) -> list[Tensor]:
            (M,) = X  # (n, k): one product per column
            cols = [flat(M[:, j].to(device=device_, dtype=dtype_)) for j in range(M.shape[1])]
            return [torch.stack(cols, 1) if cols else M.new_zeros(n, 0)]

        @property
        def dtype(self) -> torch.dtype:
            return dtype_

        @property
        def device(self) -> torch.device:
            return device_

    return NcfastLinearOperator()


def from_curvlinops(operator) -> Callable[[Tensor], Tensor]:
    """A curvlinops operator (``HessianLinearOperator``, ``GGNLinearOperator``, ...) as an
    ncfast HVP: a callable on flat (n,) vectors with ``n``, ``dtype`` and ``device``, for
    :func:`ncfast.hessian.lanczos`, :func:`ncfast.hessian.hutchpp` and
    :func:`ncfast.hessian.slq_density`. The flat layout is curvlinops' (its parameters in
    order, each flattened)."""
    from ..hessian import _FlatHVP

    rows, cols = operator.shape
    if rows != cols:
        raise ValueError(f"ncfast.integrations.from_curvlinops: operator must be square, got "
                         f"{rows} x {cols}")
    return _FlatHVP(lambda v: operator @ v, cols, operator.dtype, operator.device)

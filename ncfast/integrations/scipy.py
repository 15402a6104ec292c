"""Any ncfast Hessian-vector product as a ``scipy.sparse.linalg.LinearOperator``, so SciPy's
``eigsh``, ``lobpcg``, ``cg`` and friends run on it. SciPy is imported when this is called."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["as_linear_operator"]

_OP = "ncfast.integrations.as_linear_operator"


def resolve(op: str, hvp: object, n: int | None, dtype: torch.dtype | None,
            device: torch.device | str | None) -> tuple[Callable[[Tensor], Tensor], int,
                                                         torch.dtype, torch.device]:
    """The flat product, its size, dtype and device, from an ncfast operator and the
    arguments (shared with the curvlinops adapter)."""
    flat = getattr(hvp, "flat", hvp)  # UFM.hvp_operator's product: its flat-vector form
    if not callable(flat):
        raise TypeError(f"{op}: hvp must be callable, got {type(hvp).__name__}")
    n = getattr(flat, "n", None) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{op}: n must be an int >= 1 (give it when the operator does not "
                         f"carry it), got {n!r}")
    dtype = dtype or getattr(flat, "dtype", None) or torch.get_default_dtype()
    device = torch.device(device or getattr(flat, "device", None) or "cpu")
    return flat, n, dtype, device


def as_linear_operator(hvp, n: int | None = None, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None):
    """``hvp`` as a symmetric n x n ``scipy.sparse.linalg.LinearOperator``.

    ``hvp`` is any ncfast product on flat vectors: a :class:`ncfast.hessian.NetworkOperator`
    (from :func:`ncfast.hessian.network_operator` or :func:`ncfast.hessian.network_hvp`), the
    product returned by :meth:`ncfast.ufm.UFM.hvp_operator` (its ``.flat`` form is used), or
    any callable ``v -> A v`` on (n,) tensors. ``n``, ``dtype`` and ``device`` default to the
    operator's own attributes (the UFM's and the network's carry them), else n must be given
    and the dtype is torch's default on the CPU.

    Each product converts the NumPy vector to a tensor of that dtype on that device (one
    host-to-device copy on a GPU) and back; the operator reports the same NumPy dtype (float32
    for a bfloat16 operator: NumPy has no bfloat16, the products stay in bfloat16). The
    adjoint is the operator itself (a Hessian is symmetric), and ``matmat`` applies the
    product one column at a time. Example::

        from scipy.sparse.linalg import eigsh
        op = ncfast.hessian.network_operator(model, loss_fn, loader)
        top = eigsh(ncfast.hessian.as_linear_operator(op), k=5, which="LA",
                    return_eigenvectors=False)
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    flat, n, dtype, device = resolve(_OP, hvp, n, dtype, device)
    host = torch.float32 if dtype == torch.bfloat16 else dtype  # NumPy has no bfloat16
    np_dtype = torch.empty((), dtype=host).numpy().dtype

    def matvec(x):
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device)
        return flat(v).detach().to("cpu", host).numpy().astype(np_dtype, copy=False)

    def matmat(X):
        X = np.asarray(X)
        return np.stack([matvec(X[:, j]) for j in range(X.shape[1])], axis=1) \
            if X.shape[1] else np.zeros((n, 0), dtype=np_dtype)

    return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, matmat=matmat,
                          rmatmat=matmat, dtype=np_dtype)

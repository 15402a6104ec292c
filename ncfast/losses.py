"""The fused rescaled-MSE loss (theory.md 2.1-2.4): functional form and nn.Module."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterator

import torch
from torch import Tensor, nn

from . import _C
from ._ops import _is_compiling, _plain_eager, check_rescaled_mse_args, loss_dtype, \
    rescaled_mse_per_sample

_OP = "ncfast.rescaled_mse_loss"
_reduced = torch.ops.ncfast.rescaled_mse_reduced.default
NORMALIZE = ("sample", "element")
REDUCTIONS = ("mean", "sum", "none")


def set_cuda_target_checks(enabled: bool) -> bool:
    """Turn the recording of bad CUDA labels on or off; returns the previous setting.

    On CUDA the loss kernels check the labels on the device, with no host synchronisation (see
    :func:`check_errors`). With the check off, a label outside [0, K) that is not ignore_index
    raises nothing: its row still counts nowhere (zero loss, zero gradient, not in the mean's
    denominator). CPU labels are always checked, and raise at once.
    """
    return bool(_C.set_cuda_target_checks(bool(enabled)))


@contextlib.contextmanager
def cuda_target_checks(enabled: bool) -> Iterator[None]:
    """``set_cuda_target_checks(enabled)`` inside the block, the previous setting after it."""
    previous = set_cuda_target_checks(enabled)
    try:
        yield
    finally:
        set_cuda_target_checks(previous)


def check_errors() -> None:
    """Wait for the work queued on every CUDA device where an ncfast loss kernel checked labels,
    then raise (``ValueError``) the first label error recorded there and not raised yet.

    A CUDA loss call never waits for its labels to be checked: a kernel that meets a label
    outside [0, K) that is not ``ignore_index`` gives that row zero loss and zero gradient (and
    leaves it out of the mean's denominator) and records the label on the device. The error
    is raised, naming the value, by the first ncfast loss call (forward or backward, plain or
    linear loss) that starts after that kernel has finished on the device, or by this
    function, which waits for it. CPU labels raise at once, in the call that got them.

    The other devices are not touched: synchronising one creates a CUDA context there (hundreds
    of MiB), on every GPU of the machine in each process of a torchrun job.
    """
    if torch.cuda.is_initialized():
        for device in _C.label_error_devices():
            torch.cuda.synchronize(device)
    _C.raise_pending_label_errors()


def _as_float(value: numbers.Real) -> float:
    # An int too large for a float is out of range (the check below says so), not a crash.
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_loss_options(k: float, M: float, normalize: str, reduction: str, op: str = _OP,
                       ignore_index: int = -100) -> tuple[float, float, int]:
    """The option rules every rescaled-MSE entry point shares; ``op`` names it in messages.

    Returns ``(k, M, ignore_index)`` as Python float, float, int: any real number (a numpy
    scalar too, not a bool) is a valid k or M, any integer a valid ignore_index."""
    if normalize not in NORMALIZE:
        raise ValueError(f"{op}: normalize must be 'sample' or 'element', got {normalize!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, value in (("k", k), ("M", M)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} "
                            f"{value!r}")
    k, M = _as_float(k), _as_float(M)
    # The same rules as the op's own checks, here so the module fails at construction.
    if not (0 < k < float("inf")):
        raise ValueError(f"{op}: k must be finite and > 0, got {k:g}")
    if not abs(M) < float("inf"):
        raise ValueError(f"{op}: M must be finite, got {M:g}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__} "
                        f"{ignore_index!r}")
    ignore_index = int(ignore_index)
    if not -(1 << 63) <= ignore_index < (1 << 63):
        raise ValueError(f"{op}: ignore_index must fit in int64, got {ignore_index}")
    return k, M, ignore_index


def _check_weight(name: str, w: Tensor, length: int, what: str, logits: Tensor) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{_OP}: {name} must be a tensor, got {type(w).__name__}")
    if w.dim() != 1 or w.shape[0] != length:
        raise ValueError(
            f"{_OP}: {name} must be 1-D of length {length} ({what}), got shape {list(w.shape)}"
        )
    if not w.dtype.is_floating_point:
        raise TypeError(f"{_OP}: {name} must have a floating dtype, got {w.dtype}")
    if w.device != logits.device:
        raise ValueError(
            f"{_OP}: {name} must be on the same device as logits ({logits.device}), "
            f"got {w.device}"
        )


def rescaled_mse_loss(
    logits: Tensor,
    target: Tensor,
    k: float = 1.0,
    M: float = 1.0,
    normalize: str = "sample",
    reduction: str = "mean",
    weight: Tensor | None = None,
    sample_weight: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Rescaled square loss of Hui & Belkin, fused (one read of the logits forward, one
    elementwise pass backward).

    For a row z of ``logits`` with label y, with w_j = k if j = y else 1::

        loss(z, y) = sum_j w_j (z_j - M [j = y])^2 / s,   s = 1 ("sample") or K ("element")

    ``normalize="element"`` with k = M = 1 equals ``nn.MSELoss()`` against one-hot targets, and
    for any (k, M) the original authors' rescaled square loss.

    Args:
        logits: (B, K) float32, float64, bfloat16 or float16; any strides (copied if not
            contiguous). bf16/fp16 are accumulated in float32.
        target: (B,) int64 or int32 labels in [0, K), or ``ignore_index``.
        k: weight of the true class (> 0). M: target value of the true class (finite).
        normalize: ``"sample"`` (sum over classes) or ``"element"`` (also divide by K).
        reduction: ``"mean"``: sum_i c_i loss_i / sum_i c_i over non-ignored rows, where
            c_i = weight[y_i] * sample_weight[i] (1 when not given); ``"sum"``: sum_i c_i loss_i;
            ``"none"``: c_i loss_i per row (0 on ignored rows).
        weight: optional (K,) per-class weights. sample_weight: optional (B,) per-sample
            weights. Both are differentiable.
        ignore_index: label whose rows contribute nothing (also not to the mean's denominator).

    Returns the loss in the dtype of ``logits`` (shape () or (B,)). An empty batch, or one whose
    rows are all ignored, gives NaN for ``"mean"`` and 0 for ``"sum"``, as torch's losses do;
    NaN/Inf logits propagate to the loss and gradient of their own row only (ignored rows
    stay 0). Labels, k and M get no gradient. The backward is differentiable to any order and
    works under ``torch.func`` (grad, jvp, vmap, hessian) and ``torch.compile``.

    Errors (ValueError / TypeError) name the argument, the rule and the value, and are the same
    on every device. CPU labels are checked at once; CUDA labels on the device, with no host
    synchronisation: a bad label's row counts nowhere and the error is raised by a later call
    (see :func:`ncfast.check_errors`).

    Cost: without weights and with reduction "mean" or "sum", one fused op each way (the forward
    kernel returns the reduced loss, summed in float64 in a fixed order: deterministic; the
    backward writes the gradient in one pass), with autograd in C++.
    """
    k, M, ignore_index = check_loss_options(k, M, normalize, reduction, ignore_index=ignore_index)
    # The op checks the same again; checking here first keeps argument errors in Python, where
    # they are raised the same way whatever C++ toolchain built the extension.
    check_rescaled_mse_args(logits, target, k, M)
    B, K = logits.shape
    if weight is None and sample_weight is None and reduction != "none" and (
            _is_compiling() or _plain_eager()):
        scale = 1.0 / K if normalize == "element" else 1.0
        return _reduced(logits, target, k, M, ignore_index, scale,
                        reduction == "mean")[0]
    if weight is not None:
        _check_weight("weight", weight, K, "one per class", logits)
    if sample_weight is not None:
        _check_weight("sample_weight", sample_weight, B, "one per row of logits", logits)

    per_sample = rescaled_mse_per_sample(logits, target, k, M, ignore_index)
    if normalize == "element":
        per_sample = per_sample / K
    acc = loss_dtype(logits.dtype)
    # Rows that count: not ignored, label a class (an unchecked CUDA label outside [0, K) counts
    # nowhere). The weights of other rows are never read, so a NaN there changes nothing.
    counts = (target != ignore_index) & (target >= 0) & (target < K)
    coeff = None  # c_i, the product of the given weights
    if weight is not None:
        coeff = weight.to(acc).gather(0, torch.where(counts, target, 0).long())
    if sample_weight is not None:
        sw = sample_weight.to(acc)
        coeff = sw if coeff is None else coeff * sw
    if coeff is not None:
        coeff = torch.where(counts, coeff, 0)  # not coeff * mask: NaN * 0 is NaN
        per_sample = per_sample * coeff

    if reduction == "none":
        return per_sample.to(logits.dtype)
    total = per_sample.sum()
    if reduction == "mean":
        total = total / (coeff.sum() if coeff is not None else counts.sum())
    return total.to(logits.dtype)


class RescaledMSELoss(nn.Module):
    """Module form of :func:`rescaled_mse_loss`; ``weight`` is kept as a buffer.

    ``forward(logits, target, sample_weight=None)``.
    """

    def __init__(
        self,
        k: float = 1.0,
        M: float = 1.0,
        normalize: str = "sample",
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.k, self.M, self.ignore_index = check_loss_options(
            k, M, normalize, reduction, ignore_index=ignore_index)
        self.normalize, self.reduction = normalize, reduction
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor,
                sample_weight: Tensor | None = None) -> Tensor:
        return rescaled_mse_loss(
            logits, target, k=self.k, M=self.M, normalize=self.normalize,
            reduction=self.reduction, weight=self.weight, sample_weight=sample_weight,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k:g}, M={self.M:g}, normalize={self.normalize!r}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        )

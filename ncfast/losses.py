"""The fused rescaled-MSE loss (theory.md 2.1-2.4): functional form and nn.Module."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from . import _C
from ._ops import check_rescaled_mse_args, loss_dtype, rescaled_mse_per_sample

_OP = "ncfast.rescaled_mse_loss"
NORMALIZE = ("sample", "element")
REDUCTIONS = ("mean", "sum", "none")


def set_cuda_target_checks(enabled: bool) -> bool:
    """Turn the CUDA label-range check on or off; returns the previous setting.

    On CUDA the check reads the labels back (one host synchronisation per loss call). With it
    off, out-of-range labels raise nothing: such a row is treated as if no class matched (every
    entry weighted 1 with target 0); memory stays safe, since labels are only compared. The
    check is always on for CPU tensors and always skipped while a CUDA graph is captured.
    """
    return bool(_C.set_cuda_target_checks(bool(enabled)))


@contextlib.contextmanager
def cuda_target_checks(enabled: bool) -> Iterator[None]:
    """``set_cuda_target_checks(enabled)`` inside the block, the previous setting after it. For
    labels already known to be in range, e.g. those of a validated data set, so that a training
    step never waits for the host."""
    previous = set_cuda_target_checks(enabled)
    try:
        yield
    finally:
        set_cuda_target_checks(previous)


def check_loss_options(k: float, M: float, normalize: str, reduction: str, op: str = _OP) -> None:
    """The option rules every rescaled-MSE entry point shares; ``op`` names it in messages."""
    if normalize not in NORMALIZE:
        raise ValueError(f"{op}: normalize must be 'sample' or 'element', got {normalize!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, value in (("k", k), ("M", M)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{op}: {name} must be a Python number, got {type(value).__name__}")
    # The same rules as the op's own checks, here so the module fails at construction.
    if not (0 < k < float("inf")):
        raise ValueError(f"{op}: k must be finite and > 0, got {k:g}")
    if not abs(M) < float("inf"):
        raise ValueError(f"{op}: M must be finite, got {M:g}")


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
    on every device. On CUDA the label range check reads the labels (one host sync); see
    :func:`ncfast.set_cuda_target_checks`.
    """
    check_loss_options(k, M, normalize, reduction)
    # The op checks the same again; checking here first keeps argument errors in Python, where
    # they are raised the same way whatever C++ toolchain built the extension.
    check_rescaled_mse_args(logits, target, k, M)
    per_sample = rescaled_mse_per_sample(logits, target, float(k), float(M), int(ignore_index))
    B, K = logits.shape
    if normalize == "element":
        per_sample = per_sample / K

    acc = loss_dtype(logits.dtype)
    coeff = None  # c_i, the product of the given weights
    if weight is not None:
        _check_weight("weight", weight, K, "one per class", logits)
        safe_target = torch.where(target == ignore_index, 0, target)
        coeff = weight.to(acc).gather(0, safe_target.long())
    if sample_weight is not None:
        _check_weight("sample_weight", sample_weight, B, "one per row of logits", logits)
        sw = sample_weight.to(acc)
        coeff = sw if coeff is None else coeff * sw
    if coeff is not None:
        valid = (target != ignore_index).to(acc)
        coeff = coeff * valid  # ignored rows leave the weighted denominator too
        per_sample = per_sample * coeff

    if reduction == "none":
        return per_sample.to(logits.dtype)
    total = per_sample.sum()
    if reduction == "mean":
        denom = coeff.sum() if coeff is not None else (target != ignore_index).sum()
        total = total / denom
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
        check_loss_options(k, M, normalize, reduction)
        self.k, self.M = float(k), float(M)
        self.normalize, self.reduction = normalize, reduction
        self.ignore_index = int(ignore_index)
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

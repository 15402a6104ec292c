"""Plain-PyTorch references of every ncfast op, written for clarity, float64-capable: the
test oracle. Nothing here is fused or fast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    """Reference of :func:`ncfast.rescaled_mse_loss`, computed in the dtype of ``logits``
    from an explicit one-hot target and weight matrix (theory.md 2.1-2.2)."""
    B, K = logits.shape
    valid = target != ignore_index
    onehot = F.one_hot(torch.where(valid, target, 0).long(), K).to(logits.dtype)
    omega = 1 + (k - 1) * onehot
    per_sample = (omega * (logits - M * onehot) ** 2).sum(1)
    if normalize == "element":
        per_sample = per_sample / K
    coeff = valid.to(logits.dtype)
    if weight is not None:
        coeff = coeff * weight.to(logits.dtype)[torch.where(valid, target, 0).long()]
    if sample_weight is not None:
        coeff = coeff * sample_weight.to(logits.dtype)
    per_sample = per_sample * coeff
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / coeff.sum()


def hui_belkin_square_loss(output: Tensor, target_onehot: Tensor, k: float, M: float) -> Tensor:
    """The rescaled square loss as its authors (Hui & Belkin, ICLR 2021) compute it: the one-hot
    target scaled by M, the true-class entries weighted by k, mean over all B*K entries."""
    weights = 1 + (k - 1) * target_onehot
    return (weights * (output - M * target_onehot) ** 2).mean()

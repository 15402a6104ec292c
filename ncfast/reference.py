"""Plain-PyTorch references of every ncfast op, written for clarity, float64-capable: the
test oracle. Nothing here is fused or fast."""

from __future__ import annotations

from dataclasses import dataclass

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


# --- class statistics and NC1 (theory.md 5.2, 5.3, 5.6) -------------------------------------


@dataclass(frozen=True)
class ReferenceClassStats:
    """Class statistics from a full feature matrix, all float64; follows the
    :class:`ncfast.metrics.ClassStatistics` protocol.

    Fields: ``counts`` (K,) int64; ``means`` (K, d), zero rows for empty classes;
    ``within_cov`` the pooled Σ_W (d, d); ``variances`` the v_k (K,), 0 for empty classes;
    ``total_mean`` (1/N) sum_i h_i (d,); ``nc4_mismatches`` / ``nc4_total`` scalar int64 tensors,
    or None when no classifier was given.
    """

    num_classes: int
    dim: int
    counts: Tensor
    means: Tensor
    within_cov: Tensor
    variances: Tensor
    total_mean: Tensor
    nc4_mismatches: Tensor | None = None
    nc4_total: Tensor | None = None

    def sigma_w(self) -> Tensor:
        return self.within_cov

    def class_variances(self) -> Tensor:
        return self.variances

    def global_mean(self, kind: str = "weighted") -> Tensor:
        """``"weighted"``: (1/N) sum_i h_i; ``"unweighted"``: the mean of the means of the
        classes that have samples."""
        if kind == "weighted":
            return self.total_mean
        if kind == "unweighted":
            return self.means[self.counts > 0].mean(0)
        raise ValueError(f"kind must be 'weighted' or 'unweighted', got {kind!r}")


def class_stats(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> ReferenceClassStats:
    """Two-pass float64 class statistics (theory.md 5.2): class means first, then the centred
    scatter Σ_W = (1/N) sum_k sum_{i in k} (h_i - μ_k)(h_i - μ_k)^T and v_k.

    With ``weight`` (K, d) (and optionally ``bias`` (K,)) also counts the NC4 mismatches of
    theory.md 5.6 over all N samples: argmin_k ‖h_i - μ_k‖ (Euclidean, over the classes that
    have samples) != argmax_k (W h_i + b)_k; ties go to the lowest index on both sides.
    """
    h = features.to(torch.float64)
    y = labels.long()
    N, d = h.shape
    K = int(num_classes)
    if y.shape != (N,) or (N > 0 and (y.min() < 0 or y.max() >= K)):
        raise ValueError(f"labels must be (N,) = ({N},) with values in [0, {K})")

    counts = torch.bincount(y, minlength=K)
    sums = torch.zeros(K, d, dtype=torch.float64, device=h.device).index_add_(0, y, h)
    present = counts > 0
    means = torch.zeros_like(sums)
    means[present] = sums[present] / counts[present, None].to(torch.float64)

    centred = h - means[y]  # second pass
    within_cov = centred.T @ centred / N
    sq = torch.zeros(K, dtype=torch.float64, device=h.device).index_add_(
        0, y, (centred**2).sum(1)
    )
    variances = torch.zeros(K, dtype=torch.float64, device=h.device)
    variances[present] = sq[present] / counts[present].to(torch.float64)
    total_mean = h.mean(0)

    mismatches = total = None
    if weight is not None:
        W = weight.to(torch.float64)
        logits = h @ W.T
        if bias is not None:
            logits = logits + bias.to(torch.float64)
        dist = torch.cdist(h, means, compute_mode="donot_use_mm_for_euclid_dist")
        dist[:, ~present] = float("inf")
        nearest = dist.argmin(1)
        predicted = logits.argmax(1)
        mismatches = (nearest != predicted).sum()
        total = torch.tensor(N, dtype=torch.int64, device=h.device)

    return ReferenceClassStats(
        num_classes=K, dim=d, counts=counts, means=means, within_cov=within_cov,
        variances=variances, total_mean=total_mean, nc4_mismatches=mismatches, nc4_total=total,
    )


def nc1_pinv(stats, global_mean: str = "weighted") -> float:
    """NC1 = (1/K) Tr(Σ_W Σ_B^+) the straightforward way (theory.md 5.3): Σ_B (d x d) in float64
    and ``torch.linalg.pinv(hermitian=True)`` with rtol set between the r-th and (r+1)-th largest
    |eigenvalue|, r = min(K-1, d), so that exactly rank r is kept. A cross-check of the K x K
    route of :func:`ncfast.metrics.nc1`; all classes must have samples."""
    means = stats.means.to(torch.float64)
    K, d = means.shape
    mu_g = stats.global_mean(global_mean).to(torch.float64)
    Mc = means - mu_g  # rows μ_k - μ_G
    sigma_b = Mc.T @ Mc / K
    sigma_w = stats.sigma_w().to(torch.float64)
    r = min(K - 1, d)
    ev = torch.linalg.eigvalsh(sigma_b).abs().sort(descending=True).values
    kept, dropped = ev[r - 1], ev[r] if r < d else ev[r - 1] * 1e-30
    rtol = torch.sqrt(kept * dropped.clamp_min(kept * 1e-30)) / ev[0]
    sigma_b_pinv = torch.linalg.pinv(sigma_b, rtol=rtol.item(), hermitian=True)
    return (torch.trace(sigma_w @ sigma_b_pinv) / K).item()

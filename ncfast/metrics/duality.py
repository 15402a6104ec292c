"""Per-class duality between the classifier and the class means, and the orthogonality of
out-of-distribution features (theory.md 5.11): the per-class similarity and distance
vectors, uniform duality (UNC3) and NC5. O(K d) from the class statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from .core import (
    _F64, Classes, ClassStatistics, _check_real, _name, _prepare, _weight)


def _row_norms(op: str, name: str, X: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(X, dim=1)
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"{op}: {name} rows {zero} are zero; their direction is undefined")
    return norms


_MEANS = "centred class means (μ_k - μ_G)"


def _similarities(op: str, W: Tensor, Mc_rows: Tensor, cosine: bool) -> Tensor:
    # Row dot products and norms are single passes over (K, d); dividing the dots by the norms
    # avoids building the unit vectors (two more (K, d) tensors).
    dots = torch.linalg.vecdot(W, Mc_rows)
    if cosine:
        dots = dots / (_row_norms(op, "weight", W) * _row_norms(op, _MEANS, Mc_rows))
    return dots


def class_similarities(
    W: Tensor,
    stats: ClassStatistics,
    cosine: bool = False,
    global_mean: str = "weighted",
    classes: Classes = None,
) -> Tensor:
    """(K,) float64 vector of ⟨w_k, μ_k - μ_G⟩ per class, or with ``cosine=True`` the cosine of
    the angle between w_k and μ_k - μ_G (theory.md 5.11). ``W`` (K, d) is used as given
    (pass ``W - W.mean(0)`` for the centred classifier); with ``classes`` the vector has one
    entry per selected class, in that order."""
    return _class_similarities(_name("class_similarities"), W, stats, cosine, global_mean,
                               classes)


def _rows_and_means(op, W, stats, global_mean, classes) -> tuple[Tensor, Tensor]:
    """(w_k, μ_k - μ_G) row by row for the selected classes, float64."""
    prep = _prepare(op, stats, global_mean, classes)
    return _weight(op, "W", W, prep.K, prep.d, prep), prep.Mc.T


def _class_similarities(op, W, stats, cosine, global_mean, classes) -> Tensor:
    return _similarities(op, *_rows_and_means(op, W, stats, global_mean, classes), bool(cosine))


def class_distances(
    W: Tensor,
    stats: ClassStatistics,
    normalized: bool = True,
    global_mean: str = "weighted",
    classes: Classes = None,
) -> Tensor:
    """(K,) float64 vector of ‖w_k/‖w_k‖ - (μ_k - μ_G)/‖μ_k - μ_G‖‖ per class (self-duality
    class by class, theory.md 5.11); ``normalized=False``: ‖w_k - (μ_k - μ_G)‖."""
    op = _name("class_distances")
    Wsel, Mc_rows = _rows_and_means(op, W, stats, global_mean, classes)
    if not normalized:
        return torch.linalg.vector_norm(Wsel - Mc_rows, dim=1)
    # w/|w| - m/|m| formed directly, not as sqrt(2 - 2 cos), which cancels near collapse;
    # one new (K, d) tensor, the second term subtracted in place.
    diff = Wsel / _row_norms(op, "weight", Wsel)[:, None]
    diff.addcdiv_(Mc_rows, _row_norms(op, _MEANS, Mc_rows)[:, None], value=-1.0)
    return torch.linalg.vector_norm(diff, dim=1)


def unc3(
    W: Tensor,
    stats: ClassStatistics,
    cosine: bool = False,
    global_mean: str = "weighted",
    classes: Classes = None,
) -> float:
    """Uniform duality, UNC3 (Wu & Papyan 2024; theory.md 5.11): the variance over classes
    (divisor K - 1) of :func:`class_similarities`. 0 when every class is equally aligned with
    its classifier row; ``cosine=True`` removes the norms (the reference library's default is
    the inner product)."""
    return _class_similarities(_name("unc3"), W, stats, cosine, global_mean,
                               classes).var().item()


def nc5(
    stats: ClassStatistics,
    ood_mean: Tensor,
    centred: bool = False,
    classes: Classes = None,
) -> float:
    """NC5, ID/OOD orthogonality (Ammar et al. 2024; theory.md 5.11)::

        NC5 = mean_k |cos(μ_k, μ_G^ood)|

    with μ_G^ood the mean of the out-of-distribution features (e.g.
    :class:`ncfast.metrics.FeatureMean` over an OOD loader, or ``ncfast.measure(...,
    ood_loader=...)``). 0 when the OOD mean is orthogonal to every class mean. ``centred=True``
    subtracts the in-distribution global mean μ_G from both μ_k and μ_G^ood first (the reference
    library uses the raw vectors, the default)."""
    op = _name("nc5")
    _check_real(op, "ood_mean", ood_mean)
    prep = _prepare(op, stats, "weighted", classes)
    if tuple(ood_mean.shape) != (prep.d,):
        raise ValueError(f"{op}: ood_mean must have shape [dim] = [{prep.d}], got shape "
                         f"{list(ood_mean.shape)}")
    if not bool(torch.isfinite(ood_mean).all()):
        raise ValueError(f"{op}: ood_mean must be finite, got a NaN or Inf")
    ood = ood_mean.to(device=prep.means.device, dtype=_F64)
    means = prep.means
    if centred:
        means, ood = prep.Mc.T, ood - prep.mu_g
    if torch.linalg.vector_norm(ood) == 0:
        raise ValueError(f"{op}: the OOD mean is zero{' after centring' if centred else ''}; "
                         f"its direction is undefined")
    norms = _row_norms(op, "class means" + (" (centred)" if centred else ""), means)
    return ((means @ ood).abs() / norms).mean().item() / torch.linalg.vector_norm(ood).item()

"""Neural-collapse metrics NC1-NC4, CDNV and the bias quantity (theory.md 5): pure functions of
class statistics (any object following :class:`ClassStatistics`, e.g. ``ncfast.ClassStats``)
and, where needed, the classifier W (K, d) and bias b (K,).

Conventions shared by every function here:

- All arithmetic is float64 whatever the dtype of the statistics; results are Python floats.
- ``global_mean``: ``"weighted"`` (default, the original code's choice) uses
  μ_G = (1/N) sum_i h_i, ``"unweighted"`` the mean of the class means (theory.md 5.2). Σ_W is
  always the pooled one, (1/N) sum_k sum_{i in k} (h_i - μ_k)(h_i - μ_k)^T.
- M_c is the d x K matrix of centred class means μ_k - μ_G; W_c = W - 1(1^T W)/K is W with its
  mean row removed.
- ``classes``: optional indices (or a boolean mask of length K) of the classes to use. The
  metric is then computed as if only those classes existed: K becomes their number, the global
  mean is taken over them (weighted by their counts, or not), and the rows of W and b are
  restricted to them. Empty classes are never turned into NaN: a metric that needs class means
  raises :class:`EmptyClassError` naming them, and ``classes=`` is the way to leave them out.
- Errors name the function, the argument, the rule and the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ._pairs import check_tile, pair_reductions

__all__ = [
    "ClassStatistics",
    "EmptyClassError",
    "NCMetrics",
    "all_metrics",
    "bias_norm",
    "cdnv",
    "equiangularity",
    "equinorm",
    "etf_distance",
    "max_angle",
    "nc1",
    "nc1_trace",
    "nc2_classifier",
    "nc2_means",
    "nc3_dual",
    "nc3_gram",
    "nc4",
]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
GLOBAL_MEANS = ("weighted", "unweighted")
Classes = Tensor | Sequence[int] | None  # indices, or a boolean mask of length K


@runtime_checkable
class ClassStatistics(Protocol):
    """What the metrics read from a class-statistics object (theory.md 5.2).

    - ``num_classes`` K and ``dim`` d;
    - ``counts``: (K,) int64 samples per class (zeros mark empty classes);
    - ``means``: (K, d) class means μ_k (rows of empty classes are meaningless);
    - ``sigma_w()``: (d, d) pooled within-class covariance Σ_W;
    - ``class_variances()``: (K,) v_k = (1/n_k) sum_{i in k} ‖h_i - μ_k‖^2;
    - ``global_mean(kind)``: (d,) ``"weighted"`` (1/N) sum_i h_i or ``"unweighted"`` mean of
      the class means.

    Optional, read with ``getattr`` and not part of the structural type: ``nc4_mismatches`` and
    ``nc4_total``, scalar int64 tensors with the streaming NC4 count (absent or None when the
    statistics were gathered without a classifier).
    """

    @property
    def num_classes(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def counts(self) -> Tensor: ...

    @property
    def means(self) -> Tensor: ...

    def sigma_w(self) -> Tensor: ...

    def class_variances(self) -> Tensor: ...

    def global_mean(self, kind: str = "weighted") -> Tensor: ...


class EmptyClassError(ValueError):
    """A metric needs the mean of a class that has no samples. ``classes`` holds their indices."""

    def __init__(self, message: str, classes: list[int]) -> None:
        super().__init__(message)
        self.classes = classes


# --- validation -------------------------------------------------------------------------------


def _name(fn: str) -> str:
    return f"ncfast.metrics.{fn}"


def _check_global_mean(op: str, kind: str) -> None:
    if kind not in GLOBAL_MEANS:
        raise ValueError(f"{op}: global_mean must be 'weighted' or 'unweighted', got {kind!r}")


def _read_stats(op: str, stats: ClassStatistics) -> tuple[int, int, Tensor, Tensor]:
    """(K, d, counts, means), each property read once: on a ClassStats every read settles the
    state and rebuilds the (K, d) float64 means, which at vocabulary-scale K costs more than an
    O(K d) metric itself."""
    for attr in ("num_classes", "dim", "counts", "means", "sigma_w", "class_variances",
                 "global_mean"):
        if not hasattr(type(stats), attr) and not hasattr(stats, attr):
            raise TypeError(
                f"{op}: stats must follow ncfast.metrics.ClassStatistics (no attribute "
                f"{attr!r}), got {type(stats).__name__}"
            )
    K, d = int(stats.num_classes), int(stats.dim)
    counts, means = stats.counts, stats.means
    if tuple(counts.shape) != (K,):
        raise ValueError(
            f"{op}: stats.counts must have shape [num_classes] = [{K}], "
            f"got shape {list(counts.shape)}"
        )
    if tuple(means.shape) != (K, d):
        raise ValueError(
            f"{op}: stats.means must have shape [num_classes, dim] = [{K}, {d}], "
            f"got shape {list(means.shape)}"
        )
    return K, d, counts, means


def _check_stats(op: str, stats: ClassStatistics) -> tuple[int, int]:
    return _read_stats(op, stats)[:2]


def _class_indices(op: str, classes: Classes, K: int, device: torch.device) -> Tensor:
    """``classes`` as int64 indices on ``device``, in the order given, validated."""
    if classes is None:
        return torch.arange(K, device=device)
    if not isinstance(classes, Tensor):
        try:
            if isinstance(classes, (str, bytes)):
                raise TypeError
            classes = torch.as_tensor(classes)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{op}: classes must be a tensor or a sequence of class indices, "
                f"got {type(classes).__name__}"
            ) from None
        if classes.numel() == 0:
            classes = classes.long()
    if classes.dtype == torch.bool:
        if tuple(classes.shape) != (K,):
            raise ValueError(
                f"{op}: classes given as a boolean mask must have shape [{K}], "
                f"got shape {list(classes.shape)}"
            )
        classes = classes.nonzero().flatten()
    if classes.dim() != 1 or classes.dtype.is_floating_point or classes.is_complex():
        raise ValueError(
            f"{op}: classes must be a 1-D integer tensor of class indices, got "
            f"{classes.dim()}-D {classes.dtype} tensor"
        )
    idx = classes.to(device=device, dtype=torch.int64)
    bad = idx[(idx < 0) | (idx >= K)]
    if bad.numel():
        raise ValueError(f"{op}: classes must be in [0, {K}), got {bad.tolist()}")
    if torch.unique(idx).numel() != idx.numel():
        uniq, cnt = torch.unique(idx, return_counts=True)
        repeated = uniq[cnt > 1].tolist()
        raise ValueError(f"{op}: classes must not repeat, got {repeated} more than once")
    return idx


def _check_nonempty(op: str, counts: Tensor, idx: Tensor) -> None:
    empty = idx[counts[idx] == 0].tolist()
    if empty:
        raise EmptyClassError(
            f"{op}: classes {empty} have no samples; pass classes=... or fill them", empty
        )


def _check_real(op: str, name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{op}: {name} must have a real numeric dtype, got {x.dtype}")


def _rows(op: str, name: str, x: Tensor) -> Tensor:
    """A (K, d) matrix of row vectors with K >= 2, as float64."""
    _check_real(op, name, x)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(
            f"{op}: {name} must be 2-D (classes, dim) with at least 2 rows, "
            f"got shape {list(x.shape)}"
        )
    return x.to(_F64)


def _weight(op: str, name: str, W: Tensor, K: int, d: int, prep: _Prepared) -> Tensor:
    """W (K, d) matching the stats, restricted to the selected classes, float64."""
    _check_real(op, name, W)
    if tuple(W.shape) != (K, d):
        raise ValueError(
            f"{op}: {name} must have shape [num_classes, dim] = [{K}, {d}] to match the stats, "
            f"got shape {list(W.shape)}"
        )
    return prep.select(W.to(device=prep.means.device, dtype=_F64))


def _bias(op: str, name: str, b: Tensor | None, K: int, prep: _Prepared) -> Tensor | None:
    if b is None:
        return None
    _check_real(op, name, b)
    if tuple(b.shape) != (K,):
        raise ValueError(
            f"{op}: {name} must have shape [num_classes] = [{K}] to match the stats, "
            f"got shape {list(b.shape)}"
        )
    return prep.select(b.to(device=prep.means.device, dtype=_F64))


# --- the selected, centred class means --------------------------------------------------------


@dataclass
class _Prepared:
    K: int  # classes in the stats
    d: int
    idx: Tensor  # (K',) selected classes
    all_classes: bool  # idx covers every class of the stats
    counts: Tensor  # (K',) float64
    means: Tensor  # (K', d) float64
    mu_g: Tensor  # (d,) float64
    Mc: Tensor  # (d, K') float64, columns μ_k - μ_G
    identity: bool = False  # idx is arange(K): per-class inputs are used as they are

    def select(self, x: Tensor) -> Tensor:
        """The rows of the selected classes (no copy when every class is selected in order)."""
        return x if self.identity else x[self.idx]


def _too_few_classes(op: str, n: int) -> str:
    return f"{op}: needs at least 2 classes, got {n}"


def _prepare(op: str, stats: ClassStatistics, global_mean: str, classes: Classes,
             min_classes: int = 2) -> _Prepared:
    _check_global_mean(op, global_mean)
    K, d, counts_all, means_all = _read_stats(op, stats)
    device = means_all.device
    idx = _class_indices(op, classes, K, device)
    counts_all = counts_all.to(device)
    _check_nonempty(op, counts_all, idx)
    if idx.numel() < min_classes:
        raise ValueError(_too_few_classes(op, idx.numel()))
    counts = counts_all[idx].to(_F64)
    means = means_all.to(_F64)
    if classes is not None:
        means = means[idx]
    if classes is None:  # the protocol's own global mean (it may be accumulated separately)
        mu_g = stats.global_mean(global_mean).to(device=device, dtype=_F64)
    elif global_mean == "weighted":
        mu_g = (counts[:, None] * means).sum(0) / counts.sum()
    else:
        mu_g = means.mean(0)
    return _Prepared(
        K=K, d=d, idx=idx, all_classes=idx.numel() == K, counts=counts, means=means, mu_g=mu_g,
        Mc=(means - mu_g).T, identity=classes is None,
    )


def _sigma_w(op: str, stats: ClassStatistics, prep: _Prepared) -> Tensor:
    """Σ_W; it is pooled over all samples, so ``classes`` may only leave out empty classes."""
    if not prep.all_classes:
        left_out = torch.ones(prep.K, dtype=torch.bool, device=prep.idx.device)
        left_out[prep.idx] = False
        with_samples = left_out.nonzero().flatten()
        with_samples = with_samples[stats.counts.to(left_out.device)[with_samples] > 0]
        if with_samples.numel():
            raise ValueError(
                f"{op}: classes leaves out classes {with_samples.tolist()} that have samples; "
                f"the pooled Σ_W covers every sample and cannot be restricted, so classes may "
                f"only leave out empty classes (nc1_trace, nc2_means, nc3_* and cdnv take any "
                f"subset)"
            )
    sw = stats.sigma_w()
    if tuple(sw.shape) != (prep.d, prep.d):
        raise ValueError(
            f"{op}: stats.sigma_w() must have shape [dim, dim] = [{prep.d}, {prep.d}], "
            f"got shape {list(sw.shape)}"
        )
    return sw.to(device=prep.means.device, dtype=_F64)


def _variances(op: str, stats: ClassStatistics, prep: _Prepared) -> Tensor:
    v = stats.class_variances()
    if tuple(v.shape) != (prep.K,):
        raise ValueError(
            f"{op}: stats.class_variances() must have shape [num_classes] = [{prep.K}], "
            f"got shape {list(v.shape)}"
        )
    return prep.select(v.to(device=prep.means.device, dtype=_F64))


# --- kernels on float64 tensors ---------------------------------------------------------------


def _etf_dist(op: str, name: str, A: Tensor) -> float:
    K = A.shape[0]
    norm = torch.linalg.matrix_norm(A)
    if norm == 0:
        raise ValueError(f"{op}: {name} must not be zero (its Frobenius norm is 0)")
    P = torch.eye(K, dtype=_F64, device=A.device) - 1.0 / K
    return torch.linalg.matrix_norm(A / norm - P / math.sqrt(K - 1)).item()


def _centre_rows(W: Tensor) -> Tensor:
    return W - W.mean(0, keepdim=True)


def _nc1(op: str, prep: _Prepared, sigma_w: Tensor) -> float:
    Mc = prep.Mc
    Kp, d = Mc.shape[1], Mc.shape[0]
    g, V = torch.linalg.eigh(Mc.T @ Mc)  # ascending
    if g[-1] <= 0:
        raise ValueError(f"{op}: the class means all coincide (Σ_B = 0); NC1 is undefined")
    r = min(Kp - 1, d)
    g, V = g[-r:], V[:, -r:]
    # The rank cut is explicit (theory.md 5.8); this floor only drops eigenvalues that are
    # zero in float64, which happens when the means span fewer than r dimensions.
    keep = g > g[-1] * max(Kp, d) * _EPS
    g, V = g[keep], V[:, keep]
    G_pinv = (V / g) @ V.T
    S = Mc.T @ sigma_w @ Mc
    return torch.trace(G_pinv @ S @ G_pinv).item()


def _nc1_trace(op: str, prep: _Prepared, v: Tensor) -> float:
    tr_w = (prep.counts * v).sum() / prep.counts.sum()
    tr_b = (prep.Mc * prep.Mc).sum() / prep.Mc.shape[1]
    if tr_b == 0:
        raise ValueError(f"{op}: the class means all coincide (Σ_B = 0); NC1 is undefined")
    return (tr_w / tr_b).item()


def _equinorm(op: str, name: str, V: Tensor) -> float:
    norms = torch.linalg.vector_norm(V, dim=1)
    mean = norms.mean()
    if mean == 0:
        raise ValueError(f"{op}: {name} must not be all zero (every row has norm 0)")
    return (norms.std() / mean).item()


def _cosines(op: str, name: str, V: Tensor) -> Tensor:
    """Cosines of the K(K-1) ordered pairs k != l."""
    norms = torch.linalg.vector_norm(V, dim=1)
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"{op}: {name} rows {zero} have norm 0; their angles are undefined")
    U = V / norms[:, None]
    C = U @ U.T
    K = V.shape[0]
    return C[~torch.eye(K, dtype=torch.bool, device=V.device)]


def _equiangularity(op: str, name: str, V: Tensor) -> float:
    return _cosines(op, name, V).std().item()


def _max_angle(op: str, name: str, V: Tensor) -> float:
    K = V.shape[0]
    return (_cosines(op, name, V) + 1.0 / (K - 1)).abs().mean().item()


def _nc3_dual(op: str, name: str, W: Tensor, Mc: Tensor, centred: bool, squared: bool) -> float:
    if centred:
        W = _centre_rows(W)
    wn, mn = torch.linalg.matrix_norm(W), torch.linalg.matrix_norm(Mc)
    if wn == 0:
        raise ValueError(f"{op}: {name} must not be zero{' after centring' if centred else ''}")
    if mn == 0:
        raise ValueError(f"{op}: the class means all coincide (M_c = 0); NC3 is undefined")
    dist = torch.linalg.matrix_norm(W.T / wn - Mc / mn).item()
    return dist * dist if squared else dist


def _bias_norm(W: Tensor, b: Tensor | None, mu_g: Tensor) -> float:
    out = W @ mu_g
    if b is not None:
        out = out + b
    return torch.linalg.vector_norm(out).item()


def _cdnv(op: str, means: Tensor, v: Tensor, tile: int, exponent: float = 1.0) -> float:
    # distances are shift-invariant; subtracting the mean of the means limits cancellation
    centred = means - means.mean(0)
    return pair_reductions(op, centred, tile, v, exponents=(exponent,)).cdnv[exponent]


def _nc4(op: str, stats: object) -> float | None:
    mismatches = getattr(stats, "nc4_mismatches", None)
    total = getattr(stats, "nc4_total", None)
    if mismatches is None or total is None:
        return None
    total = int(total)
    if total == 0:
        raise ValueError(f"{op}: the stats counted no samples for NC4 (nc4_total is 0)")
    return int(mismatches) / total


# --- public metrics ---------------------------------------------------------------------------


def etf_distance(A: Tensor) -> float:
    """Distance of a K x K matrix to the simplex-ETF Gram matrix (theory.md 5.4)::

        etf_dist(A) = ‖A/‖A‖_F - P/sqrt(K-1)‖_F,   P = I - J/K

    Unsquared, in [0, 2]; 0 iff A is a positive multiple of P. ``A`` (K, K), K >= 2, not zero;
    any real dtype (computed in float64). A need not be symmetric (NC3_gram passes W_c M_c).
    """
    op = _name("etf_distance")
    _check_real(op, "A", A)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 2:
        raise ValueError(f"{op}: A must be square (K, K) with K >= 2, got shape {list(A.shape)}")
    return _etf_dist(op, "A", A.to(_F64))


def nc1(
    stats: ClassStatistics, global_mean: str = "weighted", classes: Classes = None
) -> float:
    """NC1 = (1/K) Tr(Σ_W Σ_B^+) (theory.md 5.3), by the K x K route of theory.md 5.8::

        G_c = M_c^T M_c,  G_c^+ = V_r diag(1/g_r) V_r^T  (top r = min(K-1, d) eigenpairs)
        NC1 = Tr(G_c^+ (M_c^T Σ_W M_c) G_c^+)

    The rank cut is explicit, so the float32 rounding noise in Σ_B's null space is never
    inverted; eigenvalues that are exactly zero in float64 (means spanning fewer than r
    dimensions) are dropped as a pseudo-inverse would. Cost O(d^2 K) plus a K x K ``eigh``.

    ``classes`` may only leave out empty classes: Σ_W is pooled over every sample and cannot be
    restricted (use :func:`nc1_trace` for an arbitrary subset). Raises :class:`EmptyClassError`
    for empty selected classes, ValueError when all class means coincide.
    """
    op = _name("nc1")
    prep = _prepare(op, stats, global_mean, classes)
    return _nc1(op, prep, _sigma_w(op, stats, prep))


def nc1_trace(
    stats: ClassStatistics, global_mean: str = "weighted", classes: Classes = None
) -> float:
    """NC1_tr = Tr(Σ_W) / Tr(Σ_B) (theory.md 5.3), no inverse, valid for any d.

    Tr(Σ_W) = sum_k n_k v_k / N is taken from the class variances and Tr(Σ_B) = ‖M_c‖_F^2 / K,
    so ``classes`` may select any subset (Σ_W then pools the selected classes only).
    """
    op = _name("nc1_trace")
    prep = _prepare(op, stats, global_mean, classes)
    return _nc1_trace(op, prep, _variances(op, stats, prep))


def nc2_classifier(W: Tensor) -> float:
    """NC2_W = etf_dist(W_c W_c^T), W_c = W - 1(1^T W)/K (theory.md 5.4): the original code's NC2,
    with W centred, which matters under MSE (an orthogonal frame W = I_K gives 0).

    ``W`` (K, d), K >= 2, any real dtype. To restrict to some classes pass ``W[classes]``.
    """
    op = _name("nc2_classifier")
    Wc = _centre_rows(_rows(op, "W", W))
    return _etf_dist(op, "W (centred)", Wc @ Wc.T)


def nc2_means(
    stats: ClassStatistics, global_mean: str = "weighted", classes: Classes = None
) -> float:
    """NC2_H = etf_dist(M_c^T M_c) (theory.md 5.4), the class-mean version of NC2."""
    op = _name("nc2_means")
    prep = _prepare(op, stats, global_mean, classes)
    return _etf_dist(op, "M_c^T M_c", prep.Mc.T @ prep.Mc)


def equinorm(vectors: Tensor) -> float:
    """std_k ‖v_k‖ / mean_k ‖v_k‖ over the rows v_k of ``vectors`` (K, d) (theory.md 5.4).

    The std is the sample std (divisor K-1, ``torch.std``'s default and Papyan et al.'s code).
    Pass the rows of W_c (``W - W.mean(0)``) or the centred class means ``M_c^T``.
    """
    op = _name("equinorm")
    return _equinorm(op, "vectors", _rows(op, "vectors", vectors))


def equiangularity(vectors: Tensor) -> float:
    """std over the K(K-1) ordered pairs k != l of cos(v_k, v_l), v_k the rows of ``vectors``
    (K, d) (theory.md 5.4); sample std (divisor K(K-1) - 1). Rows must be nonzero."""
    op = _name("equiangularity")
    return _equiangularity(op, "vectors", _rows(op, "vectors", vectors))


def max_angle(vectors: Tensor) -> float:
    """mean over k != l of |cos(v_k, v_l) + 1/(K-1)|, v_k the rows of ``vectors`` (K, d)
    (theory.md 5.4; Papyan et al.'s "coherence"). 0 for a simplex ETF. Rows must be nonzero."""
    op = _name("max_angle")
    return _max_angle(op, "vectors", _rows(op, "vectors", vectors))


def nc3_gram(
    W: Tensor,
    stats: ClassStatistics,
    global_mean: str = "weighted",
    classes: Classes = None,
) -> float:
    """NC3_gram = etf_dist(W_c M_c) (theory.md 5.5), a K x K matrix: the original code's NC3.

    ``W`` (K, d) matches the stats; with ``classes`` its rows are restricted to them before
    centring.
    """
    op = _name("nc3_gram")
    prep = _prepare(op, stats, global_mean, classes)
    Wc = _centre_rows(_weight(op, "W", W, prep.K, prep.d, prep))
    return _etf_dist(op, "W_c M_c", Wc @ prep.Mc)


def nc3_dual(
    W: Tensor,
    stats: ClassStatistics,
    centred: bool = True,
    squared: bool = False,
    global_mean: str = "weighted",
    classes: Classes = None,
) -> float:
    """NC3_dual = ‖W^T/‖W‖_F - M_c/‖M_c‖_F‖_F (theory.md 5.5, Papyan style).

    ``centred=True`` (default) uses W_c in place of W, as theory.md 5.5 asks when the bias is
    absent or penalised (at the bias-free K = 10 optimum the uncentred value is 0.320364, the
    centred one 0). ``squared=True`` returns the square, the convention of some implementations.
    """
    op = _name("nc3_dual")
    prep = _prepare(op, stats, global_mean, classes)
    Wsel = _weight(op, "W", W, prep.K, prep.d, prep)
    return _nc3_dual(op, "W", Wsel, prep.Mc, bool(centred), bool(squared))


def bias_norm(
    W: Tensor,
    b: Tensor | None,
    stats: ClassStatistics,
    global_mean: str = "weighted",
    classes: Classes = None,
) -> float:
    """‖W μ_G + b‖_2 (b := 0 when None): the quantity the original code plots as "NC4"
    (theory.md 5.6). It is not NC4 and does not vanish under MSE (0.316228 at the K = 10 UFM
    optimum with an unpenalised bias). See :func:`nc4` for the nearest-class-centre mismatch.

    With the default weighted global mean and ``classes=None`` no class mean is needed, so empty
    classes are allowed; otherwise they raise :class:`EmptyClassError`.
    """
    op = _name("bias_norm")
    if classes is None and global_mean == "weighted":
        K, d, counts, means = _read_stats(op, stats)
        device = means.device
        prep = _Prepared(
            K=K, d=d, idx=torch.arange(K, device=device), all_classes=True,
            counts=counts.to(device=device, dtype=_F64), means=means.to(_F64),
            mu_g=stats.global_mean("weighted").to(device=device, dtype=_F64), Mc=None,
            identity=True,
        )
    else:
        prep = _prepare(op, stats, global_mean, classes)
    Wsel = _weight(op, "W", W, prep.K, prep.d, prep)
    return _bias_norm(Wsel, _bias(op, "b", b, prep.K, prep), prep.mu_g)


def nc4(stats: ClassStatistics) -> float:
    """NC4 = mean_i [argmin_k ‖h_i - μ_k‖ != argmax_k (W h_i + b)_k] (theory.md 5.6), read from
    the streaming count the stats carry (``nc4_mismatches / nc4_total``, over every sample the
    stats saw). Raises ValueError when the stats carry no NC4 count (gathered without a
    classifier) or counted no samples."""
    op = _name("nc4")
    value = _nc4(op, stats)
    if value is None:
        raise ValueError(
            f"{op}: stats carry no NC4 count (nc4_mismatches / nc4_total are missing or None); "
            f"gather the statistics with the classifier's weight (and bias) to count NC4"
        )
    return value


def cdnv(
    stats: ClassStatistics,
    tile: int | None = 1024,
    classes: Classes = None,
    distance_exponent: float = 1.0,
) -> float:
    """Class-distance normalised variance (Galanti et al. 2022; theory.md 5.7)::

        CDNV_p = mean over k != l of (v_k + v_l) / (2 ‖μ_k - μ_l‖^(2p))

    p = ``distance_exponent`` (1: Galanti et al.'s CDNV; a larger p discounts pairs that are
    already far apart, as in Wu & Papyan's reference library). The K(K-1)/2 pairs are reduced
    in tiles of ``tile`` rows of the means' Gram matrix (float64, ‖μ_k - μ_l‖^2 =
    ‖μ_k‖^2 + ‖μ_l‖^2 - 2 μ_k·μ_l after subtracting the mean of the means), so memory is
    O(tile K), never K x K when K > tile; ``None`` picks a tile of 2^24 entries. The result does
    not depend on ``tile`` beyond rounding. Raises ValueError if two selected classes have the
    same mean.
    """
    op = _name("cdnv")
    prep = _prepare(op, stats, "weighted", classes)
    tile = check_tile(op, tile, prep.means.shape[0])
    p = check_distance_exponent(op, "distance_exponent", distance_exponent)
    return _cdnv(op, prep.means, _variances(op, stats, prep), tile, p)


def check_distance_exponent(op: str, name: str, p) -> float:
    """CDNV's distance exponent p as a float: a finite number > 0."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {p!r}")
    return float(p)


@dataclass(frozen=True)
class NCMetrics:
    """Every metric of theory.md 5 for one set of class statistics (see :func:`all_metrics`).

    Fields that need the classifier are None when no weight was given; ``nc4`` is None when the
    stats carry no NC4 count. ``*_means`` use the centred class means μ_k - μ_G as vectors,
    ``*_classifier`` the rows of W_c. With ``all_metrics(..., undefined="none")`` a metric that
    is undefined for these statistics (e.g. CDNV when two class means coincide) is None and
    ``undefined`` maps its name to the reason.
    """

    nc1: float
    nc1_trace: float
    nc2_means: float
    equinorm_means: float
    equiangularity_means: float
    max_angle_means: float
    cdnv: float
    nc2_classifier: float | None = None
    equinorm_classifier: float | None = None
    equiangularity_classifier: float | None = None
    max_angle_classifier: float | None = None
    nc3_gram: float | None = None
    nc3_dual: float | None = None
    bias_norm: float | None = None
    nc4: float | None = None
    undefined: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | None]:
        """The metric fields as a plain dict, in declaration order (``undefined`` left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "undefined"}


def all_metrics(
    stats: ClassStatistics,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    global_mean: str = "weighted",
    classes: Classes = None,
    undefined: str = "raise",
) -> NCMetrics:
    """All metrics of theory.md 5 at once, sharing the centred means: NC1 (K x K route),
    NC1_tr, NC2_H with equinorm / equiangularity / max-angle of the centred means, CDNV, and,
    given ``weight`` (K, d) (and optionally ``bias`` (K,)), NC2_W with the same three for the
    rows of W_c, NC3_gram, centred unsquared NC3_dual and ‖W μ_G + b‖. NC4 comes from the stats'
    streaming count when they carry one (it always covers every sample the stats saw).

    ``classes`` follows the same rules as in :func:`nc1`: it may only leave out empty classes.
    ``undefined="raise"`` (default): a metric that is undefined for these statistics raises
    ValueError naming why; ``"none"``: it is None and ``NCMetrics.undefined`` says why (a
    training loop keeps going when, say, two classes share a mean; with one class that has
    samples every metric of two or more classes is None, and NC4 and ‖W μ_G + b‖ are kept).
    """
    op = _name("all_metrics")
    if undefined not in ("raise", "none"):
        raise ValueError(f"{op}: undefined must be 'raise' or 'none', got {undefined!r}")
    if bias is not None and weight is None:
        raise ValueError(f"{op}: bias was given without weight")
    reasons: dict[str, str] = {}
    # one class (a single-class data set, say): under "none" every metric of two or more
    # classes is None with the reason, and the rest (NC4, ‖W μ_G + b‖) are measured
    prep = _prepare(op, stats, global_mean, classes, min_classes=1 if undefined == "none" else 2)
    too_few = _too_few_classes(op, prep.idx.numel()) if prep.idx.numel() < 2 else None

    def value(name: str, compute) -> float | None:
        if too_few is not None:
            reasons[name] = too_few
            return None
        if undefined == "raise":
            return compute()
        try:
            return compute()
        except ValueError as err:
            reasons[name] = str(err)
            return None

    sigma_w = _sigma_w(op, stats, prep)
    v = _variances(op, stats, prep)
    Mc, H = prep.Mc, prep.Mc.T
    computed: dict[str, float | None] = dict(
        nc1=value("nc1", lambda: _nc1(op, prep, sigma_w)),
        nc1_trace=value("nc1_trace", lambda: _nc1_trace(op, prep, v)),
        nc2_means=value("nc2_means", lambda: _etf_dist(op, "M_c^T M_c", Mc.T @ Mc)),
        equinorm_means=value("equinorm_means",
                             lambda: _equinorm(op, "centred class means", H)),
        equiangularity_means=value("equiangularity_means",
                                   lambda: _equiangularity(op, "centred class means", H)),
        max_angle_means=value("max_angle_means",
                              lambda: _max_angle(op, "centred class means", H)),
        cdnv=value("cdnv", lambda: _cdnv(op, prep.means, v, 1024)),
        nc4=_nc4(op, stats),
    )
    if weight is not None:
        W = _weight(op, "weight", weight, prep.K, prep.d, prep)
        b = _bias(op, "bias", bias, prep.K, prep)
        Wc = _centre_rows(W)
        computed.update(
            nc2_classifier=value("nc2_classifier",
                                 lambda: _etf_dist(op, "weight (centred)", Wc @ Wc.T)),
            equinorm_classifier=value("equinorm_classifier",
                                      lambda: _equinorm(op, "weight (centred)", Wc)),
            equiangularity_classifier=value(
                "equiangularity_classifier",
                lambda: _equiangularity(op, "weight (centred)", Wc)),
            max_angle_classifier=value("max_angle_classifier",
                                       lambda: _max_angle(op, "weight (centred)", Wc)),
            nc3_gram=value("nc3_gram", lambda: _etf_dist(op, "W_c M_c", Wc @ Mc)),
            nc3_dual=value("nc3_dual", lambda: _nc3_dual(op, "weight", W, Mc, True, False)),
            bias_norm=_bias_norm(W, b, prep.mu_g),
        )
    return NCMetrics(**computed, undefined=reasons)

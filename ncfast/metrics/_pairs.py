"""Reductions over the K(K-1)/2 pairs of class means, in tiles of rows of their Gram matrix:
memory O(tile K), never K x K (unless asked for the grid itself), never K x K x d. One Gram
product per tile serves every pair metric (theory.md 5.10)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

_EPS = torch.finfo(torch.float64).eps
KERNELS = ("distance", "log", "riesz")
_TILE_ENTRIES = 2**24  # 128 MiB of float64 per (tile, K) block
# Rows per step of the pair sweep, whatever the tile: the diagonal block of each step is masked
# (boolean indexing costs far more than the kernels), so it is kept small next to the rest.
_SWEEP_ROWS = 256


def default_tile(K: int) -> int:
    return max(1, min(K, _TILE_ENTRIES // max(K, 1)))


def check_tile(op: str, tile: int | None, K: int) -> int:
    if tile is None:
        return default_tile(K)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{op}: tile must be an int >= 1, got {tile!r}")
    return tile


@dataclass
class _Moments:
    """Count, mean and sum of squared deviations of a stream of values, merged chunk by chunk
    (Chan et al.), so the variance needs no second pass and no cancellation. Values may come as
    logarithms of their magnitudes (the Riesz energies overflow float64 for large s): they are
    then kept relative to exp(``log_scale``), the largest seen so far."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    log_scale: float = 0.0

    def add(self, values: Tensor, log_magnitude: bool = False, sign: float = 1.0) -> None:
        nb = values.numel()
        if nb == 0:
            return
        if log_magnitude:
            top = float(values.max())
            if self.n == 0 or top > self.log_scale:
                shrink = math.exp(self.log_scale - top) if self.n else 0.0
                self.mean, self.m2, self.log_scale = self.mean * shrink, self.m2 * shrink**2, top
            values = sign * torch.exp(values - self.log_scale)
        values = values.reshape(-1)
        mb = values.mean()
        centred = values - mb  # torch.var_mean is several times slower on a CPU
        mb, m2b = float(mb), float(torch.dot(centred, centred))
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n

    def result(self) -> tuple[float, float]:
        """(mean, population variance), rescaled (inf where float64 cannot hold them)."""
        def scaled(x: float, power: int) -> float:
            if x == 0.0 or self.log_scale == 0.0:
                return x
            log = power * self.log_scale + math.log(abs(x))
            return math.copysign(math.exp(log) if log < 709.78 else math.inf, x)
        return scaled(self.mean, 1), scaled(self.m2 / self.n, 2)


@dataclass
class PairResult:
    """Means over the unordered pairs k < l: ``cdnv[p]`` per distance exponent p, and
    ``kernels[name] = (mean, variance)`` (population variance over the pairs)."""

    cdnv: dict[float, float] = field(default_factory=dict)
    kernels: dict[str, tuple[float, float]] = field(default_factory=dict)


def _kernel_values(name: str, dist2: Tensor, riesz_s: float) -> Tensor:
    """The kernel on squared distances; for "riesz", the log of its magnitude, -(s/2) log d^2
    (its sign is -1 for s < 0, else +1: the kernel is 1 at s = 0, theory.md 5.10)."""
    if name == "distance":
        return dist2.sqrt()
    if name == "log":  # log(1 / ||u_k - u_l||)
        return -0.5 * dist2.log()
    return (-0.5 * riesz_s) * dist2.log()  # riesz


def pair_reductions(
    op: str,
    centred: Tensor,
    tile: int,
    variances: Tensor | None = None,
    exponents: tuple[float, ...] = (),
    kernels: tuple[str, ...] = (),
    riesz_s: float | None = None,
) -> PairResult:
    """``centred`` (K, d) float64 class means minus any common point (distances do not depend
    on it; the GNC2 kernels take directions from it, so pass μ_k - μ_G). ``variances`` (K,) v_k
    for CDNV at each exponent in ``exponents``; ``kernels`` a subset of KERNELS evaluated on the
    unit vectors u_k = (μ_k - μ_G)/||μ_k - μ_G||, with the Riesz exponent ``riesz_s``
    (default d - 2).

    Each tile of rows r0:r1 meets the columns in two blocks: the square diagonal block r0:r1,
    where only its upper triangle counts, and the rest r1:K, where every entry is a pair, so
    the large block needs no mask. Tiles are cut to at most 256 rows so the masked block stays
    small."""
    K, d = centred.shape
    s = float(d - 2 if riesz_s is None else riesz_s)
    sq = (centred * centred).sum(1)
    norms = sq.sqrt()
    if kernels:
        zero = (norms == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"{op}: classes {zero} have a mean equal to the global mean; "
                             f"their direction, and so the hyperspherical kernels, is undefined")
    # Without CDNV only directions matter: the Gram matrix of the unit vectors is the cosines.
    X = centred if exponents else centred / norms[:, None]
    sums = {p: 0.0 for p in exponents}
    moments = {name: _Moments() for name in kernels}
    step = min(tile, _SWEEP_ROWS)
    for r0 in range(0, K - 1, step):
        r1 = min(r0 + step, K)
        for c0, c1 in ((r0, r1), (r1, K)):
            if c1 <= c0:
                continue
            diagonal = c0 == r0
            pair = (torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=X.device).triu_(1)
                    if diagonal else None)
            gram = X[r0:r1] @ X[c0:c1].T
            if exponents:
                _cdnv_block(op, gram, sq, variances, exponents, sums, pair, r0, r1, c0, c1)
                if kernels:
                    gram.div_(norms[r0:r1, None]).div_(norms[None, c0:c1])  # now the cosines
            if kernels:
                _kernel_block(op, gram, kernels, s, moments, pair, r0, c0)
    pairs = K * (K - 1) / 2
    return PairResult(
        cdnv={p: total / pairs for p, total in sums.items()},
        kernels={name: m.result() for name, m in moments.items()},
    )


def _first_pair(close: Tensor, r0: int, c0: int) -> list[int]:
    k, l = close.nonzero()[0].tolist()
    return [k + r0, l + c0]


def _cdnv_block(op, gram, sq, variances, exponents, sums, pair, r0, r1, c0, c1) -> None:
    """Adds sum over the block's pairs of (v_k + v_l) / (2 ||μ_k - μ_l||^(2p)) to ``sums[p]``."""
    sq_r, sq_c = sq[r0:r1, None], sq[None, c0:c1]
    dist2 = torch.add(sq_c, gram, alpha=-2.0).add_(sq_r).clamp_min_(0.0)
    # Below the rounding of the expansion two means cannot be told apart. The exact test runs
    # only where the block's smallest distance comes near that bound (always on the diagonal
    # block, whose own diagonal is zero).
    bound = 16 * _EPS * float(torch.maximum(sq_r.max(), sq_c.max()))
    if pair is not None or float(dist2.min()) <= bound:
        same = dist2 <= 8 * _EPS * (sq_r + sq_c)
        if pair is not None:
            same &= pair
        if bool(same.any()):
            raise ValueError(f"{op}: classes {_first_pair(same, r0, c0)} have the same "
                             f"mean; their CDNV is undefined")
    v_r, v_c = variances[r0:r1], variances[c0:c1]
    for p in exponents:
        inv = dist2.reciprocal() if p == 1 else dist2.pow(-p)
        if pair is not None:
            inv = torch.where(pair, inv, 0.0)
        # sum_kl (v_k + v_l) inv_kl = v_r . (row sums) + (column sums) . v_c: no (v_k + v_l) grid
        sums[p] += 0.5 * float(v_r @ inv.sum(1) + inv.sum(0) @ v_c)


def _kernel_block(op, cos, kernels, s, moments, pair, r0, c0) -> None:
    """Adds the block's pairs to each kernel's moments; ``cos`` is overwritten."""
    udist2 = cos.mul_(-2.0).add_(2.0).clamp_min_(0.0)  # ||u_k - u_l||^2
    if any(name != "distance" for name in kernels) and (
            pair is not None or float(udist2.min()) <= 8 * _EPS):
        same = udist2 <= 8 * _EPS
        if pair is not None:
            same &= pair
        if bool(same.any()):
            raise ValueError(
                f"{op}: classes {_first_pair(same, r0, c0)} have centred means in the same "
                f"direction; the log and Riesz kernels are infinite there")
    for name in kernels:
        values = _kernel_values(name, udist2, s)
        moments[name].add(values[pair] if pair is not None else values.reshape(-1),
                          log_magnitude=name == "riesz", sign=1.0 if s >= 0 else -1.0)

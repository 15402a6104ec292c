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
        mb = values.mean()
        m2b = ((values - mb) ** 2).sum()
        mb, m2b = float(mb), float(m2b)
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
    (its sign is that of s)."""
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
    (default d - 2)."""
    K, d = centred.shape
    s = float(d - 2 if riesz_s is None else riesz_s)
    sq = (centred * centred).sum(1)
    norms = sq.sqrt()
    if kernels:
        zero = (norms == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"{op}: classes {zero} have a mean equal to the global mean; "
                             f"their direction, and so the hyperspherical kernels, is undefined")
    sums = {p: torch.zeros((), dtype=torch.float64, device=centred.device) for p in exponents}
    moments = {name: _Moments() for name in kernels}
    for r0 in range(0, K - 1, tile):
        r1 = min(r0 + tile, K)
        gram = centred[r0:r1] @ centred[r0:].T  # rows r0:r1 against columns r0:K
        rows = torch.arange(r0, r1, device=centred.device)[:, None]
        cols = torch.arange(r0, K, device=centred.device)[None, :]
        pair = cols > rows  # the upper triangle: each unordered pair once
        chunks = (slice(0, r1 - r0), slice(r1 - r0, None))  # the diagonal block, the rest
        if exponents:
            dist2 = (sq[r0:r1, None] + sq[None, r0:] - 2.0 * gram).clamp_min_(0.0)
            # below the rounding of the expansion two means cannot be told apart
            same = pair & (dist2 <= 8 * _EPS * (sq[r0:r1, None] + sq[None, r0:]))
            if bool(same.any()):
                k, l = same.nonzero()[0].tolist()
                raise ValueError(f"{op}: classes {[k + r0, l + r0]} have the same mean; their "
                                 f"CDNV is undefined")
            spread = 0.5 * (variances[r0:r1, None] + variances[None, r0:])
            for p in exponents:
                ratio = spread / (dist2 if p == 1 else dist2.pow(p))
                sums[p] += torch.where(pair, ratio, 0.0).sum()
        if kernels:
            cos = gram / (norms[r0:r1, None] * norms[None, r0:])
            udist2 = (2.0 - 2.0 * cos).clamp_min_(0.0)
            if any(name != "distance" for name in kernels):
                same = pair & (udist2 <= 8 * _EPS)
                if bool(same.any()):
                    k, l = same.nonzero()[0].tolist()
                    raise ValueError(
                        f"{op}: classes {[k + r0, l + r0]} have centred means in the same "
                        f"direction; the log and Riesz kernels are infinite there")
            for name in kernels:
                values = _kernel_values(name, udist2, s)
                for chunk in chunks:  # the diagonal block's upper triangle, then all the rest
                    block, mask = values[:, chunk], pair[:, chunk]
                    moments[name].add(block[mask] if chunk.start == 0 else block.reshape(-1),
                                      log_magnitude=name == "riesz",
                                      sign=math.copysign(1.0, s))
    pairs = K * (K - 1) / 2
    return PairResult(
        cdnv={p: float(total) / pairs for p, total in sums.items()},
        kernels={name: m.result() for name, m in moments.items()},
    )

"""Metrics over pairs of class means at vocabulary scale (theory.md 5.10): the
hyperspherical-uniformity form of NC2 (GNC2) and the class interference grid, in tiles of rows
of the means' Gram matrix, never a K x K x d tensor. CDNV (with its distance exponent) is
:func:`ncfast.metrics.cdnv`, on the same tiled sweep."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ._pairs import KERNELS, check_tile, pair_reductions
from .core import Classes, ClassStatistics, _name, _prepare


class KernelStats(NamedTuple):
    """Mean and (population) variance of a kernel over the K(K-1)/2 pairs of classes."""

    mean: float
    variance: float


def _check_kernels(op: str, kernels) -> tuple[str, ...]:
    if isinstance(kernels, str):
        kernels = (kernels,)
    kernels = tuple(kernels)
    bad = [k for k in kernels if k not in KERNELS]
    if bad or not kernels:
        raise ValueError(f"{op}: kernels must be a non-empty subset of {list(KERNELS)}, "
                         f"got {list(kernels)}")
    return kernels


def gnc2(
    stats: ClassStatistics,
    kernels: str | tuple[str, ...] = KERNELS,
    global_mean: str = "weighted",
    classes: Classes = None,
    tile: int | None = None,
    riesz_s: float | None = None,
) -> dict[str, KernelStats]:
    """GNC2, hyperspherical uniformity of the class means (Liu et al. 2023; theory.md 5.10):
    with u_k = (μ_k - μ_G)/‖μ_k - μ_G‖, the mean and variance over pairs k < l of

    - ``"distance"``: ‖u_k - u_l‖ (largest and uniform at a simplex ETF);
    - ``"log"``: log(1/‖u_k - u_l‖) (the logarithmic energy);
    - ``"riesz"``: sign(s) ‖u_k - u_l‖^(-s), s = ``riesz_s`` (default d - 2, as the reference
      library takes it, with its sign(s) = +1 at s = 0: the kernel is then 1; for large d the
      values can overflow float64 unless the directions are well spread, so pass a smaller s
      for a finite energy).

    A uniform, collapsed set of directions has zero variance for every kernel. All kernels come
    from one tiled sweep (``tile`` rows of the K x K Gram matrix at a time, default 2^24
    entries), in float64. Returns ``{kernel: KernelStats(mean, variance)}``. Raises ValueError
    when a centred mean is zero (no direction), or for log/Riesz when two directions coincide.
    """
    op = _name("gnc2")
    kernels = _check_kernels(op, kernels)
    if riesz_s is not None and (isinstance(riesz_s, bool) or not isinstance(riesz_s, (int, float))
                                or not math.isfinite(riesz_s)):
        raise ValueError(f"{op}: riesz_s must be a finite number or None (d - 2), got "
                         f"{riesz_s!r}")
    prep = _prepare(op, stats, global_mean, classes)
    tile = check_tile(op, tile, prep.means.shape[0])
    result = pair_reductions(op, prep.Mc.T, tile, kernels=kernels, riesz_s=riesz_s)
    return {name: KernelStats(*result.kernels[name]) for name in kernels}


def interference_tiles(
    stats: ClassStatistics,
    tile: int | None = None,
    cosine: bool = False,
    global_mean: str = "weighted",
    classes: Classes = None,
) -> Iterator[tuple[int, Tensor]]:
    """The class interference grid ⟨μ_k - μ_G, μ_l - μ_G⟩ (K x K; with ``cosine=True`` the
    cosines of those vectors), one block of ``tile`` rows at a time: yields ``(first_row,
    block)`` with ``block`` (rows, K) float64 on the statistics' device. Memory O(tile K): use it
    to reduce or plot the grid when K x K does not fit. Bad arguments raise at the call, not
    at the first block."""
    op = _name("interference_tiles")
    prep = _prepare(op, stats, global_mean, classes)
    X = prep.Mc.T
    K = X.shape[0]
    tile = check_tile(op, tile, K)
    if cosine:
        norms = torch.linalg.vector_norm(X, dim=1)
        zero = (norms == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"{op}: classes {zero} have a mean equal to the global mean; "
                             f"their cosines are undefined")
        X = X / norms[:, None]
    return ((r0, X[r0:r0 + tile] @ X.T) for r0 in range(0, K, tile))


def interference_grid(
    stats: ClassStatistics,
    tile: int | None = None,
    cosine: bool = False,
    global_mean: str = "weighted",
    classes: Classes = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The whole K x K interference grid of :func:`interference_tiles` in ``dtype`` (default
    float32: 10 GB at K = 50,000), filled tile by tile from float64 blocks."""
    op = _name("interference_grid")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: dtype must be torch.float32 or torch.float64, got {dtype}")
    grid = None
    for r0, block in interference_tiles(stats, tile, cosine, global_mean, classes):
        if grid is None:
            K = block.shape[1]
            grid = torch.empty(K, K, dtype=dtype, device=block.device)
        grid[r0:r0 + block.shape[0]] = block
    return grid

"""Symmetric Gram products A^T A on their upper block triangle only: with n column blocks the
products cost (n + 1) / 2n of the full one (5/8 with 4 blocks). Used by ClassStats (an
accumulated Gram) and the fused linear loss (W^T W)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

# Column blocks are at least MIN_BLOCK wide (GEMMs that narrow still run near peak when the inner
# dimension is in the thousands) and at most MAX_BLOCKS.
MIN_BLOCK = 128
MAX_BLOCKS = 4


def upper_blocks(dim: int, max_blocks: int = MAX_BLOCKS) -> list[tuple[int, int]]:
    """[(start, stop), ...] column blocks of a dim x dim Gram matrix."""
    n = max(1, min(max_blocks, dim // MIN_BLOCK))
    edges = [round(i * dim / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def symmetric_gram(a: Tensor, product: Callable[[Tensor, Tensor], Tensor],
                   max_blocks: int = MAX_BLOCKS) -> Tensor:
    """a^T a, (d, d), from the products ``product(x, y) = x @ y`` of the upper block triangle;
    the lower triangle is filled in by transposed copies."""
    d = a.shape[1]
    out = None
    for start, stop in upper_blocks(d, max_blocks):
        part = product(a[:, start:stop].T, a[:, start:])  # rows start:stop, columns start:
        if out is None:
            out = part.new_empty(d, d)
        out[start:stop, start:] = part
        out[stop:, start:stop] = part[:, stop - start:].T
    return out


def fill_lower(upper: Tensor) -> Tensor:
    """A full symmetric copy of a Gram matrix whose upper block triangle was accumulated."""
    blocks = upper_blocks(upper.shape[0])
    if len(blocks) == 1:
        return upper
    full = upper.clone()
    for start, stop in blocks[1:]:
        full[start:stop, :start] = upper[:start, start:stop].T
    return full

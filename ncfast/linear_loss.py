"""Fused linear head + rescaled-MSE loss (theory.md 2.1, 2.4): the loss of z = x W^T + b without
the (N, K) logits, either from the Gram matrix W^T W ("gram") or one sample chunk of logits at a
time ("chunked"). Functional form, nn.Module and the two custom ops behind them."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._gram import symmetric_gram
from ._ops import _describe, _plain_eager, loss_dtype, rescaled_mse_per_sample
from .losses import check_loss_options

_OP = "ncfast.linear_rescaled_mse_loss"
METHODS = ("auto", "gram", "chunked")
# Default rows per chunk: about 2^24 logits (64 MB in fp32), but never fewer than 1024 rows, so
# each chunk's products stay large enough to run at full speed.
CHUNK_LOGITS = 1 << 24
MIN_CHUNK_ROWS = 1024
# Cancellation guard of the gram path: a row whose loss is below 1/R of the size T_i of the terms
# that cancel is recomputed from its own logits. With the accumulation unit u (2^-53 for float64
# inputs, 2^-24 otherwise) a kept row's relative error is about u * R: 2^-40 for float64, 2^-18
# for float32, 2^-13 for bf16/fp16, each well under the rounding of the inputs' own dtype.
GUARD_RATIO = {torch.float64: 2.0**13, torch.float32: 2.0**6, torch.bfloat16: 2.0**11,
               torch.float16: 2.0**11}
# Default guard budget off the CPU: max(64, N // 8) rows per call (see guard_budget_for).
MIN_GUARD_BUDGET = 64
GUARD_BUDGET_FRACTION = 8

_ops = torch.ops.ncfast


# ------------------------------------------------------------------------------- checks

def _check_options(k, M, normalize: str, reduction: str, method: str, chunk_size,
                   ignore_index, guard_budget=None) -> tuple[float, float, int]:
    """check_loss_options plus this loss's own options; returns its (k, M, ignore_index)."""
    options = check_loss_options(k, M, normalize, reduction, op=_OP, ignore_index=ignore_index)
    if method not in METHODS:
        raise ValueError(f"{_OP}: method must be 'auto', 'gram' or 'chunked', got {method!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"{_OP}: chunk_size must be an int or None, got "
                            f"{type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"{_OP}: chunk_size must be >= 1, got {chunk_size}")
    if guard_budget is not None:
        if isinstance(guard_budget, bool) or not isinstance(guard_budget, int):
            raise TypeError(f"{_OP}: guard_budget must be an int or None, got "
                            f"{type(guard_budget).__name__}")
        if guard_budget < 1:
            raise ValueError(f"{_OP}: guard_budget must be >= 1, got {guard_budget}")
    return options


def _check_follows_features(name: str, t: Tensor, features: Tensor,
                            same_dtype: bool = True) -> None:
    if same_dtype and t.dtype != features.dtype:
        raise TypeError(f"{_OP}: {name} must have the dtype of features ({features.dtype}), "
                        f"got {t.dtype}")
    if t.device != features.device:
        raise ValueError(f"{_OP}: {name} must be on the same device as features "
                         f"({features.device}), got {t.device}")


def check_linear_args(features: Tensor, weight: Tensor, bias: Tensor | None,
                      target: Tensor) -> None:
    """Shape, dtype and device rules, shared by the public function and the fakes (so the meta
    device and torch.compile raise the same messages)."""
    for name, t in (("features", features), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor, got {type(t).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{_OP}: features must be 2-D (batch, dim), got {_describe(features)}")
    if features.dtype not in GUARD_RATIO:
        raise TypeError(
            f"{_OP}: features must be float32, float64, bfloat16 or float16, got {features.dtype}"
        )
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be 2-D (classes, dim), got {_describe(weight)}")
    _check_follows_features("weight", weight, features)
    if weight.shape[0] < 1:
        raise ValueError(f"{_OP}: weight must have at least one class (row), got "
                         f"{_describe(weight)}")
    if weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"{_OP}: features and weight must have the same width (dim): features has "
            f"{features.shape[1]} columns, weight has {weight.shape[1]}"
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{_OP}: bias must be a tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{_OP}: bias must be 1-D of length {weight.shape[0]} (one per "
                             f"class), got shape {list(bias.shape)}")
        _check_follows_features("bias", bias, features)
    if target.dim() != 1:
        raise ValueError(f"{_OP}: target must be 1-D (batch,), got {_describe(target)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_OP}: target must be int64 or int32, got {target.dtype}")
    if target.shape[0] != features.shape[0]:
        raise ValueError(
            f"{_OP}: target must have one label per row of features: features has "
            f"{features.shape[0]} rows, target has {target.shape[0]}"
        )
    _check_follows_features("target", target, features, same_dtype=False)


def _target_rows(target: Tensor, K: int, ignore_index: int):
    """(counted, safe): rows that count (not ignored, and a label in [0, K): an unchecked CUDA
    label outside the range counts nowhere, as in the plain loss); labels safe to gather with
    (0 where the row does not count)."""
    counted = (target != ignore_index) & (target >= 0) & (target < K)
    return counted, torch.where(counted, target, 0).long()


def _check_labels(target: Tensor, K: int, ignore_index: int) -> None:
    """The label rule: raises at once for CPU labels; on CUDA the check runs on the device and a
    bad label is raised later (ncfast.check_errors), with no host sync here."""
    _ops.check_labels(target, K, ignore_index, _OP)


def select_method(N: int, K: int, d: int) -> str:
    """The rule of ``method="auto"``: "gram" when d (N + K) < N K, else "chunked".

    The Gram path costs about 4 d^2 (N + K) flops for loss and gradients, the logits path
    (eager, or chunked) 6 to 8 N K d; the rule takes the Gram path when it needs less than half
    of the logits path's flops, i.e. roughly when K > d and N > d. It does not depend on the
    dtype: both paths accumulate in float32 or better, and the Gram path's precision is kept by
    its runtime guard (see :func:`linear_rescaled_mse_loss`)."""
    return "gram" if d * (N + K) < N * K else "chunked"


def default_chunk_size(K: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_LOGITS // max(K, 1))


def guard_budget_for(guard_budget: int | None, N: int, device: torch.device) -> int | None:
    """The most rows the gram path's guard recomputes in a call of N rows: ``guard_budget``
    (at most N); by default (None) max(64, N // 8), or no limit (None) on the CPU, where reading
    the flags on the host costs nothing."""
    if guard_budget is None:
        if device.type == "cpu":
            return None
        guard_budget = max(MIN_GUARD_BUDGET, N // GUARD_BUDGET_FRACTION)
    return min(guard_budget, N)


# ------------------------------------------------------------------- mixed-precision products

_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) on CUDA


def _can_mm_to(a: Tensor, acc: torch.dtype) -> bool:
    return (_MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
            and acc == torch.float32)


def _mm_to(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b (both of the inputs' dtype) with an `acc` result: cuBLAS's float32 output for
    bf16/fp16 on CUDA (no rounding of the product), an upcast elsewhere."""
    if a.dtype == acc:
        return a @ b
    if _can_mm_to(a, acc):
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def _mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with a in the inputs' dtype and b already in the accumulate dtype (float32): on CUDA
    b is split into three bf16 terms (together exact to about 2^-24) so the product runs on the
    tensor cores with float32 accumulation; elsewhere a is upcast."""
    acc = b.dtype
    if a.dtype == acc:
        return a @ b
    if a.dtype == torch.bfloat16 and _can_mm_to(a, acc):
        hi = b.to(a.dtype)
        rest = b - hi.to(acc)
        mid = rest.to(a.dtype)
        lo = (rest - mid.to(acc)).to(a.dtype)
        out = torch.mm(a, hi, out_dtype=acc)
        out += torch.mm(a, mid, out_dtype=acc)
        out += torch.mm(a, lo, out_dtype=acc)
        return out
    return a.to(acc) @ b


def _rows_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    return (a.to(acc) * b.to(acc)).sum(1)


def _weight_vec(weight: Tensor, v: Tensor) -> Tensor:
    """W v (K,) in v's dtype."""
    acc = v.dtype
    if weight.dtype == acc:
        return weight @ v
    if weight.dtype == torch.bfloat16 and _can_mm_to(weight, acc):
        return _mm_acc(weight, v[:, None])[:, 0]
    return weight.to(acc) @ v


def _in_range(S: Tensor, v: Tensor, dtype: torch.dtype):
    """(S, v) rounded to ``dtype`` for the weight gradient's product, and the factor to multiply
    that product by (None: none). float16 tops out at 65504, where S = X^T diag(gp) X does not
    (features of size 200, or reduction="sum" over a large batch) though the gradient may: both
    are divided by a power of two (exact) chosen on the device, 1 unless their largest entry
    exceeds 2^14."""
    if dtype != torch.float16 or S.numel() == 0:
        return S.to(dtype), v.to(dtype), None
    largest = torch.maximum(S.abs().amax(), v.abs().amax())
    unscale = torch.exp2((torch.log2(largest).ceil() - 14).clamp_min(0))
    return (S / unscale).to(dtype), (v / unscale).to(dtype), unscale


# ---------------------------------------------------------------------------- gram formulas

def _target_terms(zy: Tensor, has_target: Tensor, k: float, M: float):
    """(α-1) z_y^2 - 2αM z_y + αM^2 (the loss minus ‖z‖^2) and the sum of their magnitudes."""
    value = (k - 1) * zy * zy - 2 * k * M * zy + k * M * M
    size = abs(k - 1) * zy * zy + 2 * k * abs(M) * zy.abs() + k * M * M
    return torch.where(has_target, value, 0), torch.where(has_target, size, 0)


def _guard(loss: Tensor, sq_norm: Tensor, size: Tensor, valid: Tensor,
           dtype: torch.dtype) -> Tensor:
    """Rows to recompute from their logits: loss < T / R with T = |‖z‖^2| + size."""
    return valid & ((sq_norm.abs() + size) > GUARD_RATIO[dtype] * loss)


def _within_budget(flagged: Tensor, budget: int | None) -> Tensor:
    """The rows recomputed of those the guard flagged: all (no budget), or the first ``budget``,
    the number flagged checked against it by an op (raised at once on CPU; on CUDA recorded on
    the device and raised by the next ncfast call or check_errors(): no host sync)."""
    N = flagged.shape[0]
    if budget is None or budget >= N:
        return flagged
    if not hasattr(_ops, "check_guard_budget"):
        from . import _stale_extension_error
        raise _stale_extension_error(["check_guard_budget"])
    ranks = flagged.cumsum(0)
    _ops.check_guard_budget(ranks[-1], budget)
    return flagged & (ranks <= budget)


def _recomputed_rows(exact: Tensor, budget: int | None) -> Tensor:
    """Indices of the rows in ``exact``: as many as there are (a host sync on CUDA) with no
    budget; else a fixed ``budget`` of them, padded with N (no sync)."""
    if budget is None:
        return exact.nonzero().flatten()
    return torch.nonzero_static(exact, size=budget, fill_value=exact.shape[0]).flatten()


def _row_chunks(rows: Tensor, target: Tensor, ignore_index: int, chunk: int):
    """(r, t) per chunk of ``rows``: indices safe to gather with (padding N -> N - 1) and their
    labels, ignore_index on the padding, so that a padding slot's loss and gradient are 0 (and
    the chunk is added into the outputs with index_put_(accumulate=True))."""
    N = target.shape[0]
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        padding = r >= N
        r = r.clamp(max=N - 1)
        yield r, target.index_select(0, r).long().masked_fill(padding, ignore_index)


def _gram_forward(X, W, b, target, k, M, ignore_index, chunk, budget):
    N, K = X.shape[0], W.shape[0]
    acc = loss_dtype(X.dtype)
    counted, safe = _target_rows(target, K, ignore_index)
    # The first K x d x d product. With K >> d each block still has a long inner dimension, so
    # 8 blocks (9/16 of the flops) beat 4: 3.54 ms against 3.91 for 131072 x 4096 on the H200.
    G = symmetric_gram(W, lambda a, b: _mm_to(a, b, acc), max_blocks=8)
    # saved[:N] = X G + 2 1 (W^T b)^T: x^T G x + 2 b^T W x is then one row dot; saved[N] = W^T b.
    saved = X.new_empty(N + 1, X.shape[1], dtype=acc)
    saved[:N] = _mm_acc(X, G)
    saved[N] = 0
    if b is not None:
        b_acc = b.to(acc)
        saved[N] = _mm_to(b[None, :], W, acc)[0]  # W^T b, exact in float32 for bf16 too
        saved[:N] += 2 * saved[N]
    sq_norm = _rows_dot(saved[:N], X, acc)
    if b is not None:
        sq_norm += (b_acc * b_acc).sum()
    zy = _rows_dot(X, W.index_select(0, safe), acc)
    if b is not None:
        zy += b_acc.index_select(0, safe)
    value, size = _target_terms(zy, counted, k, M)
    loss = sq_norm + value
    exact = _within_budget(_guard(loss, sq_norm, size, counted, X.dtype), budget)
    loss = torch.where(counted & ~exact, loss, 0)
    rows = _recomputed_rows(exact, budget)
    for r, t in _row_chunks(rows, target, ignore_index, chunk):
        z = F.linear(X.index_select(0, r), W, b)
        loss.index_put_((r,), _ops.rescaled_mse(z, t, k, M, ignore_index), accumulate=True)
    return loss, saved, exact, rows


def _gram_backward(g, X, W, b, target, saved, exact, k, M, ignore_index, chunk, budget, needs,
                   exact_rows=None):
    """Gradients of sum_i g_i loss_i without logits (theory.md 2.4, fused linear head): with
    gp_i = 2 g_i on counted rows and u_i = (α-1) z_iy - αM,
        grad_X = gp ⊙ (X G + 1 (W^T b)^T + u ⊙ W[y])
        grad_W = W (X^T diag(gp) X) + b (X^T gp)^T + scatter_y(gp u x)
        grad_b = W (X^T gp) + b sum(gp) + scatter_y(gp u).
    Rows the forward recomputed (`exact`) go through their logits instead (`exact_rows`, their
    indices, when the forward's list was kept; else read from `exact` with the same budget)."""
    N, K = X.shape[0], W.shape[0]
    acc = saved.dtype
    need_x, need_w, need_b = needs
    counted, safe = _target_rows(target, K, ignore_index)
    gp = torch.where(counted & ~exact, 2 * g, 0)
    w_y = W.index_select(0, safe)
    b_acc = b.to(acc) if b is not None else None
    zy = _rows_dot(X, w_y, acc)
    if b is not None:
        zy += b_acc.index_select(0, safe)
    u = torch.where(counted, (k - 1) * zy - k * M, 0)
    c = gp * u

    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = saved[:N] - saved[N]  # X G + 1 (W^T b)^T, from the forward
        grad_x += u[:, None] * w_y.to(acc)
        grad_x *= gp[:, None]
    if need_w or need_b:
        v = _mm_acc(X.T, gp[:, None])[:, 0]  # X^T gp
    if need_w:
        S = _mm_acc(X.T, gp[:, None] * X.to(acc))  # X^T diag(gp) X, float32 even for bf16
        # Below, the second K x d x d product is added in place onto b v^T. Every way to add b v^T
        # costs a pass over K x d; this one measured fastest on the H200 (131072 x 4096 bf16:
        # 7.6 ms, against 7.7 for addr_ and 7.8 for a rank-1 addmm_; W S alone 5.9).
        if X.dtype == acc:
            grad_w = W @ S if b is None else torch.outer(b, v).addmm_(W, S)
            # index_put_ rather than index_add_: the same sum, several times faster on CPU
            grad_w.index_put_((safe,), c[:, None] * X, accumulate=True)
        else:
            # The product is rounded to the weight's dtype, and the rows of the labelled classes,
            # where its terms cancel in the collapsed regime, are recomputed in float32: each
            # class's scatter is summed once (at its first sample's row) and added before the
            # single rounding.
            S_w, v_w, unscale = _in_range(S, v, W.dtype)
            grad_w = W @ S_w if b is None else torch.outer(b, v_w).addmm_(W, S_w)
            if unscale is not None:
                grad_w.mul_(unscale)
            first = torch.full((K,), N, dtype=torch.long, device=X.device).scatter_reduce_(
                0, safe, torch.arange(N, device=X.device), "amin")
            per_class = torch.zeros(N, X.shape[1], dtype=acc, device=X.device).index_put_(
                (first.index_select(0, safe),), c[:, None] * X.to(acc), accumulate=True)
            rows = _mm_acc(w_y, S) + per_class.index_select(0, first.index_select(0, safe))
            if b is not None:
                rows += b_acc.index_select(0, safe)[:, None] * v
            grad_w.index_copy_(0, safe, rows.to(W.dtype))
    if need_b:
        grad_b = _weight_vec(W, v) + b_acc * gp.sum()
        grad_b.index_put_((safe,), c, accumulate=True)

    rows = _recomputed_rows(exact, budget) if exact_rows is None else exact_rows
    for r, t in _row_chunks(rows, target, ignore_index, chunk):
        xr = X.index_select(0, r)
        gz = _ops.rescaled_mse_backward(g.index_select(0, r), F.linear(xr, W, b), t, k, M,
                                        ignore_index)
        if need_x:  # onto zeros: gp is 0 on these rows
            grad_x.index_put_((r,), (gz @ W).to(acc), accumulate=True)
        if need_w:
            grad_w.addmm_(gz.T, xr)
        if need_b:
            grad_b += gz.sum(0, dtype=acc)
    return (grad_x.to(X.dtype) if need_x else None, grad_w,
            grad_b.to(X.dtype) if need_b else None)


# ------------------------------------------------------------------------- chunked formulas

def _chunked_forward(X, W, b, target, k, M, ignore_index, chunk):
    N, K = X.shape[0], W.shape[0]
    loss = X.new_empty(N, dtype=loss_dtype(X.dtype))
    for start in range(0, N, chunk):
        z = F.linear(X[start:start + chunk], W, b)
        loss[start:start + chunk] = _ops.rescaled_mse(z, target[start:start + chunk], k, M,
                                                      ignore_index)
    return loss


def _chunked_backward(g, X, W, b, target, k, M, ignore_index, chunk, needs):
    """The logits of each chunk are recomputed (never saved): grad_z by the plain loss's backward
    op, then grad_X = grad_z W, grad_W += grad_z^T X, grad_b += grad_z^T 1."""
    N, K = X.shape[0], W.shape[0]
    need_x, need_w, need_b = needs
    grad_x = X.new_empty(X.shape) if need_x else None
    grad_w = W.new_zeros(W.shape) if need_w else None
    grad_b = X.new_zeros(K, dtype=loss_dtype(X.dtype)) if need_b else None
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        xc = X[start:stop]
        gz = _ops.rescaled_mse_backward(g[start:stop], F.linear(xc, W, b), target[start:stop],
                                        k, M, ignore_index)
        if need_x:
            torch.mm(gz, W, out=grad_x[start:stop])
        if need_w:
            grad_w.addmm_(gz.T, xc)
        if need_b:
            grad_b += gz.sum(0, dtype=grad_b.dtype)
    return grad_x, grad_w, grad_b.to(X.dtype) if need_b else None


# ------------------------------------------------------------------------------------- ops

def _forward(features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, k: float,
             M: float, ignore_index: int, method: str, chunk_size: int,
             guard_budget: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample unnormalised loss of z = features W^T + bias (0 on rows that do not count), in
    the accumulate dtype; also, for the backward, X W^T W + 2 (W^T bias) rows with W^T bias
    appended ((N + 1, d)), the mask of the rows the guard recomputed from their logits and their
    indices (padded with N to the budget if there is one; all empty for method "chunked")."""
    _check_labels(target, weight.shape[0], ignore_index)
    if method == "gram":
        budget = guard_budget_for(guard_budget, features.shape[0], features.device)
        return _gram_forward(features, weight, bias, target, k, M, ignore_index, chunk_size,
                             budget)
    loss = _chunked_forward(features, weight, bias, target, k, M, ignore_index, chunk_size)
    acc = loss.dtype
    return (loss, features.new_empty(0, 0, dtype=acc), features.new_empty(0, dtype=torch.bool),
            features.new_empty(0, dtype=torch.long))


def _backward_first_order(grad, features, weight, bias, target, saved, exact, k, M,
                          ignore_index, method, chunk_size, guard_budget, need_features,
                          need_weight, need_bias, exact_rows=None
                          ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """First-order gradients (features, weight, bias) of sum_i grad_i loss_i (None where not
    asked for)."""
    needs = (need_features, need_weight, need_bias and bias is not None)
    if method == "gram":
        budget = guard_budget_for(guard_budget, features.shape[0], features.device)
        return _gram_backward(grad, features, weight, bias, target, saved, exact, k, M,
                              ignore_index, chunk_size, budget, needs, exact_rows)
    return _chunked_backward(grad, features, weight, bias, target, k, M, ignore_index,
                             chunk_size, needs)


# Custom ops: what torch.compile sees. Eager calls go through _LinearLoss below instead: calling
# a Python custom op imports torch._dynamo and sympy (about 2 s on first use), and adds a
# dispatcher round trip in Python per call.

@torch.library.custom_op("ncfast::linear_rescaled_mse", mutates_args=())
def linear_rescaled_mse_op(
    features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, k: float,
    M: float, ignore_index: int, method: str, chunk_size: int, guard_budget: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """See _forward (the row indices left out: the backward reads them from the mask)."""
    check_linear_args(features, weight, bias, target)
    return _forward(features, weight, bias, target, k, M, ignore_index, method, chunk_size,
                    guard_budget)[:3]


@linear_rescaled_mse_op.register_fake
def _linear_rescaled_mse_fake(features, weight, bias, target, k, M, ignore_index, method,
                              chunk_size, guard_budget=None):
    check_linear_args(features, weight, bias, target)
    acc = loss_dtype(features.dtype)
    N, d = features.shape
    gram = method == "gram"
    return (features.new_empty(N, dtype=acc),
            features.new_empty((N + 1, d) if gram else (0, 0), dtype=acc),
            features.new_empty(N if gram else 0, dtype=torch.bool))


@torch.library.custom_op("ncfast::linear_rescaled_mse_backward", mutates_args=())
def linear_rescaled_mse_backward_op(
    grad: Tensor, features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
    saved: Tensor, exact: Tensor, k: float, M: float, ignore_index: int, method: str,
    chunk_size: int, need_features: bool, need_weight: bool, need_bias: bool,
    guard_budget: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """_backward_first_order, an output not asked for as an empty tensor. It has no autograd of
    its own: the forward op's autograd calls it only when no graph is being built, and
    differentiates a plain-torch form of the loss otherwise (double backward)."""
    out = _backward_first_order(grad, features, weight, bias, target, saved, exact, k, M,
                                ignore_index, method, chunk_size, guard_budget, need_features,
                                need_weight, need_bias)
    return tuple(t if t is not None else features.new_empty(0) for t in out)


@linear_rescaled_mse_backward_op.register_fake
def _linear_rescaled_mse_backward_fake(grad, features, weight, bias, target, saved, exact, k, M,
                                       ignore_index, method, chunk_size, need_features,
                                       need_weight, need_bias, guard_budget=None):
    check_linear_args(features, weight, bias, target)
    empty = features.new_empty(0)
    return (torch.empty_like(features) if need_features else empty,
            torch.empty_like(weight) if need_weight else empty,
            features.new_empty(weight.shape[0]) if need_bias and bias is not None else empty)


# ------------------------------------------------------------- differentiable plain-torch form

def _per_sample_math(X, W, b, target, k, M, ignore_index, method, chunk, exact=None):
    """The same per-sample loss from differentiable torch ops (and the plain loss, whose own
    autograd covers every torch.func transform): what torch.func transforms, forward-mode AD and
    double backward differentiate. The Gram form computes W^T W in its autograd graph, so its
    gradient costs a third K x d x d product; only higher-order uses come here."""
    K = W.shape[0]
    acc = loss_dtype(X.dtype)
    if method == "chunked":
        parts = [rescaled_mse_per_sample(F.linear(X[s:s + chunk], W, b), target[s:s + chunk],
                                         k, M, ignore_index).to(acc)
                 for s in range(0, X.shape[0], chunk)]
        return torch.cat(parts) if parts else X.new_zeros(0, dtype=acc)
    counted, safe = _target_rows(target, K, ignore_index)
    Xa, Wa = X.to(acc), W.to(acc)
    t = Xa @ (Wa.T @ Wa)
    if b is not None:
        ba = b.to(acc)
        t = t + 2 * (Wa.T @ ba)
    sq_norm = (t * Xa).sum(1)
    zy = (Xa * Wa[safe]).sum(1)
    if b is not None:
        sq_norm = sq_norm + (ba * ba).sum()
        zy = zy + ba[safe]
    value, size = _target_terms(zy, counted, k, M)
    loss = sq_norm + value
    if exact is None:
        exact = _guard(loss.detach(), sq_norm.detach(), size.detach(), counted, X.dtype)
    loss = torch.where(counted & ~exact, loss, 0)
    rows = exact.nonzero().flatten()
    if rows.numel():
        exact_loss = rescaled_mse_per_sample(F.linear(X[rows], W, b), target[rows], k, M,
                                             ignore_index)
        loss = loss.index_put((rows,), exact_loss.to(acc))
    return loss


# ---------------------------------------------------------------------------- autograd wiring

# Non-tensor inputs after the three differentiable ones: target, k, M, ignore_index, method,
# chunk_size, guard_budget (no gradient).
_NO_GRADS = (None,) * 7


def _setup_context(ctx, inputs, output):
    (features, weight, bias, target, ctx.k, ctx.M, ctx.ignore_index, ctx.method, ctx.chunk,
     ctx.guard_budget) = inputs
    _, saved, exact = output
    ctx.mark_non_differentiable(saved, exact)
    ctx.save_for_backward(features, weight, bias, target, saved, exact)


def _backward(ctx, grad, _grad_saved, _grad_exact, through_op=True):
    """The backward of both paths: the custom op's (through_op: the backward op, which tracing
    sees as one opaque call) and _LinearLoss's (its implementation, called directly)."""
    features, weight, bias, target, saved, exact = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    args = (ctx.k, ctx.M, ctx.ignore_index, ctx.method, ctx.chunk)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        if not through_op:
            grads = _backward_first_order(grad, features, weight, bias, target, saved, exact,
                                          *args, ctx.guard_budget, *needs,
                                          exact_rows=ctx.exact_rows)
            return (*grads, *_NO_GRADS)
        grads = _ops.linear_rescaled_mse_backward(grad, features, weight, bias, target, saved,
                                                  exact, *args, *needs, ctx.guard_budget)
        return (*(g if need else None for g, need in zip(grads, needs)), *_NO_GRADS)
    # A graph is being built (double backward): differentiate the plain-torch form, evaluated on
    # the saved inputs themselves so its gradients stay connected to theirs.
    wrt = [t for t, need in zip((features, weight, bias), needs) if need]
    with torch.enable_grad():
        loss = _per_sample_math(features, weight, bias, target, *args,
                                exact=exact if ctx.method == "gram" else None)
        found = iter(torch.autograd.grad(loss, wrt, grad, create_graph=True, allow_unused=True))
    grads = [next(found) if need else None for need in needs]
    grads = [torch.zeros_like(t) if need and g is None else g
             for t, g, need in zip((features, weight, bias), grads, needs)]
    return (*grads, *_NO_GRADS)


torch.library.register_autograd("ncfast::linear_rescaled_mse", _backward,
                                setup_context=_setup_context)


class _LinearLoss(torch.autograd.Function):
    """The eager path: the op's implementation and the same autograd formulas, without the
    custom op's wrapper; the backward reuses the forward's list of recomputed rows."""

    @staticmethod
    def forward(features, weight, bias, target, k, M, ignore_index, method, chunk, guard_budget):
        return _forward(features, weight, bias, target, k, M, ignore_index, method, chunk,
                        guard_budget)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output[:3])
        ctx.mark_non_differentiable(*output[1:])  # replaces _setup_context's list
        ctx.exact_rows = output[3]

    @staticmethod
    def backward(ctx, grad, grad_saved, grad_exact, _grad_rows):
        return _backward(ctx, grad, grad_saved, grad_exact, through_op=False)


# -------------------------------------------------------------------------------- public API

def linear_rescaled_mse_loss(
    features: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    k: float = 1.0,
    M: float = 1.0,
    normalize: str = "sample",
    reduction: str = "mean",
    ignore_index: int = -100,
    method: str = "auto",
    chunk_size: int | None = None,
    guard_budget: int | None = None,
) -> Tensor:
    r"""Rescaled square loss of the linear head z = features W^T + bias, without the (N, K)
    logits: equal, to rounding, to
    ``rescaled_mse_loss(F.linear(features, weight, bias), target, k, M, normalize, reduction,
    ignore_index=ignore_index)``.

    Args:
        features: (N, d) float32, float64, bfloat16 or float16.
        weight: (K, d), bias: optional (K,), both of the dtype of ``features``.
        target: (N,) int64 or int32 labels in [0, K), or ``ignore_index``.
        k: as in :func:`ncfast.rescaled_mse_loss`.
        M: as in :func:`ncfast.rescaled_mse_loss`.
        normalize: as in :func:`ncfast.rescaled_mse_loss`.
        reduction: as in :func:`ncfast.rescaled_mse_loss`.
        ignore_index: as in :func:`ncfast.rescaled_mse_loss`.
        method: ``"gram"``, ``"chunked"`` or ``"auto"``:

            * ``"gram"`` never forms logits (theory.md 2.1): with G = W^T W (d x d),
              loss_i = x^T G x + 2 b^T W x + ‖b‖^2 + (k-1) z_y^2 - 2kM z_y + kM^2 with
              z_y = w_y.x + b_y.
              Loss and gradients cost two K x d x d products (G, and W (X^T diag(g) X) for the
              weight gradient) plus O(N d^2); extra memory is O(N d + d^2) beside the gradients.
            * ``"chunked"`` computes the logits of ``chunk_size`` samples at a time with the
              plain loss, and recomputes them in backward: the flops of the unfused composition
              plus one more N K d product, extra memory O(chunk_size K).
            * ``"auto"``: ``"gram"`` when d (N + K) < N K (then it needs less than half the
              flops of the logits path; roughly K > d and N > d), else ``"chunked"``. The rule
              depends on the shape only (:func:`ncfast.linear_loss.select_method`).
        chunk_size: rows per chunk of logits (chunked method, and the gram path's recomputed
            rows); default max(1024, 2^24 // K).
        guard_budget: the most rows per call that the gram method's guard (below) recomputes
            from their logits. An int (>= 1) gives every device the same sync-free path: the
            first ``guard_budget`` flagged rows (in row order) are recomputed, at the fixed cost
            of ``guard_budget`` rows of logits whatever their number; more flagged rows than
            that is an error (below). Default (None): max(64, N // 8) off the CPU; no limit
            on the CPU, where the flagged rows are found on the host at no cost.

    Precision. Both methods accumulate in float32 (float64 for float64 inputs); bf16/fp16 products
    run with float32 accumulation, and the Gram path keeps G, x^T G x and the gradients' float32
    terms unrounded. One exception: the chunked method adds each chunk's weight gradient into a
    tensor of the weight's dtype (a float32 sum would hold 4 more bytes per weight entry), so
    with bf16/fp16 that gradient is rounded once per chunk and its error grows with the number
    of chunks, N / chunk_size; a larger ``chunk_size`` keeps it near the unfused composition's.
    The Gram identity subtracts terms of size
    T_i = ‖z_i‖^2 + |k-1| z_y^2 + 2k|M z_y| + kM^2 to obtain loss_i, which cancels when the sample
    is near its target (the collapsed regime). The **guard**: every row with loss_i < T_i / R is
    recomputed from its own logits (forward and backward), with R = 2^13 (float64 inputs),
    2^6 (float32), 2^11 (bf16, fp16): a kept row's rounding error is then at most about 2^-40,
    2^-18, 2^-13 of its loss. In a collapsed fp32 training run many rows fall back and the Gram
    path then costs more than ``"chunked"``; "auto" cannot see this in advance.

    Guard budget. When the guard flags more rows than ``guard_budget``, the rows beyond it keep
    the Gram form's rounding, and a ``ValueError`` names the number flagged, the budget and the
    fixes (a larger ``guard_budget``, or ``method="chunked"``), so no row is ever silently
    inaccurate. A CPU call raises it at once, before any gradient exists. On CUDA the count is
    compared on the device and the error is raised, like a bad label, by the first ncfast loss
    call (this call's backward included) that starts after the forward has finished on the
    device, or by :func:`ncfast.check_errors`, which waits for it; the rows' numbers are never
    read on the host. Under torch.func transforms the guard has no budget (it recomputes every
    flagged row, reading their number on the host), and double backward reads the rows the
    forward recomputed on the host.

    Returns the loss in the dtype of ``features`` (shape () or (N,)); empty or all-ignored
    batches give NaN for ``"mean"``. Gradients flow to features, weight and bias; the backward is
    differentiable (double backward, and torch.func ``grad``, ``jvp``, ``vjp`` of ``grad``, i.e.
    Hessian-vector products) and works under ``torch.compile(fullgraph=True)`` for first-order
    training steps. Not supported: ``vmap`` (hence ``torch.func.hessian``), and double backward
    through a compiled function.

    Host synchronisation on CUDA: none, with the default budget (or any int): labels are checked
    on the device, as in the plain loss (see :func:`ncfast.check_errors`), and the guard picks
    its rows on the device (``torch.nonzero_static``) and checks its budget there.
    """
    k, M, ignore_index = _check_options(k, M, normalize, reduction, method, chunk_size,
                                        ignore_index, guard_budget)
    check_linear_args(features, weight, bias, target)
    N, d = features.shape
    K = weight.shape[0]
    if method == "auto":
        method = select_method(N, K, d)
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(K)
    args = (k, M, ignore_index, method, chunk, guard_budget)

    if torch.compiler.is_compiling():
        per_sample = _ops.linear_rescaled_mse(features, weight, bias, target, *args)[0]
    elif _plain_eager():
        per_sample = _LinearLoss.apply(features, weight, bias, target, *args)[0]
    else:  # torch.func transforms, forward-mode AD
        _check_labels(target, K, ignore_index)
        per_sample = _per_sample_math(features, weight, bias, target, *args[:-1])
    if normalize == "element":
        per_sample = per_sample / K
    if reduction == "none":
        return per_sample.to(features.dtype)
    total = per_sample.sum()
    if reduction == "mean":
        total = total / _target_rows(target, K, ignore_index)[0].sum()
    return total.to(features.dtype)


class LinearRescaledMSELoss(nn.Module):
    """Module form of :func:`linear_rescaled_mse_loss`; it holds the options only (the classifier
    is whatever layer the caller owns).

    ``forward(features, weight, target, bias=None)``, e.g.
    ``loss_fn(h, fc.weight, y, fc.bias)``.
    """

    def __init__(
        self,
        k: float = 1.0,
        M: float = 1.0,
        normalize: str = "sample",
        reduction: str = "mean",
        ignore_index: int = -100,
        method: str = "auto",
        chunk_size: int | None = None,
        guard_budget: int | None = None,
    ) -> None:
        super().__init__()
        self.k, self.M, self.ignore_index = _check_options(
            k, M, normalize, reduction, method, chunk_size, ignore_index, guard_budget)
        self.normalize, self.reduction = normalize, reduction
        self.method, self.chunk_size, self.guard_budget = method, chunk_size, guard_budget

    def forward(self, features: Tensor, weight: Tensor, target: Tensor,
                bias: Tensor | None = None) -> Tensor:
        return linear_rescaled_mse_loss(
            features, weight, target, bias, k=self.k, M=self.M, normalize=self.normalize,
            reduction=self.reduction, ignore_index=self.ignore_index, method=self.method,
            chunk_size=self.chunk_size, guard_budget=self.guard_budget,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k:g}, M={self.M:g}, normalize={self.normalize!r}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"method={self.method!r}"
        )

"""Fake (meta) implementations, vmap rules and torch.func autograd of the ncfast ops.

Each loss op is a forward op plus a differentiable backward op (csrc/registration.cpp); their
autograd is registered in C++ (csrc/loss_autograd.cpp), which serves eager calls, direct
`torch.ops.ncfast.*` calls, double backward, opcheck and `torch.compile`. torch (<= 2.14) runs
such ops under no torch.func transform and gives them no forward-mode derivative, so the public
functions take an `autograd.Function` per op while a torch.func transform or forward-mode AD is
active: it adds `setup_context`, `jvp` and a vmap rule, so `grad`, `jvp(grad(...))`, `vmap` and
`hessian` work (`rescaled_mse_per_sample` picks the path).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

_OP = "ncfast.rescaled_mse_loss"
_ops = torch.ops.ncfast


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-sample losses: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _describe(t: Tensor) -> str:
    return f"{t.dim()}-D tensor of shape {list(t.shape)}"


def check_rescaled_mse_args(
    logits: Tensor, target: Tensor, k: float, M: float, grad: Tensor | None = None
) -> None:
    """The checks of csrc/loss_validation.cpp, same order and messages (for the fakes), after
    the Python-only rule that both are tensors."""
    for name, value in (("logits", logits), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor, got {type(value).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{_OP}: logits must be 2-D (batch, classes), got {_describe(logits)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(
            f"{_OP}: logits must be float32, float64, bfloat16 or float16, got {logits.dtype}"
        )
    if logits.shape[1] < 1:
        raise ValueError(f"{_OP}: logits must have at least one class, got {_describe(logits)}")
    if target.dim() != 1:
        raise ValueError(f"{_OP}: target must be 1-D (batch,), got {_describe(target)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_OP}: target must be int64 or int32, got {target.dtype}")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{_OP}: target must have one label per row of logits: logits has "
            f"{logits.shape[0]} rows, target has {target.shape[0]}"
        )
    if target.device != logits.device:
        raise ValueError(
            f"{_OP}: target must be on the same device as logits ({logits.device}), "
            f"got {target.device}"
        )
    if not (k > 0 and k < float("inf")):
        raise ValueError(f"{_OP}: k must be finite and > 0, got {k:g}")
    if not abs(M) < float("inf"):
        raise ValueError(f"{_OP}: M must be finite, got {M:g}")
    if grad is not None:
        if grad.dim() != 1 or grad.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{_OP}: grad must be 1-D with one entry per row of logits "
                f"({logits.shape[0]}), got {_describe(grad)}"
            )
        if grad.dtype != loss_dtype(logits.dtype):
            raise TypeError(
                f"{_OP}: grad must be {loss_dtype(logits.dtype)} for {logits.dtype} logits, "
                f"got {grad.dtype}"
            )
        if grad.device != logits.device:
            raise ValueError(
                f"{_OP}: grad must be on the same device as logits ({logits.device}), "
                f"got {grad.device}"
            )


@torch.library.register_fake("ncfast::rescaled_mse")
def _rescaled_mse_fake(logits, target, k, M, ignore_index):
    check_rescaled_mse_args(logits, target, k, M)
    return logits.new_empty(logits.shape[0], dtype=loss_dtype(logits.dtype))


@torch.library.register_fake("ncfast::rescaled_mse_backward")
def _rescaled_mse_backward_fake(grad, logits, target, k, M, ignore_index):
    check_rescaled_mse_args(logits, target, k, M, grad)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("ncfast::rescaled_mse_reduced")
def _rescaled_mse_reduced_fake(logits, target, k, M, ignore_index, scale, mean):
    check_rescaled_mse_args(logits, target, k, M)
    if not (0 < scale < float("inf")):
        raise ValueError(f"{_OP}: scale must be finite and > 0, got {scale:g}")
    return logits.new_empty(()), logits.new_empty((), dtype=loss_dtype(logits.dtype))


def check_reduced_backward_args(grad: Tensor, row_scale: Tensor, logits: Tensor, target: Tensor,
                                k: float, M: float) -> None:
    """The checks of check_reduced_backward_args (csrc/loss_validation.cpp), same order and
    messages."""
    check_rescaled_mse_args(logits, target, k, M)
    if grad.dim() != 0:
        raise ValueError(f"{_OP}: grad must be 0-D (the loss is), got {_describe(grad)}")
    if grad.dtype != logits.dtype:
        raise TypeError(f"{_OP}: grad must be {logits.dtype} like the logits, got {grad.dtype}")
    if row_scale.dim() != 0:
        raise ValueError(f"{_OP}: row_scale must be 0-D, got {_describe(row_scale)}")
    acc = loss_dtype(logits.dtype)
    if row_scale.dtype != acc:
        raise TypeError(f"{_OP}: row_scale must be {acc} for {logits.dtype} logits, got "
                        f"{row_scale.dtype}")
    for t in (grad, row_scale):
        if t.device != logits.device:
            raise ValueError(f"{_OP}: grad and row_scale must be on the same device as logits "
                             f"({logits.device}), got {t.device}")


@torch.library.register_fake("ncfast::rescaled_mse_reduced_backward")
def _rescaled_mse_reduced_backward_fake(grad, row_scale, logits, target, k, M, ignore_index):
    check_reduced_backward_args(grad, row_scale, logits, target, k, M)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# The losses a label error can name: label_error_op in csrc/loss_validation.cpp, same order.
_LABEL_ERROR_OPS = (_OP, "ncfast.linear_rescaled_mse_loss")


@torch.library.register_fake("ncfast::check_labels")
def _check_labels_fake(target, num_classes, ignore_index, op):
    # The check of label_error_op_code (csrc/loss_validation.cpp), same message; the labels'
    # values are data, which a fake cannot see.
    if op not in _LABEL_ERROR_OPS:
        raise ValueError("ncfast.check_labels: op must be "
                         + " or ".join(repr(name) for name in _LABEL_ERROR_OPS)
                         + f", got '{op}'")
    return None


def _check_guard_budget_fake(count, budget):
    # The checks of check_guard_budget_args (csrc/loss_validation.cpp), same messages.
    op = "ncfast.check_guard_budget"
    if count.dim() != 0:
        raise ValueError(f"{op}: count must be 0-D, got {_describe(count)}")
    if count.dtype != torch.int64:
        raise TypeError(f"{op}: count must be torch.int64, got {count.dtype}")
    if budget < 0:
        raise ValueError(f"{op}: budget must be >= 0, got {budget}")
    return None


if hasattr(torch.ops.ncfast, "check_guard_budget"):  # see ncfast._REQUIRED_OPS
    torch.library.register_fake("ncfast::check_guard_budget", _check_guard_budget_fake)


# ---- formulas (theory.md 2.4), written against a `backward` callable so both paths share them

def _rows_dot(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_j a_ij b_ij in the accumulate type."""
    return (a.to(dtype) * b.to(dtype)).sum(1)


def _forward_tangent(backward, logits, target, k, M, ignore_index, d_logits):
    # d loss_i = sum_j 2 w_ij r_ij d z_ij
    dtype = loss_dtype(logits.dtype)
    ones = logits.new_ones(logits.shape[0], dtype=dtype)
    return _rows_dot(backward(ones, logits, target, k, M, ignore_index), d_logits, dtype)


def _backward_vjp(backward, grad, logits, target, k, M, ignore_index, v, needs):
    # grad_z = 2 g w r: its cotangent v goes to g as sum_j 2 w r v and to z as 2 g w v.
    d_grad = d_logits = None
    if needs[0]:
        d_grad = _forward_tangent(backward, logits, target, k, M, ignore_index, v)
    if needs[1]:
        d_logits = backward(grad, v.to(logits.dtype), target, k, 0.0, ignore_index)
    return d_grad, d_logits


def _backward_tangent(backward, grad, logits, target, k, M, ignore_index, d_grad, d_logits):
    out = None
    if d_grad is not None:
        out = backward(d_grad, logits, target, k, M, ignore_index)
    if d_logits is not None:
        term = backward(grad, d_logits, target, k, 0.0, ignore_index)
        out = term if out is None else out + term
    return out


# ---- vmap: the ops work row by row, so a vmapped call is one call on the flattened rows

def _batched(x: Tensor, dim: int | None, size: int) -> Tensor:
    return x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)


def _rescaled_mse_vmap(info, in_dims, logits, target, k, M, ignore_index):
    n = info.batch_size
    z = _batched(logits, in_dims[0], n)
    y = _batched(target, in_dims[1], n)
    out = _ops.rescaled_mse(z.reshape(-1, z.shape[-1]), y.reshape(-1), k, M, ignore_index)
    return out.reshape(n, -1), 0


def _rescaled_mse_backward_vmap(info, in_dims, grad, logits, target, k, M, ignore_index):
    n = info.batch_size
    g = _batched(grad, in_dims[0], n)
    z = _batched(logits, in_dims[1], n)
    y = _batched(target, in_dims[2], n)
    out = _ops.rescaled_mse_backward(
        g.reshape(-1), z.reshape(-1, z.shape[-1]), y.reshape(-1), k, M, ignore_index
    )
    return out.reshape(z.shape), 0


torch.library.register_vmap("ncfast::rescaled_mse", _rescaled_mse_vmap)
torch.library.register_vmap("ncfast::rescaled_mse_backward", _rescaled_mse_backward_vmap)


# ---- autograd.Functions for torch.func and forward-mode AD

# Private torch state, looked up once and read defensively: when it cannot be read,
# _plain_eager answers False, which only costs speed.
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_forward_ad = torch.autograd.forward_ad
_is_compiling = torch.compiler.is_compiling


def _plain_eager() -> bool:
    """True unless a torch.func transform or a forward-mode AD level is active (those need the
    autograd.Functions) or dynamo is tracing."""
    if _is_compiling() or _transforms_active is None:
        return False
    return not _transforms_active() and getattr(_forward_ad, "_current_level", 0) < 0


def _below_autograd():
    """Inside an autograd.Function the ops need no autograd of their own: skipping their
    autograd kernel saves work per call. Private torch API, so fall back to the plain call if
    it ever disappears."""
    guard = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
    return guard() if guard is not None else contextlib.nullcontext()


class _RescaledMSE(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, k, M, ignore_index):
        with _below_autograd():
            return _ops.rescaled_mse(logits, target, k, M, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, ctx.k, ctx.M, ctx.ignore_index = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)

    @staticmethod
    def backward(ctx, grad):
        logits, target = ctx.saved_tensors
        d_logits = None
        if ctx.needs_input_grad[0]:
            d_logits = _RescaledMSEBackward.apply(
                grad, logits, target, ctx.k, ctx.M, ctx.ignore_index
            )
        return d_logits, None, None, None, None

    @staticmethod
    def jvp(ctx, d_logits, *_):
        logits, target = ctx.saved_tensors
        return _forward_tangent(
            _RescaledMSEBackward.apply, logits, target, ctx.k, ctx.M, ctx.ignore_index, d_logits
        )


class _RescaledMSEBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, logits, target, k, M, ignore_index):
        with _below_autograd():
            return _ops.rescaled_mse_backward(grad, logits, target, k, M, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, logits, target, ctx.k, ctx.M, ctx.ignore_index = inputs
        ctx.save_for_backward(grad, logits, target)
        ctx.save_for_forward(grad, logits, target)

    @staticmethod
    def backward(ctx, v):
        grad, logits, target = ctx.saved_tensors
        d_grad, d_logits = _backward_vjp(
            _RescaledMSEBackward.apply, grad, logits, target, ctx.k, ctx.M, ctx.ignore_index, v,
            ctx.needs_input_grad,
        )
        return d_grad, d_logits, None, None, None, None

    @staticmethod
    def jvp(ctx, d_grad, d_logits, *_):
        grad, logits, target = ctx.saved_tensors
        return _backward_tangent(
            _RescaledMSEBackward.apply, grad, logits, target, ctx.k, ctx.M, ctx.ignore_index,
            d_grad, d_logits,
        )


def rescaled_mse_per_sample(
    logits: Tensor, target: Tensor, k: float, M: float, ignore_index: int
) -> Tensor:
    """Differentiable per-sample loss sum_j w_ij (z_ij - M [j = y_i])^2 (0 on ignored rows).

    The ops' own (C++) autograd serves compiled and plain eager code; the autograd.Function
    only serves torch.func transforms and forward-mode AD."""
    if _is_compiling() or _plain_eager():
        return _ops.rescaled_mse(logits, target, k, M, ignore_index)
    return _RescaledMSE.apply(logits, target, k, M, ignore_index)


def rescaled_mse_logit_grad(
    grad: Tensor, logits: Tensor, target: Tensor, k: float, M: float, ignore_index: int
) -> Tensor:
    """Differentiable 2 grad_i w_ij (z_ij - M [j = y_i]): the backward op, through the same
    path choice as :func:`rescaled_mse_per_sample`."""
    if _is_compiling() or _plain_eager():
        return _ops.rescaled_mse_backward(grad, logits, target, k, M, ignore_index)
    return _RescaledMSEBackward.apply(grad, logits, target, k, M, ignore_index)


# ---- class statistics

@torch.library.register_fake("ncfast::class_moments")
def _class_moments_fake(features, labels, shift):
    # Mirrors csrc/stats_validation.cpp for the shapes the outputs depend on.
    op = "ncfast.ClassStats.update"
    if features.dim() != 2:
        raise ValueError(f"{op}: features must be 2-D (batch, dim), got shape "
                         f"{list(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"{op}: labels must be 1-D with one label per row of features "
                         f"({features.shape[0]}), got shape {list(labels.shape)}")
    if shift.dim() != 2 or shift.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: features must have {shift.shape[1]} columns (dim), got "
                         f"{features.shape[1]}")
    K, d = shift.shape
    return (shift.new_empty(K, dtype=torch.int64), shift.new_empty(K, d), shift.new_empty(K),
            shift.new_empty(features.shape[0], d))


@torch.library.register_fake("ncfast::class_moments_")
def _class_moments_inplace_fake(features, labels, shift):
    counts, sums, sq, _ = _class_moments_fake(features, labels, shift)
    return counts, sums, sq


@torch.library.register_fake("ncfast::nc4_mismatches")
def _nc4_mismatches_fake(scores, bias, sq_norms, skip=None):
    if scores.dim() != 2 or sq_norms.dim() != 1 or scores.shape[1] != 2 * sq_norms.shape[0]:
        raise ValueError("ncfast.ClassStats (NC4): scores must be (batch, 2K) = (batch, "
                         f"{2 * sq_norms.shape[0]})")
    return scores.new_empty((), dtype=torch.int64)

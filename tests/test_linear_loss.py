"""The fused linear + rescaled-MSE loss against the unfused composition
rescaled_mse_loss(F.linear(x, W, b), ...) in float64, for both methods; reduced precision against
float64 truth; the cancellation guard; derivatives to second order, torch.func, compile, opcheck;
errors."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import ncfast
from ncfast.linear_loss import GUARD_RATIO, guard_budget_for, select_method

METHODS = ["gram", "chunked"]
OPTIONS = {
    "default": {},
    "k3.5-M2.5": dict(k=3.5, M=2.5),
    "k2-M0.5-element-sum": dict(k=2.0, M=0.5, normalize="element", reduction="sum"),
    "none": dict(k=4.0, M=-2.0, reduction="none"),
    "ignore": dict(k=2.0, ignore=True),
    "ignore-custom-index-none": dict(ignore=True, ignore_index=3, reduction="none"),
    "ignore-element": dict(k=0.5, M=3.0, ignore=True, normalize="element"),
}
# (N, d, K): more classes than features, and fewer; the chunk size used below is 5 < N.
SHAPES = {"K>d": (17, 4, 23), "K<d": (13, 8, 5)}
CHUNK = 5


def make_case(shape, dtype, device, options, seed=0, bias=True, target_dtype=torch.int64):
    """Random features/weight/bias/labels (drawn in float64, then cast) and the loss kwargs."""
    gen = torch.Generator().manual_seed(seed)
    N, d, K = shape
    opts = dict(options)
    X = torch.randn(N, d, generator=gen, dtype=torch.float64)
    W = torch.randn(K, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(K, generator=gen, dtype=torch.float64) if bias else None
    y = torch.randint(0, K, (N,), generator=gen)
    kwargs = {key: v for key, v in opts.items() if key != "ignore"}
    if opts.get("ignore"):
        y[torch.arange(N) % 3 == 1] = kwargs.setdefault("ignore_index", -100)
    cast = dict(device=device, dtype=dtype)
    return (X.to(**cast), W.to(**cast), None if b is None else b.to(**cast),
            y.to(device=device, dtype=target_dtype), kwargs)


def composition(X, W, y, b, **kwargs):
    """What the fused loss replaces: the linear layer, then the plain loss."""
    kwargs = {key: v for key, v in kwargs.items() if key not in ("method", "chunk_size")}
    return ncfast.rescaled_mse_loss(F.linear(X, W, b), y, **kwargs)


def loss_and_grads(fn, X, W, b, y, kwargs, upstream_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in (X, W) + ((b,) if b is not None
                                                                    else ())]
    out = fn(leaves[0], leaves[1], y, leaves[2] if b is not None else None, **kwargs)
    gen = torch.Generator().manual_seed(upstream_seed)
    up = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, up)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("opt", OPTIONS.keys())
@pytest.mark.parametrize("method", METHODS)
def test_matches_composition(device, method, opt, shape, bias):
    X, W, b, y, kwargs = make_case(shape, torch.float64, device, OPTIONS[opt], bias=bias)
    out, grads = loss_and_grads(ncfast.linear_rescaled_mse_loss, X, W, b, y,
                                dict(kwargs, method=method, chunk_size=CHUNK))
    ref_out, ref_grads = loss_and_grads(composition, X, W, b, y, kwargs)
    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    assert_close(out, ref_out, rtol=1e-11, atol=1e-11)
    for ours, ref in zip(grads, ref_grads):
        assert_close(ours, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_reduced_precision_against_float64(device, method, dtype):
    # Within a small multiple of the composition's own error in that dtype, both measured
    # against the float64 composition on the same (rounded) inputs.
    X, W, b, y, kwargs = make_case((96, 32, 150), dtype, device, OPTIONS["ignore"])
    kwargs = dict(kwargs, M=2.0)
    out, grads = loss_and_grads(ncfast.linear_rescaled_mse_loss, X, W, b, y,
                                dict(kwargs, method=method, chunk_size=40))
    low_out, low_grads = loss_and_grads(composition, X, W, b, y, kwargs)
    truth_out, truth_grads = loss_and_grads(composition, X.double(), W.double(), b.double(), y,
                                            kwargs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    eps = torch.finfo(dtype).eps
    for ours, low, truth in zip((out, *grads), (low_out, *low_grads), (truth_out, *truth_grads)):
        err = (ours.double() - truth).abs().max().item()
        ref_err = (low.double() - truth).abs().max().item()
        assert err <= 2 * ref_err + 4 * eps * truth.abs().max().item(), (err, ref_err)


@pytest.mark.parametrize("method", METHODS)
def test_float16_weight_gradient_beyond_its_range(device, method):
    # Features of size ~400 (and a weight of size 1/400): X^T diag(g) X reaches ~2e5, beyond
    # float16's 65504, while the loss and its gradients are ordinary numbers. The classes 16..31
    # have no sample, so their weight-gradient rows come from that product alone.
    X, W, b, y, _ = make_case((512, 16, 32), torch.float64, "cpu", {})
    X, W, y = 400 * X, W / 400, y % 16
    X, W, b, y = (t.to(device) for t in (X, W, b, y))
    out, grads = loss_and_grads(ncfast.linear_rescaled_mse_loss, X.half(), W.half(), b.half(), y,
                                dict(method=method))
    low_out, low_grads = loss_and_grads(composition, X.half(), W.half(), b.half(), y, {})
    truth_out, truth_grads = loss_and_grads(composition, X.half().double(), W.half().double(),
                                            b.half().double(), y, {})
    eps = torch.finfo(torch.float16).eps
    for ours, low, truth in zip((out, *grads), (low_out, *low_grads), (truth_out, *truth_grads)):
        assert ours.isfinite().all()
        err = (ours.double() - truth).abs().max().item()
        ref_err = (low.double() - truth).abs().max().item()
        assert err <= 2 * ref_err + 4 * eps * truth.abs().max().item(), (err, ref_err)


def test_int32_targets_and_non_contiguous_inputs(device):
    X, W, b, y, kwargs = make_case((15, 6, 20), torch.float64, device, OPTIONS["ignore"])
    Xt = X.T.contiguous().T  # column-major
    Wt = W.T.contiguous().T
    assert not Xt.is_contiguous() and not Wt.is_contiguous()
    ref = loss_and_grads(composition, X, W, b, y, kwargs)
    for method in METHODS:
        out = loss_and_grads(ncfast.linear_rescaled_mse_loss, Xt, Wt, b, y.int(),
                             dict(kwargs, method=method, chunk_size=4))
        assert_close(out, ref)


def test_auto_rule(monkeypatch):
    assert select_method(2048, 32768, 256) == "gram"
    assert select_method(8192, 131072, 4096) == "gram"
    assert select_method(256, 10, 512) == "chunked"  # K < d
    assert select_method(64, 100000, 512) == "chunked"  # N < d: the K d^2 products dominate
    assert select_method(0, 100, 4) == "chunked"
    methods = []
    forward = ncfast.linear_loss._forward

    def spy(*args):
        methods.append(args[7])
        return forward(*args)

    monkeypatch.setattr(ncfast.linear_loss, "_forward", spy)
    for shape, method in [((40, 3, 60), "gram"), ((40, 8, 5), "chunked")]:
        X, W, b, y, _ = make_case(shape, torch.float64, "cpu", {})
        ncfast.linear_rescaled_mse_loss(X, W, y, b)
        assert methods.pop() == method


class OutputLog(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", METHODS)
def test_no_logits_buffer(method):
    # The Gram path creates no tensor with N*K elements; the chunked path none larger than
    # one chunk of logits (memory itself is measured in bench/linear_loss.py).
    N, d, K = 64, 8, 1000
    X, W, b, y, _ = make_case((N, d, K), torch.float32, "cpu", OPTIONS["ignore"])
    X.requires_grad_()
    W.requires_grad_()
    with OutputLog() as log:
        loss = ncfast.linear_rescaled_mse_loss(X, W, y, b, method=method, chunk_size=16)
        torch.autograd.grad(loss, (X, W))
    limit = K * d if method == "gram" else 16 * K  # the weight gradient, or one chunk
    assert log.largest <= limit, log.largest


# ---- the cancellation guard

def collapsed_case(device, dtype, n_collapsed, N=48, d=32, K=20, M=3.0, noise=1e-5, seed=0,
                   bias=False):
    """Orthonormal classifier rows and features at (M e_y - b) W + noise: logits M e_y + O(noise),
    so the loss is ~1e-10 of the terms the Gram identity subtracts. Rows from n_collapsed on are
    ordinary random features. Returns X, W, y, M, and the bias b when asked for."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))
    W = Q.T  # (K, d), orthonormal rows
    y = torch.randint(0, K, (N,), generator=gen)
    b = (torch.randn(K, generator=gen, dtype=torch.float64) if bias
         else torch.zeros(K, dtype=torch.float64))
    X = (M * F.one_hot(y, K).double() - b) @ W + noise * torch.randn(N, d, generator=gen,
                                                           dtype=torch.float64)
    X[n_collapsed:] = torch.randn(N - n_collapsed, d, generator=gen, dtype=torch.float64)
    cast = dict(device=device, dtype=dtype)
    out = X.to(**cast), W.to(**cast), y.to(device), M
    return (*out, b.to(**cast)) if bias else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_guard_recomputes_collapsed_rows(device, dtype):
    X, W, y, M = collapsed_case(device, dtype, n_collapsed=30)
    _, _, exact = torch.ops.ncfast.linear_rescaled_mse(X, W, None, y, 2.0, M, -100, "gram", 7)
    assert exact[:30].all() and not exact[30:].any()
    kwargs = dict(k=2.0, M=M, reduction="none")
    out, grads = loss_and_grads(ncfast.linear_rescaled_mse_loss, X, W, None, y,
                                dict(kwargs, method="gram", chunk_size=7))
    low, low_grads = loss_and_grads(composition, X, W, None, y, kwargs)
    truth, truth_grads = loss_and_grads(composition, X.double(), W.double(), None, y, kwargs)
    # The collapsed rows' losses are ~2e-10 against terms of ~M^2 = 9 that the Gram identity
    # subtracts: unguarded, their errors would be ~1e-6 in float32 (the composition's own error,
    # the yardstick, is ~1e-11) and ~1e-15 in float64 (relative 1e-5; the bound is 1e-8).
    err = (out.double() - truth).abs()[:30]
    if dtype == torch.float32:
        assert err.max() <= 2 * (low.double() - truth).abs()[:30].max()
    else:
        assert (err <= 1e-8 * truth[:30].abs()).all()
    assert_close(out[30:].double(), truth[30:], rtol=1e-5, atol=0)
    for ours, ref, truth_ in zip(grads, low_grads, truth_grads):
        err = (ours.double() - truth_).abs().max()
        scale = truth_.abs().max()
        if dtype == torch.float32:
            assert err <= 2 * (ref.double() - truth_).abs().max() + 8 * 2.0**-24 * scale
        else:
            assert err <= 1e-12 * scale


def budget_message(flagged, budget):
    return (f"{P}the gram method's cancellation guard flagged {flagged} rows for an exact "
            f"recompute, more than guard_budget={budget}; the rows beyond it kept the Gram "
            "form's rounding. Pass a larger guard_budget (at most the batch size) or "
            "method='chunked'")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("budget", [30, 41, None],
                         ids=["budget-all-flagged", "budget-padded", "no-budget"])
def test_guard_budget_path_matches_composition(device, budget, bias):
    # guard_budget=int runs the sync-free path on any device (CUDA's default): the first
    # `budget` flagged rows picked on the device, padded slots contributing nothing.
    case = collapsed_case(device, torch.float64, n_collapsed=30, bias=bias)
    X, W, y, M = case[:4]
    b = case[4] if bias else None
    _, _, exact = torch.ops.ncfast.linear_rescaled_mse(X, W, b, y, 2.0, M, -100, "gram", 7,
                                                       budget)
    assert exact[:30].all() and not exact[30:].any()
    kwargs = dict(k=2.0, M=M, reduction="none")
    out, grads = loss_and_grads(ncfast.linear_rescaled_mse_loss, X, W, b, y,
                                dict(kwargs, method="gram", chunk_size=7, guard_budget=budget))
    ref, ref_grads = loss_and_grads(composition, X, W, b, y, kwargs)
    # Recomputed rows (loss ~2e-10) within 1e-8 of their loss: unguarded they would be off by
    # ~1e-5 of it.
    assert ((out - ref).abs() <= 1e-8 * ref.abs()).all()
    for ours, theirs in zip(grads, ref_grads):
        assert_close(ours, theirs, rtol=0, atol=1e-12 * theirs.abs().max().item())


def test_guard_budget_exceeded_raises_on_cpu():
    X, W, y, M = collapsed_case("cpu", torch.float64, n_collapsed=30)
    X.requires_grad_()
    with pytest.raises(ValueError) as info:
        ncfast.linear_rescaled_mse_loss(X, W, y, M=M, method="gram", guard_budget=29)
    assert str(info.value) == budget_message(30, 29)
    # a budget of the batch size always suffices
    ncfast.linear_rescaled_mse_loss(X, W, y, M=M, method="gram", guard_budget=48).backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_through_the_guard_budget(reduction):
    # 3 flagged rows, a budget of 4 (one padding slot) in chunks of 2, an ignored row.
    X, W, y, M = collapsed_case("cpu", torch.float64, n_collapsed=3, N=7, d=6, K=4)
    y[5] = -100
    inputs = (X.requires_grad_(), W.requires_grad_())

    def fn(X, W):
        return ncfast.linear_rescaled_mse_loss(X, W, y, k=2.0, M=M, method="gram",
                                               chunk_size=2, guard_budget=4,
                                               reduction=reduction)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_guard_budget_default():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert guard_budget_for(None, 1000, cuda) == 125  # N // 8
    assert guard_budget_for(None, 100, cuda) == 64  # at least 64
    assert guard_budget_for(None, 10, cuda) == 10  # at most N
    assert guard_budget_for(None, 10**6, cpu) is None  # no limit on the CPU
    assert guard_budget_for(5, 3, cpu) == 3


@pytest.mark.parametrize("count,budget,exc,rule", [
    (torch.tensor([3]), 2, ValueError, "count must be 0-D, got 1-D tensor of shape [1]"),
    (torch.tensor(3, dtype=torch.int32), 2, TypeError,
     "count must be torch.int64, got torch.int32"),
    (torch.tensor(3), -1, ValueError, "budget must be >= 0, got -1"),
], ids=["not-0d", "int32", "negative-budget"])
def test_check_guard_budget_argument_errors(count, budget, exc, rule):
    for device in ("cpu", "meta"):  # the fake says the same
        with pytest.raises(exc) as info:
            torch.ops.ncfast.check_guard_budget(count.to(device), budget)
        assert str(info.value) == "ncfast.check_guard_budget: " + rule


def test_guard_threshold_is_the_documented_ratio():
    # A row is recomputed exactly when T_i > R * loss_i: build rows on both sides of R (float64).
    X, W, y, M = collapsed_case("cpu", torch.float64, n_collapsed=0, N=6)
    out = ncfast.linear_rescaled_mse_loss(X, W, y, M=M, reduction="none", method="chunked")
    _, _, exact = torch.ops.ncfast.linear_rescaled_mse(X, W, None, y, 1.0, M, -100, "gram", 4)
    z = F.linear(X, W)
    size = (z**2).sum(1) + 2 * M * z.gather(1, y[:, None])[:, 0].abs() + M * M
    assert_close(exact, size > GUARD_RATIO[torch.float64] * out, rtol=0, atol=0)
    assert not exact.any()  # random features: no cancellation, nothing recomputed


# ---- derivatives, torch.func, compile, opcheck

@pytest.mark.parametrize("opt", ["default", "none", "ignore-element"])
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_and_gradgradcheck(device, method, opt):
    X, W, b, y, kwargs = make_case((7, 3, 5), torch.float64, device, OPTIONS[opt])
    inputs = tuple(t.requires_grad_() for t in (X, W, b))

    def fn(X, W, b):
        return ncfast.linear_rescaled_mse_loss(X, W, y, b, method=method, chunk_size=3,
                                               **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("method", METHODS)
def test_gradgradcheck_through_guarded_rows(method):
    X, W, y, M = collapsed_case("cpu", torch.float64, n_collapsed=3, N=6, d=6, K=4)
    inputs = (X.requires_grad_(), W.requires_grad_())
    assert torch.autograd.gradgradcheck(
        lambda X, W: ncfast.linear_rescaled_mse_loss(X, W, y, k=2.0, M=M, method=method,
                                                     chunk_size=2), inputs)


@pytest.mark.parametrize("method", METHODS)
def test_func_grad_and_hvp_match_composition(device, method):
    X, W, b, y, kwargs = make_case((9, 4, 11), torch.float64, device, OPTIONS["ignore"])
    primals = (X, W, b)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def ours(X, W, b):
        return ncfast.linear_rescaled_mse_loss(X, W, y, b, method=method, chunk_size=4,
                                               **kwargs)

    def theirs(X, W, b):
        return composition(X, W, y, b, **kwargs)

    grad = dict(argnums=(0, 1, 2))
    assert_close(torch.func.grad(ours, **grad)(*primals),
                 torch.func.grad(theirs, **grad)(*primals))
    hvp = torch.func.jvp(torch.func.grad(ours, **grad), primals, tangents)[1]
    assert_close(hvp, torch.func.jvp(torch.func.grad(theirs, **grad), primals, tangents)[1])
    # reverse-over-reverse agrees with forward-over-reverse (the Hessian is symmetric)
    assert_close(torch.func.vjp(torch.func.grad(ours, **grad), *primals)[1](tangents), hvp)
    # and plain double backward gives the same product
    leaves = tuple(t.detach().requires_grad_() for t in primals)
    g = torch.autograd.grad(ours(*leaves), leaves, create_graph=True)
    assert_close(torch.autograd.grad(g, leaves, tangents), hvp)


@pytest.mark.parametrize("method,budget", [("gram", None), ("gram", 12), ("chunked", None)],
                         ids=["gram", "gram-budget", "chunked"])
def test_torch_compile_fullgraph(device, method, budget):
    X, W, b, y, kwargs = make_case((32, 6, 40), torch.float32, device, OPTIONS["ignore"])

    def step(X, W, y, b):
        return ncfast.linear_rescaled_mse_loss(X, W, y, b, M=1.5, normalize="element",
                                               method=method, chunk_size=8,
                                               guard_budget=budget, **kwargs)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(loss_and_grads(lambda *a: compiled(*a), X, W, b, y, {}),
                 loss_and_grads(step, X, W, b, y, {}))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("method,budget", [("gram", None), ("gram", 4), ("chunked", None)],
                         ids=["gram", "gram-budget", "chunked"])
def test_opcheck(device, method, budget, bias):
    X, W, b, y, _ = make_case((12, 5, 9), torch.float32, device, OPTIONS["ignore"], bias=bias)
    leaves = [t.requires_grad_() if t is not None else None for t in (X, W, b)]
    torch.library.opcheck(torch.ops.ncfast.linear_rescaled_mse.default,
                          (*leaves, y, 2.0, 1.5, -100, method, 5, budget))
    _, gram, exact = torch.ops.ncfast.linear_rescaled_mse(X, W, b, y, 2.0, 1.5, -100, method, 5,
                                                          budget)
    grad = torch.randn(12, device=device)
    plain = [t.detach() if t is not None else None for t in (X, W, b)]
    torch.library.opcheck(torch.ops.ncfast.linear_rescaled_mse_backward.default,
                          (grad, *plain, y, gram, exact, 2.0, 1.5, -100, method, 5, True, True,
                           bias, budget))


def test_frozen_classifier_gets_no_weight_gradient(device):
    # e.g. a fixed ETF classifier: only the features (and bias) need gradients.
    X, W, b, y, kwargs = make_case((20, 4, 30), torch.float64, device, {})
    X.requires_grad_()
    b.requires_grad_()
    for method in METHODS:
        loss = ncfast.linear_rescaled_mse_loss(X, W, y, b, method=method, chunk_size=6)
        grads = torch.autograd.grad(loss, (X, b))
        ref = torch.autograd.grad(composition(X, W, y, b), (X, b))
        assert_close(grads, ref)


# ---- documented edge cases

@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_and_all_ignored(device, method):
    X = torch.randn(0, 4, device=device, requires_grad=True)
    W = torch.randn(6, 4, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    assert ncfast.linear_rescaled_mse_loss(X, W, y, method=method).isnan()
    total = ncfast.linear_rescaled_mse_loss(X, W, y, reduction="sum", method=method)
    assert total.item() == 0
    gx, gw = torch.autograd.grad(total, (X, W))
    assert gx.shape == (0, 4) and gw.abs().sum().item() == 0
    X2 = torch.randn(3, 4, device=device)
    y2 = torch.full((3,), -100, device=device)
    assert ncfast.linear_rescaled_mse_loss(X2, W, y2, method=method).isnan()


def test_module_matches_function():
    X, W, b, y, _ = make_case((10, 4, 6), torch.float64, "cpu", {})
    loss = ncfast.LinearRescaledMSELoss(k=2.0, M=3.0, normalize="element", method="chunked",
                                        chunk_size=3)
    assert_close(loss(X, W, y, b),
                 ncfast.linear_rescaled_mse_loss(X, W, y, b, k=2.0, M=3.0,
                                                 normalize="element"))
    assert "k=2" in repr(loss) and "method='chunked'" in repr(loss)
    with pytest.raises(ValueError, match="method must be 'auto', 'gram' or 'chunked'"):
        ncfast.LinearRescaledMSELoss(method="logits")


# ---- errors

P = "ncfast.linear_rescaled_mse_loss: "


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _y(*values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


# name -> (features, weight, target, kwargs, exception, message)
ERRORS = {
    "features-3d": (_x(2, 3, 4), _x(5, 4), _y(0, 1), {}, ValueError,
                    "features must be 2-D (batch, dim), got 3-D tensor of shape [2, 3, 4]"),
    "features-int": (torch.ones(2, 3, dtype=torch.int64), _x(5, 3), _y(0, 1), {}, TypeError,
                     "features must be float32, float64, bfloat16 or float16, got torch.int64"),
    "weight-1d": (_x(2, 3), _x(3), _y(0, 1), {}, ValueError,
                  "weight must be 2-D (classes, dim), got 1-D tensor of shape [3]"),
    "weight-dtype": (_x(2, 3), _x(5, 3, dtype=torch.float64), _y(0, 1), {}, TypeError,
                     "weight must have the dtype of features (torch.float32), got torch.float64"),
    "no-classes": (_x(2, 3), _x(0, 3), _y(0, 1), {}, ValueError,
                   "weight must have at least one class (row), got 2-D tensor of shape [0, 3]"),
    "width-mismatch": (_x(2, 3), _x(5, 4), _y(0, 1), {}, ValueError,
                       "features and weight must have the same width (dim): features has 3 "
                       "columns, weight has 4"),
    "bias-length": (_x(2, 3), _x(5, 3), _y(0, 1), dict(bias=_x(4)), ValueError,
                    "bias must be 1-D of length 5 (one per class), got shape [4]"),
    "bias-dtype": (_x(2, 3), _x(5, 3), _y(0, 1), dict(bias=_x(5, dtype=torch.float16)),
                   TypeError, "bias must have the dtype of features (torch.float32), got "
                              "torch.float16"),
    "target-2d": (_x(2, 3), _x(5, 3), torch.zeros(2, 1, dtype=torch.int64), {}, ValueError,
                  "target must be 1-D (batch,), got 2-D tensor of shape [2, 1]"),
    "target-float": (_x(2, 3), _x(5, 3), torch.zeros(2), {}, TypeError,
                     "target must be int64 or int32, got torch.float32"),
    "batch-mismatch": (_x(4, 3), _x(5, 3), _y(0, 1, 2), {}, ValueError,
                       "target must have one label per row of features: features has 4 rows, "
                       "target has 3"),
    "k-zero": (_x(2, 3), _x(5, 3), _y(0, 1), dict(k=0.0), ValueError,
               "k must be finite and > 0, got 0"),
    "M-nan": (_x(2, 3), _x(5, 3), _y(0, 1), dict(M=float("nan")), ValueError,
              "M must be finite, got nan"),
    "k-string": (_x(2, 3), _x(5, 3), _y(0, 1), dict(k="2"), TypeError,
                 "k must be a real number, got str '2'"),
    "normalize": (_x(2, 3), _x(5, 3), _y(0, 1), dict(normalize="batch"), ValueError,
                  "normalize must be 'sample' or 'element', got 'batch'"),
    "reduction": (_x(2, 3), _x(5, 3), _y(0, 1), dict(reduction="avg"), ValueError,
                  "reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    "method": (_x(2, 3), _x(5, 3), _y(0, 1), dict(method="logits"), ValueError,
               "method must be 'auto', 'gram' or 'chunked', got 'logits'"),
    "chunk-size": (_x(2, 3), _x(5, 3), _y(0, 1), dict(chunk_size=0), ValueError,
                   "chunk_size must be >= 1, got 0"),
    "guard-budget-zero": (_x(2, 3), _x(5, 3), _y(0, 1), dict(guard_budget=0), ValueError,
                          "guard_budget must be >= 1, got 0"),
    "guard-budget-float": (_x(2, 3), _x(5, 3), _y(0, 1), dict(guard_budget=8.0), TypeError,
                           "guard_budget must be an int or None, got float"),
}


def _message(device, case):
    X, W, y, kwargs, exc, _ = case
    kwargs = {key: v.to(device) if isinstance(v, torch.Tensor) else v
              for key, v in kwargs.items()}
    with pytest.raises(exc) as info:
        ncfast.linear_rescaled_mse_loss(X.to(device), W.to(device), y.to(device), **kwargs)
    return str(info.value)


@pytest.mark.parametrize("case", ERRORS.keys())
def test_argument_errors(device, case):
    expected = P + ERRORS[case][5]
    assert _message(device, ERRORS[case]) == expected
    assert _message("meta", ERRORS[case]) == expected  # the fakes say the same


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "labels,K,ignore_index,bad",
    [((0, 5), 5, -100, 5), ((-1, 0), 5, -100, -1), ((0, -100, 7), 5, -100, 7),
     ((0, -100), 3, 2, -100)],
    ids=["too-large", "negative", "after-ignored", "ignore-index-is-custom"],
)
def test_out_of_range_labels(device, method, labels, K, ignore_index, bad):
    X = torch.randn(len(labels), 3, device=device)
    W = torch.randn(K, 3, device=device)
    y = torch.tensor(labels, device=device)
    expected = f"{P}target values must be in [0, {K}) or ignore_index={ignore_index}, got {bad}"
    # CPU raises in the call; CUDA records on the device, raised by check_errors.
    with pytest.raises(ValueError, match=re.escape(expected)):
        ncfast.linear_rescaled_mse_loss(X, W, y, ignore_index=ignore_index, method=method)
        ncfast.check_errors()
    with pytest.raises(ValueError, match=re.escape(expected)):  # the torch.func path too
        torch.func.grad(lambda X: ncfast.linear_rescaled_mse_loss(
            X, W, y, ignore_index=ignore_index, method=method))(X)
        ncfast.check_errors()


@pytest.mark.cuda
def test_device_mismatch_errors():
    X = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match=re.escape(
            P + "weight must be on the same device as features (cuda:0), got cpu")):
        ncfast.linear_rescaled_mse_loss(X, torch.randn(4, 3), torch.tensor([0, 1], device="cuda"))
    with pytest.raises(ValueError, match=re.escape(
            P + "target must be on the same device as features (cuda:0), got cpu")):
        ncfast.linear_rescaled_mse_loss(X, torch.randn(4, 3, device="cuda"), torch.tensor([0, 1]))


# ---- issue 13: no host sync on CUDA, no torch._dynamo on first use

@pytest.mark.cuda
def test_cuda_label_error_is_deferred():
    X = torch.randn(4, 3, device="cuda")
    W = torch.randn(5, 3, device="cuda")
    y = torch.tensor([0, 1, 9, 2], device="cuda")
    ncfast.check_errors()  # nothing pending
    for method in METHODS:
        with ncfast.cuda_target_checks(False):
            per = ncfast.linear_rescaled_mse_loss(X, W, y, method=method, reduction="none")
        assert per[2].item() == 0  # the bad row counts nowhere
        # Raised by check_errors at the latest (a later op of the same call may raise it, if the
        # device has finished the check by then).
        with pytest.raises(ValueError) as info:
            ncfast.linear_rescaled_mse_loss(X, W, y, method=method)
            ncfast.check_errors()
        assert str(info.value) == ("ncfast.linear_rescaled_mse_loss: target values must be in "
                                   "[0, 5) or ignore_index=-100, got 9")


@pytest.mark.cuda
def test_cuda_guard_budget_error_is_deferred():
    # The count is compared on the device and raised like a bad label: by check_errors at the
    # latest, or by the next ncfast call once the device has finished; recorded whatever
    # set_cuda_target_checks says.
    X, W, y, M = collapsed_case("cuda", torch.float32, n_collapsed=30)
    ncfast.check_errors()  # nothing pending
    for checks in (True, False):
        with ncfast.cuda_target_checks(checks), pytest.raises(ValueError) as info:
            ncfast.linear_rescaled_mse_loss(X, W, y, M=M, method="gram", guard_budget=20)
            ncfast.check_errors()
        assert str(info.value) == budget_message(30, 20)
    ncfast.linear_rescaled_mse_loss(X, W, y, M=M, method="gram", guard_budget=20)
    torch.cuda.synchronize()
    with pytest.raises(ValueError) as info:
        ncfast.rescaled_mse_loss(F.linear(X, W), y)  # the next ncfast call
    assert str(info.value) == budget_message(30, 20)
    ncfast.check_errors()  # raised once
    # within the budget: nothing is raised, and the rows match the float64 composition
    out = ncfast.linear_rescaled_mse_loss(X, W, y, M=M, method="gram", guard_budget=30,
                                          reduction="none")
    ncfast.check_errors()
    truth = composition(X.double(), W.double(), y, None, M=M, reduction="none")
    low = composition(X, W, y, None, M=M, reduction="none")
    assert (out.double() - truth).abs().max() <= 2 * (low.double() - truth).abs().max()


def test_first_call_imports_no_dynamo():
    # Calling a Python custom op imports torch._dynamo and sympy (about 2 s and 190 MiB); the
    # eager path must not.
    import subprocess
    import sys
    code = (
        "import sys, torch, ncfast\n"
        "x = torch.randn(8, 4, requires_grad=True); w = torch.randn(10, 4, requires_grad=True)\n"
        "y = torch.randint(0, 10, (8,))\n"
        "for method in ('gram', 'chunked'):\n"
        "    ncfast.linear_rescaled_mse_loss(x, w, y, method=method).backward()\n"
        "ncfast.rescaled_mse_loss(x @ w.T, y).backward()\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "[]"

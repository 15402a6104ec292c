"""Every error of the loss: the exception type and the full message (argument, rule, value),
identical on CPU, on the meta device (the fake used by torch.compile) and on CUDA."""

import re

import pytest
import torch

import ncfast

P = "ncfast.rescaled_mse_loss: "


def z(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def y(*values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


# name -> (logits, target, kwargs, exception, message). Metadata errors only: meta tensors
# hold no values, so label-range errors are tested separately.
SHAPE_ERRORS = {
    "logits-3d": (z(2, 3, 4), y(0, 1), {}, ValueError,
                  "logits must be 2-D (batch, classes), got 3-D tensor of shape [2, 3, 4]"),
    "logits-1d": (z(3), y(0, 1, 2), {}, ValueError,
                  "logits must be 2-D (batch, classes), got 1-D tensor of shape [3]"),
    "logits-int": (torch.ones(2, 3, dtype=torch.int64), y(0, 1), {}, TypeError,
                   "logits must be float32, float64, bfloat16 or float16, got torch.int64"),
    "no-classes": (z(2, 0), y(0, 1), {}, ValueError,
                   "logits must have at least one class, got 2-D tensor of shape [2, 0]"),
    "target-2d": (z(2, 3), torch.zeros(2, 1, dtype=torch.int64), {}, ValueError,
                  "target must be 1-D (batch,), got 2-D tensor of shape [2, 1]"),
    "target-float": (z(2, 3), torch.zeros(2), {}, TypeError,
                     "target must be int64 or int32, got torch.float32"),
    "target-int16": (z(2, 3), y(0, 1, dtype=torch.int16), {}, TypeError,
                     "target must be int64 or int32, got torch.int16"),
    "batch-mismatch": (z(4, 3), y(0, 1, 2), {}, ValueError,
                       "target must have one label per row of logits: logits has 4 rows, "
                       "target has 3"),
    "k-zero": (z(2, 3), y(0, 1), dict(k=0.0), ValueError, "k must be finite and > 0, got 0"),
    "k-negative": (z(2, 3), y(0, 1), dict(k=-1.5), ValueError,
                   "k must be finite and > 0, got -1.5"),
    "k-inf": (z(2, 3), y(0, 1), dict(k=float("inf")), ValueError,
              "k must be finite and > 0, got inf"),
    "k-nan": (z(2, 3), y(0, 1), dict(k=float("nan")), ValueError,
              "k must be finite and > 0, got nan"),
    "M-nan": (z(2, 3), y(0, 1), dict(M=float("nan")), ValueError, "M must be finite, got nan"),
    "M-huge-int": (z(2, 3), y(0, 1), dict(M=-10**400), ValueError, "M must be finite, got -inf"),
    "k-string": (z(2, 3), y(0, 1), dict(k="2"), TypeError, "k must be a real number, got str '2'"),
    "normalize": (z(2, 3), y(0, 1), dict(normalize="batch"), ValueError,
                  "normalize must be 'sample' or 'element', got 'batch'"),
    "reduction": (z(2, 3), y(0, 1), dict(reduction="avg"), ValueError,
                  "reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    "weight-length": (z(2, 3), y(0, 1), dict(weight=torch.ones(4)), ValueError,
                      "weight must be 1-D of length 3 (one per class), got shape [4]"),
    "weight-int": (z(2, 3), y(0, 1), dict(weight=torch.ones(3, dtype=torch.int64)), TypeError,
                   "weight must have a floating dtype, got torch.int64"),
    "sample-weight-length": (z(2, 3), y(0, 1), dict(sample_weight=torch.ones(3)), ValueError,
                             "sample_weight must be 1-D of length 2 (one per row of logits), "
                             "got shape [3]"),
}


def _to(kwargs, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _message(device, case):
    logits, target, kwargs, exc, _ = case
    with pytest.raises(exc) as info:
        ncfast.rescaled_mse_loss(logits.to(device), target.to(device), **_to(kwargs, device))
    return str(info.value)


@pytest.mark.parametrize("case", SHAPE_ERRORS.keys())
def test_argument_errors(device, case):
    expected = P + SHAPE_ERRORS[case][4]
    assert _message(device, SHAPE_ERRORS[case]) == expected
    # The fake (meta) implementation says exactly the same.
    assert _message("meta", SHAPE_ERRORS[case]) == expected


OP_LEVEL = [name for name, case in SHAPE_ERRORS.items() if set(case[2]) <= {"k", "M"}
            and all(isinstance(v, float) for v in case[2].values())]


@pytest.mark.parametrize("case", OP_LEVEL)
def test_op_says_what_the_python_checks_say(device, case):
    # The public function checks arguments in Python first; the op (C++, every device) must
    # reject the same inputs with the same message when called directly.
    logits, target, kwargs, exc, message = SHAPE_ERRORS[case]
    with pytest.raises(exc) as info:
        torch.ops.ncfast.rescaled_mse(logits.to(device), target.to(device),
                                      kwargs.get("k", 1.0), kwargs.get("M", 1.0), -100)
    assert str(info.value) == P + message


@pytest.mark.parametrize(
    "labels,K,ignore_index,bad",
    [((0, 5), 5, -100, 5), ((-1, 0), 5, -100, -1), ((0, -100, 7), 5, -100, 7),
     ((0, -100), 3, 2, -100), ((0, 1, 1 << 40), 2, -100, 1 << 40)],
    ids=["too-large", "negative", "after-ignored", "ignore-index-is-custom", "huge"],
)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_out_of_range_labels(device, labels, K, ignore_index, bad, target_dtype):
    if target_dtype == torch.int32 and abs(bad) >= 1 << 31:
        pytest.skip("value does not fit int32")
    logits = torch.randn(len(labels), K, device=device)
    target = torch.tensor(labels, dtype=target_dtype, device=device)
    expected = (f"{P}target values must be in [0, {K}) or ignore_index={ignore_index}, "
                f"got {bad}")
    for reduction in ("mean", "none"):  # the fused op, and the per-row op
        # CPU raises in the call; CUDA records on the device, raised by check_errors.
        with pytest.raises(ValueError, match=re.escape(expected)):
            ncfast.rescaled_mse_loss(logits, target, ignore_index=ignore_index,
                                     reduction=reduction)
            ncfast.check_errors()


def test_ops_give_rows_with_out_of_range_labels_zero(device):
    # Labels are validated by the forward ops; called directly, the backward ops neither sync
    # nor read out of bounds: a row whose label is out of range gets zero gradient, as an
    # ignored row does.
    logits = torch.randn(3, 4, device=device, dtype=torch.float64)
    target = torch.tensor([1, 9, -3], device=device)
    grad = torch.tensor([1.0, 2.0, 3.0], device=device, dtype=torch.float64)
    expected = torch.zeros_like(logits)
    expected[0] = 2 * logits[0]
    expected[0, 1] = 2 * 3.0 * (logits[0, 1] - 2.0)
    out = torch.ops.ncfast.rescaled_mse_backward(grad, logits, target, 3.0, 2.0, -100)
    torch.testing.assert_close(out, expected)
    one = torch.ones((), device=device, dtype=torch.float64)
    out = torch.ops.ncfast.rescaled_mse_reduced_backward(one, one, logits, target, 3.0, 2.0,
                                                         -100)
    torch.testing.assert_close(out, expected)


def test_ignore_index_inside_the_class_range_is_allowed(device):
    logits = torch.randn(3, 4, device=device, dtype=torch.float64)
    target = torch.tensor([1, 2, 2], device=device)
    out = ncfast.rescaled_mse_loss(logits, target, ignore_index=2, reduction="none")
    assert out[1].item() == 0 and out[2].item() == 0 and out[0].item() > 0


def test_backward_op_checks_grad():
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    op = torch.ops.ncfast.rescaled_mse_backward
    with pytest.raises(ValueError, match=re.escape(
            P + "grad must be 1-D with one entry per row of logits (3), got 1-D tensor of "
                "shape [2]")):
        op(torch.ones(2), logits, target, 1.0, 1.0, -100)
    with pytest.raises(TypeError, match=re.escape(
            P + "grad must be torch.float32 for torch.float32 logits, got torch.float64")):
        op(torch.ones(3, dtype=torch.float64), logits, target, 1.0, 1.0, -100)


def test_reduced_ops_check_their_own_arguments(device):
    ops = torch.ops.ncfast
    logits = torch.randn(3, 4, device=device)
    target = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError) as info:
        ops.rescaled_mse_reduced(logits, target, 1.0, 1.0, -100, 0.0, True)
    assert str(info.value) == P + "scale must be finite and > 0, got 0"
    one = torch.ones((), device=device)
    cases = [
        ((torch.ones(3, device=device), one), ValueError,
         "grad must be 0-D (the loss is), got 1-D tensor of shape [3]"),
        ((one.double(), one), TypeError,
         "grad must be torch.float32 like the logits, got torch.float64"),
        ((one, one.double()), TypeError,
         "row_scale must be torch.float32 for torch.float32 logits, got torch.float64"),
    ]
    for (grad, row_scale), exc, rule in cases:
        # The op on the device, and its fake (meta, as torch.compile sees it), say the same.
        for where in (device, "meta"):
            with pytest.raises(exc) as info:
                ops.rescaled_mse_reduced_backward(grad.to(where), row_scale.to(where),
                                                  logits.to(where), target.to(where), 1.0, 1.0,
                                                  -100)
            assert str(info.value) == P + rule


def test_check_labels_op_name_is_checked_by_the_op_and_its_fake(device):
    # The op name picks the message of a later label error: an unknown one is refused at once,
    # on the device and by the fake (meta, as torch.compile sees it), in the same words.
    target = torch.tensor([0, 1, 2])
    for where in (device, "meta"):
        with pytest.raises(ValueError) as info:
            torch.ops.ncfast.check_labels(target.to(where), 4, -100, "ncfast.bogus")
        assert str(info.value) == ("ncfast.check_labels: op must be 'ncfast.rescaled_mse_loss' "
                                   "or 'ncfast.linear_rescaled_mse_loss', got 'ncfast.bogus'")
        for name in ("ncfast.rescaled_mse_loss", "ncfast.linear_rescaled_mse_loss"):
            torch.ops.ncfast.check_labels(target.to(where), 4, -100, name)


@pytest.mark.cuda
def test_device_mismatch_errors():
    logits = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match=re.escape(
            P + "target must be on the same device as logits (cuda:0), got cpu")):
        ncfast.rescaled_mse_loss(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=re.escape(
            P + "weight must be on the same device as logits (cuda:0), got cpu")):
        ncfast.rescaled_mse_loss(logits, torch.tensor([0, 1], device="cuda"),
                                 weight=torch.ones(3))


LABEL_MESSAGE = P + "target values must be in [0, 3) or ignore_index=-100, got 7"


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_label_error_is_raised_by_the_next_call(reduction):
    logits = torch.randn(2, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    bad, good = torch.tensor([0, 7], device="cuda"), torch.tensor([0, 1], device="cuda")
    ncfast.check_errors()  # nothing pending
    # The bad row counts nowhere: zero loss, zero gradient, not in the mean's denominator
    # (seen with the recording off, so that no call in between raises).
    expected = ncfast.rescaled_mse_loss(logits[:1], good[:1], reduction=reduction)
    with ncfast.cuda_target_checks(False):
        loss = ncfast.rescaled_mse_loss(logits, bad, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
    torch.testing.assert_close(loss[:1] if reduction == "none" else loss, expected)
    assert grad[1].eq(0).all() and grad[0].ne(0).all()
    ncfast.check_errors()

    ncfast.rescaled_mse_loss(logits, bad, reduction=reduction)  # recorded; nothing raised here
    torch.cuda.synchronize()
    with pytest.raises(ValueError) as info:
        ncfast.rescaled_mse_loss(logits, good)  # the next call raises the recorded label
    assert str(info.value) == LABEL_MESSAGE
    ncfast.rescaled_mse_loss(logits, good)  # raised once; the device records again
    ncfast.rescaled_mse_loss(logits, bad, reduction=reduction)
    with pytest.raises(ValueError) as info:
        ncfast.check_errors()  # waits for the device, then raises
    assert str(info.value) == LABEL_MESSAGE
    ncfast.check_errors()


@pytest.mark.cuda
def test_cuda_target_checks_can_be_turned_off():
    logits = torch.randn(2, 3, device="cuda", dtype=torch.float64)
    target = torch.tensor([0, 7], device="cuda")
    with ncfast.cuda_target_checks(False):
        per = ncfast.rescaled_mse_loss(logits, target, reduction="none")
    ncfast.check_errors()  # nothing was recorded
    assert per[1].item() == 0  # an unchecked out-of-range label still counts nowhere
    ncfast.rescaled_mse_loss(logits, target)
    with pytest.raises(ValueError, match=re.escape(LABEL_MESSAGE)):
        ncfast.check_errors()


@pytest.mark.cuda
def test_default_cuda_path_never_syncs():
    # Issue 13: the default loss and the linear loss (its default, the gram method here, with
    # its guard recomputing rows, and the chunked method), forward and backward, with the label
    # checks on, under torch's sync debug mode (a host sync raises).
    from ncfast.linear_loss import select_method
    logits = torch.randn(64, 10, device="cuda", requires_grad=True)
    target = torch.randint(0, 10, (64,), device="cuda")
    features = torch.randn(64, 8, device="cuda", requires_grad=True)
    weight = torch.randn(10, 8, device="cuda", requires_grad=True)
    bias = torch.randn(10, device="cuda", requires_grad=True)
    assert select_method(64, 10, 8) == "gram"  # what method="auto" runs at this shape
    # Half the rows collapsed onto M e_y (orthonormal classifier rows): the guard flags them.
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0][:5]  # 5 orthonormal rows
    y5 = torch.randint(0, 5, (64,), generator=gen)
    X5 = 3.0 * Q[y5] + 1e-5 * torch.randn(64, 8, generator=gen)
    X5[32:] = torch.randn(32, 8, generator=gen)
    X5, Q, y5 = (t.cuda() for t in (X5, Q, y5))
    X5.requires_grad_()
    for _ in range(2):  # the first call allocates the error slots
        torch.cuda.set_sync_debug_mode("error")
        try:
            ncfast.rescaled_mse_loss(logits, target, k=2.0).backward()
            ncfast.rescaled_mse_loss(logits, target, normalize="element",
                                     reduction="sum").backward()
            ncfast.linear_rescaled_mse_loss(features, weight, target, bias=bias,
                                            k=2.0).backward()
            ncfast.linear_rescaled_mse_loss(X5, Q, y5, M=3.0, method="gram",
                                            guard_budget=40).backward()
            ncfast.linear_rescaled_mse_loss(features, weight, target, method="chunked",
                                            k=2.0).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ncfast.check_errors()


def test_check_errors_waits_only_for_devices_that_ran_checked_kernels(monkeypatch):
    # Synchronising a device creates a CUDA context there (hundreds of MiB): under torchrun
    # every process would take one on every GPU. check_errors waits for the devices where a loss
    # kernel checked labels (none without a GPU; at most the one the CUDA tests use) and no
    # other of the 8 this machine pretends to have.
    synchronised = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronised.append)
    ncfast.check_errors()
    assert synchronised == list(ncfast._C.label_error_devices())
    assert len(synchronised) <= 1


@pytest.mark.cuda
def test_label_error_devices_lists_the_devices_used():
    ncfast.rescaled_mse_loss(torch.randn(2, 3, device="cuda"), torch.tensor([0, 1], device="cuda"))
    assert torch.cuda.current_device() in ncfast._C.label_error_devices()
    ncfast.check_errors()


def test_cuda_target_checks_context_restores_the_setting():
    before = ncfast._C.cuda_target_checks_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with ncfast.cuda_target_checks(not before):
            assert ncfast._C.cuda_target_checks_enabled() is (not before)
            raise RuntimeError("inside")
    assert ncfast._C.cuda_target_checks_enabled() is before
    # CPU labels are always checked, whatever the setting.
    with ncfast.cuda_target_checks(False), pytest.raises(ValueError, match="target"):
        ncfast.rescaled_mse_loss(torch.randn(2, 3), torch.tensor([0, 3]))
    with ncfast.cuda_target_checks(False), pytest.raises(ValueError, match="target"):
        ncfast.rescaled_mse_loss(torch.randn(2, 3), torch.tensor([0, 3]), reduction="none")


# ---- rules of issue 11: argument types, ignored rows


@pytest.mark.parametrize("value,exc,rule", [
    (1.5, TypeError, "ignore_index must be an int, got float 1.5"),
    ("3", TypeError, "ignore_index must be an int, got str '3'"),
    (True, TypeError, "ignore_index must be an int, got bool True"),
    (torch.tensor(3), TypeError, "ignore_index must be an int, got Tensor tensor(3)"),
    (1 << 63, ValueError, "ignore_index must fit in int64, got 9223372036854775808"),
], ids=["float", "str", "bool", "tensor", "too-large"])
def test_ignore_index_must_be_an_int(value, exc, rule):
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(exc) as info:
        ncfast.rescaled_mse_loss(logits, target, ignore_index=value)
    assert str(info.value) == P + rule
    with pytest.raises(exc) as info:
        ncfast.RescaledMSELoss(ignore_index=value)
    assert str(info.value) == P + rule
    features, weight = torch.randn(3, 2), torch.randn(4, 2)
    with pytest.raises(exc) as info:
        ncfast.linear_rescaled_mse_loss(features, weight, target, ignore_index=value)
    assert str(info.value) == "ncfast.linear_rescaled_mse_loss: " + rule


def test_numpy_integer_ignore_index_is_accepted():
    np = pytest.importorskip("numpy")
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    ours = ncfast.rescaled_mse_loss(logits, target, ignore_index=np.int64(1))
    assert ours == ncfast.rescaled_mse_loss(logits, target, ignore_index=1)


@pytest.mark.parametrize("scalar", ["float32", "float64", "int64", "int32"])
def test_numpy_scalar_k_and_M_are_accepted(scalar):
    # Any real number is a valid k or M, as any integer is a valid ignore_index; each entry
    # point stores or passes it on as a Python float.
    np = pytest.importorskip("numpy")
    k, M = getattr(np, scalar)(2), getattr(np, scalar)(3)
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    expected = ncfast.rescaled_mse_loss(logits, target, k=2.0, M=3.0)
    assert ncfast.rescaled_mse_loss(logits, target, k=k, M=M) == expected
    module = ncfast.RescaledMSELoss(k=k, M=M)
    assert type(module.k) is float and type(module.M) is float
    assert module(logits, target) == expected
    features, weight = torch.randn(3, 2), torch.randn(4, 2)
    linear = ncfast.linear_rescaled_mse_loss(features, weight, target, k=k, M=M)
    torch.testing.assert_close(
        linear, ncfast.linear_rescaled_mse_loss(features, weight, target, k=2.0, M=3.0))
    linear_module = ncfast.LinearRescaledMSELoss(k=k, M=M)
    assert type(linear_module.k) is float and type(linear_module.M) is float
    torch.testing.assert_close(linear_module(features, weight, target), linear)


@pytest.mark.parametrize("value,shown", [
    (True, "bool True"), ("2", "str '2'"), (None, "NoneType None"),
    (torch.tensor(2.0), "Tensor tensor(2.)"), (2 + 0j, "complex (2+0j)"),
], ids=["bool", "str", "None", "tensor", "complex"])
@pytest.mark.parametrize("name", ["k", "M"])
def test_non_real_k_and_M_are_a_type_error(name, value, shown):
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    rule = f"{name} must be a real number, got {shown}"
    with pytest.raises(TypeError) as info:
        ncfast.rescaled_mse_loss(logits, target, **{name: value})
    assert str(info.value) == P + rule
    with pytest.raises(TypeError) as info:
        ncfast.RescaledMSELoss(**{name: value})
    assert str(info.value) == P + rule
    with pytest.raises(TypeError) as info:
        ncfast.linear_rescaled_mse_loss(torch.randn(3, 2), torch.randn(4, 2), target,
                                        **{name: value})
    assert str(info.value) == "ncfast.linear_rescaled_mse_loss: " + rule
    with pytest.raises(TypeError) as info:
        ncfast.LinearRescaledMSELoss(**{name: value})
    assert str(info.value) == "ncfast.linear_rescaled_mse_loss: " + rule


@pytest.mark.parametrize("argument", ["logits", "target"])
@pytest.mark.parametrize("kind", ["list", "ndarray"])
def test_non_tensor_arguments_are_a_type_error(argument, kind):
    np = pytest.importorskip("numpy")
    args = {"logits": torch.randn(2, 3), "target": torch.tensor([0, 1])}
    value = args[argument].tolist()
    args[argument] = value if kind == "list" else np.array(value)
    with pytest.raises(TypeError) as info:
        ncfast.rescaled_mse_loss(**args)
    assert str(info.value) == f"{P}{argument} must be a tensor, got {kind}"
    with pytest.raises(TypeError) as info:
        ncfast.RescaledMSELoss()(args["logits"], args["target"])
    assert str(info.value) == f"{P}{argument} must be a tensor, got {kind}"


@pytest.mark.parametrize("which", ["weight", "sample_weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_of_ignored_rows_are_never_read(device, which, reduction):
    # ignore_index = 2 is a class: rows labelled 2 are ignored, so weight[2] belongs to no row
    # that counts; sample_weight[i] of an ignored row i neither.
    logits = torch.randn(5, 4, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 1, 3, 2], device=device)
    w = torch.rand(4 if which == "weight" else 5, device=device, dtype=torch.float64) + 0.5
    poisoned = w.clone()
    poisoned[2 if which == "weight" else 1] = float("nan")
    poisoned[4 if which == "sample_weight" else 2] = float("nan")
    poisoned.requires_grad_()
    kwargs = dict(k=2.0, reduction=reduction, ignore_index=2)
    out = ncfast.rescaled_mse_loss(logits, target, **kwargs, **{which: poisoned})
    clean = ncfast.rescaled_mse_loss(logits, target, **kwargs, **{which: w})
    torch.testing.assert_close(out, clean)
    grads = torch.autograd.grad(out.sum(), (logits, poisoned))
    assert all(g.isfinite().all() for g in grads)

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
    "k-string": (z(2, 3), y(0, 1), dict(k="2"), TypeError, "k must be a Python number, got str"),
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
    with pytest.raises(ValueError, match=re.escape(expected)):
        ncfast.rescaled_mse_loss(logits, target, ignore_index=ignore_index)


def test_backward_op_treats_unchecked_labels_as_no_class(device):
    # Labels are validated by the forward op; called directly, the backward op neither syncs
    # nor reads out of bounds: an out-of-range row is a plain 2 g z.
    logits = torch.randn(3, 4, device=device, dtype=torch.float64)
    target = torch.tensor([1, 9, -3], device=device)
    grad = torch.tensor([1.0, 2.0, 3.0], device=device, dtype=torch.float64)
    out = torch.ops.ncfast.rescaled_mse_backward(grad, logits, target, 3.0, 2.0, -100)
    torch.testing.assert_close(out[1:], 2 * grad[1:, None] * logits[1:])
    expected0 = 2 * logits[0]
    expected0[1] = 2 * 3.0 * (logits[0, 1] - 2.0)
    torch.testing.assert_close(out[0], expected0)


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


@pytest.mark.cuda
def test_cuda_target_checks_can_be_turned_off():
    logits = torch.randn(2, 3, device="cuda", dtype=torch.float64)
    target = torch.tensor([0, 7], device="cuda")
    with ncfast.cuda_target_checks(False):
        per = ncfast.rescaled_mse_loss(logits, target, reduction="none")
    # An unchecked out-of-range label matches no class: the row is a plain sum of squares.
    torch.testing.assert_close(per[1], (logits[1] ** 2).sum())
    with pytest.raises(ValueError):
        ncfast.rescaled_mse_loss(logits, target)


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

// Argument validation of the rescaled-MSE ops, shared by every device.
#include <ncfast/loss.h>
#include <ncfast/message.h>

#include <atomic>
#include <cmath>
#include <optional>

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

namespace ncfast {
namespace {

constexpr const char* kOp = "ncfast.rescaled_mse_loss";
std::atomic<bool> g_cuda_target_checks{true};

std::string describe(const at::Tensor& t) {
  return cat(t.dim(), "-D tensor of shape ", t.sizes());
}

// The dtype as Python users write it ("torch.int64"), so messages match the fakes' messages.
std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace

void check_rescaled_mse_args(const at::Tensor& logits, const at::Tensor& target, double k,
                             double M, const at::Tensor* grad) {
  TORCH_CHECK_VALUE(logits.dim() == 2, cat(kOp, ": logits must be 2-D (batch, classes), got ",
                    describe(logits)));
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), cat(kOp,
                   ": logits must be float32, float64, bfloat16 or float16, got ",
                   py_dtype(logits.scalar_type())));
  TORCH_CHECK_VALUE(logits.size(1) >= 1,
                    cat(kOp, ": logits must have at least one class, got ", describe(logits)));
  TORCH_CHECK_VALUE(target.dim() == 1, cat(kOp, ": target must be 1-D (batch,), got ",
                    describe(target)));
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                   cat(kOp, ": target must be int64 or int32, got ",
                       py_dtype(target.scalar_type())));
  TORCH_CHECK_VALUE(target.size(0) == logits.size(0), cat(kOp,
                    ": target must have one label per row of logits: logits has ",
                    logits.size(0), " rows, target has ", target.size(0)));
  TORCH_CHECK_VALUE(target.device() == logits.device(), cat(kOp,
                    ": target must be on the same device as logits (", logits.device(),
                    "), got ", target.device()));
  TORCH_CHECK_VALUE(std::isfinite(k) && k > 0,
                    cat(kOp, ": k must be finite and > 0, got ", k));
  TORCH_CHECK_VALUE(std::isfinite(M), cat(kOp, ": M must be finite, got ", M));
  if (grad != nullptr) {
    TORCH_CHECK_VALUE(grad->dim() == 1 && grad->size(0) == logits.size(0), cat(kOp,
                      ": grad must be 1-D with one entry per row of logits (", logits.size(0),
                      "), got ", describe(*grad)));
    TORCH_CHECK_TYPE(grad->scalar_type() == loss_dtype(logits.scalar_type()), cat(kOp,
                     ": grad must be ", py_dtype(loss_dtype(logits.scalar_type())), " for ",
                     py_dtype(logits.scalar_type()), " logits, got ",
                     py_dtype(grad->scalar_type())));
    TORCH_CHECK_VALUE(grad->device() == logits.device(), cat(kOp,
                      ": grad must be on the same device as logits (", logits.device(),
                      "), got ", grad->device()));
  }
}

void check_target_values(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  if (target.numel() == 0) {
    return;
  }
  const auto is_bad = [&](int64_t v) { return v != ignore_index && (v < 0 || v >= num_classes); };
  std::optional<int64_t> first_bad;
  if (target.is_cpu()) {  // a plain scan: no temporaries, no dispatcher round trips
    const at::Tensor t = target.contiguous();
    AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "check_target_values", [&] {
      const index_t* y = t.const_data_ptr<index_t>();
      for (int64_t i = 0; i < t.numel() && !first_bad; ++i) {
        if (is_bad(y[i])) first_bad = y[i];
      }
    });
  } else {  // device tensors: reduce there, read back one flag (the host sync)
    const at::Tensor bad =
        target.ne(ignore_index).logical_and_(target.lt(0).logical_or_(target.ge(num_classes)));
    if (bad.any().item<bool>()) {
      first_bad = target.masked_select(bad)[0].item<int64_t>();
    }
  }
  TORCH_CHECK_VALUE(!first_bad, cat(kOp, ": target values must be in [0, ", num_classes,
                    ") or ignore_index=", ignore_index, ", got ", first_bad.value_or(int64_t{0})));
}

bool cuda_target_checks_enabled() { return g_cuda_target_checks.load(); }

bool set_cuda_target_checks(bool enabled) { return g_cuda_target_checks.exchange(enabled); }

}  // namespace ncfast

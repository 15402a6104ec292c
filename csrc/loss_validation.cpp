// Argument validation of the rescaled-MSE ops, shared by every device.
#include <ncfast/loss.h>
#include <ncfast/message.h>

#include <atomic>
#include <cmath>
#include <initializer_list>

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

void check_reduced_args(const at::Tensor& logits, const at::Tensor& target, double k, double M,
                        double scale) {
  check_rescaled_mse_args(logits, target, k, M);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0,
                    cat(kOp, ": scale must be finite and > 0, got ", scale));
}

void check_reduced_backward_args(const at::Tensor& grad, const at::Tensor& row_scale,
                                 const at::Tensor& logits, const at::Tensor& target, double k,
                                 double M) {
  check_rescaled_mse_args(logits, target, k, M);
  TORCH_CHECK_VALUE(grad.dim() == 0, cat(kOp, ": grad must be 0-D (the loss is), got ",
                                         describe(grad)));
  TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(), cat(kOp, ": grad must be ",
                   py_dtype(logits.scalar_type()), " like the logits, got ",
                   py_dtype(grad.scalar_type())));
  TORCH_CHECK_VALUE(row_scale.dim() == 0, cat(kOp, ": row_scale must be 0-D, got ",
                                              describe(row_scale)));
  TORCH_CHECK_TYPE(row_scale.scalar_type() == loss_dtype(logits.scalar_type()), cat(kOp,
                   ": row_scale must be ", py_dtype(loss_dtype(logits.scalar_type())), " for ",
                   py_dtype(logits.scalar_type()), " logits, got ",
                   py_dtype(row_scale.scalar_type())));
  for (const at::Tensor* t : {&grad, &row_scale}) {
    TORCH_CHECK_VALUE(t->device() == logits.device(), cat(kOp,
                      ": grad and row_scale must be on the same device as logits (",
                      logits.device(), "), got ", t->device()));
  }
}

std::string_view label_error_op(int32_t op) {
  return op == 1 ? "ncfast.linear_rescaled_mse_loss" : kOp;
}

int32_t label_error_op_code(std::string_view name) {
  for (int32_t op : {0, 1}) {
    if (label_error_op(op) == name) return op;
  }
  TORCH_CHECK_VALUE(false, cat("ncfast.check_labels: op must be 'ncfast.rescaled_mse_loss' or "
                               "'ncfast.linear_rescaled_mse_loss', got '", std::string(name),
                               "'"));
  return 0;
}

namespace {

void raise_label_error(int32_t op, int64_t num_classes, int64_t ignore_index, int64_t value) {
  TORCH_CHECK_VALUE(false, cat(std::string(label_error_op(op)), ": target values must be in [0, ",
                               num_classes, ") or ignore_index=", ignore_index, ", got ", value));
}

std::atomic<LabelErrorSlot*> g_slots{nullptr};
std::atomic<void (*)(int)> g_rearm{nullptr};
std::atomic<uint64_t> g_devices{0};  // bit d: device d, see mark_label_error_device

}  // namespace

void check_guard_budget_args(const at::Tensor& count, int64_t budget) {
  TORCH_CHECK_VALUE(count.dim() == 0, cat("ncfast.check_guard_budget: count must be 0-D, got ",
                                          describe(count)));
  TORCH_CHECK_TYPE(count.scalar_type() == at::kLong, cat(
      "ncfast.check_guard_budget: count must be torch.int64, got ",
      py_dtype(count.scalar_type())));
  TORCH_CHECK_VALUE(budget >= 0, cat("ncfast.check_guard_budget: budget must be >= 0, got ",
                                     budget));
}

void raise_guard_budget_error(int64_t count, int64_t budget) {
  TORCH_CHECK_VALUE(false, cat(
      "ncfast.linear_rescaled_mse_loss: the gram method's cancellation guard flagged ", count,
      " rows for an exact recompute, more than guard_budget=", budget, "; the rows beyond it "
      "kept the Gram form's rounding. Pass a larger guard_budget (at most the batch size) or "
      "method='chunked'"));
}

void check_target_values(const at::Tensor& target, int64_t num_classes, int64_t ignore_index,
                         int32_t op) {
  TORCH_INTERNAL_ASSERT(target.is_cpu());
  const at::Tensor t = target.contiguous();
  AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "check_target_values", [&] {
    const index_t* y = t.const_data_ptr<index_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {  // a plain scan: no temporaries
      const int64_t v = y[i];
      if (v != ignore_index && (v < 0 || v >= num_classes)) {
        raise_label_error(op, num_classes, ignore_index, v);
      }
    }
  });
}

void install_label_error_slots(LabelErrorSlot* slots, void (*rearm)(int device)) {
  g_rearm.store(rearm);
  g_slots.store(slots);
}

void raise_pending_label_errors() {
  LabelErrorSlot* slots = g_slots.load(std::memory_order_acquire);
  if (slots == nullptr) {
    return;
  }
  for (int device = 0; device < kMaxDevices; ++device) {
    LabelErrorSlot& slot = slots[device];
    // Written by the device: read through volatile, the payload only after `ready`.
    if (*static_cast<volatile int32_t*>(&slot.ready) == 0) {
      continue;
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    const auto* p = static_cast<volatile LabelErrorSlot*>(&slot);
    const int32_t op = p->op;
    const int64_t value = p->value, K = p->num_classes, ignore_index = p->ignore_index;
    *static_cast<volatile int32_t*>(&slot.ready) = 0;
    g_rearm.load()(device);  // the next bad label on this device is recorded again
    if (op == kGuardBudgetError) raise_guard_budget_error(value, K);
    raise_label_error(op, K, ignore_index, value);
  }
}

void mark_label_error_device(int device) {
  g_devices.fetch_or(uint64_t{1} << device);
}

std::vector<int64_t> label_error_devices() {
  const uint64_t mask = g_devices.load();
  std::vector<int64_t> devices;
  for (int device = 0; device < kMaxDevices; ++device) {
    if (mask >> device & 1) devices.push_back(device);
  }
  return devices;
}

bool cuda_target_checks_enabled() { return g_cuda_target_checks.load(); }

bool set_cuda_target_checks(bool enabled) { return g_cuda_target_checks.exchange(enabled); }

}  // namespace ncfast

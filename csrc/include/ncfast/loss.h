// Shared by the CPU and CUDA implementations of the rescaled-MSE ops: argument validation
// (so messages are identical on every device), the accumulate-type convention and the
// deferred label errors that CUDA kernels record on the device.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>

namespace ncfast {

// Shape, dtype, device and scalar checks of ncfast::rescaled_mse (mirrored by the fake in
// ncfast/_ops.py). `grad` is checked too when not null (the per-row backward op).
void check_rescaled_mse_args(const at::Tensor& logits, const at::Tensor& target, double k,
                             double M, const at::Tensor* grad = nullptr);

// The checks of the reduced ops: those above, then `scale` finite and > 0; for the backward,
// `grad` a 0-dim tensor of the logits' dtype and `row_scale` a 0-dim tensor of the accumulate
// type, on the logits' device.
void check_reduced_args(const at::Tensor& logits, const at::Tensor& target, double k, double M,
                        double scale);
void check_reduced_backward_args(const at::Tensor& grad, const at::Tensor& row_scale,
                                 const at::Tensor& logits, const at::Tensor& target, double k,
                                 double M);

// Label range check of CPU tensors: raises at once, naming the first bad value. `op` is the
// public function named in the message (see label_error_op).
void check_target_values(const at::Tensor& target, int64_t num_classes, int64_t ignore_index,
                         int32_t op = 0);

// CUDA labels are checked on the device: a kernel that meets a label outside [0, K) and not
// ignore_index gives that row zero loss and zero gradient and records the first such label
// in a slot of pinned host memory. The host reads the slot without synchronising, at the
// start of every ncfast loss op and in ncfast.check_errors(), and raises it there.
// The same slot carries the fused linear loss's guard-budget error (op kGuardBudgetError):
// value is then the number of rows the guard flagged, num_classes the budget.
struct LabelErrorSlot {
  int32_t ready;  // set last, after a __threadfence_system(), by the kernel that claimed it
  int32_t op;     // index into label_error_op, or kGuardBudgetError
  int64_t value;
  int64_t num_classes;
  int64_t ignore_index;
};
constexpr int32_t kGuardBudgetError = 2;
constexpr int kMaxDevices = 64;

// Public functions whose labels are checked (the prefix of their messages).
std::string_view label_error_op(int32_t op);
int32_t label_error_op_code(std::string_view name);  // throws ValueError if unknown

// The gram method of the fused linear loss recomputes at most `budget` rows that its
// cancellation guard flags; `count` (0-dim int64) rows were flagged. More than the budget is
// an error: raised at once for a CPU count, recorded on the device (raised like a bad label,
// whatever set_cuda_target_checks says) for a CUDA one.
void check_guard_budget_args(const at::Tensor& count, int64_t budget);
void raise_guard_budget_error(int64_t count, int64_t budget);  // throws ValueError

// Installed by the CUDA back end on first use: the slots (one per device) and a function that
// re-arms a device after its error was raised. Null in CPU-only processes.
void install_label_error_slots(LabelErrorSlot* slots, void (*rearm)(int device));
// Raise (ValueError) the first label error recorded on any device and not yet raised.
void raise_pending_label_errors();
// The devices whose kernels may record an error (each marked by the CUDA back end on its first
// checked call there): the ones ncfast.check_errors() waits for, so that it creates no CUDA
// context on a device this process never used (one per GPU under torchrun otherwise).
void mark_label_error_device(int device);
std::vector<int64_t> label_error_devices();

bool cuda_target_checks_enabled();
bool set_cuda_target_checks(bool enabled);  // returns the previous setting

// Per-sample losses are returned in the accumulate type: float32 for bf16/fp16/fp32 logits,
// float64 for float64 logits. Sums over classes and rows are carried in float64 whatever the
// dtype (each float32 partial adds at most 8 terms), so the loss keeps ~1e-7 relative error
// for any K.
inline at::ScalarType loss_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ncfast

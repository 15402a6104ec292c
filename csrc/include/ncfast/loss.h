// Shared by the CPU and CUDA implementations of the rescaled-MSE ops: argument validation
// (so messages are identical on every device) and the accumulate-type convention.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>

namespace ncfast {

// Shape, dtype, device and scalar checks of ncfast::rescaled_mse (mirrored by the fake in
// ncfast/_ops.py). `grad` is checked too when not null (the backward op).
void check_rescaled_mse_args(const at::Tensor& logits, const at::Tensor& target, double k,
                             double M, const at::Tensor* grad = nullptr);

// Label range check, done by the forward op. Reads the labels, so on CUDA it costs one host
// synchronisation; the CUDA forward skips it while a stream is being captured or when checks
// are turned off. Kernels only compare labels (or guard the index), so any label is safe.
void check_target_values(const at::Tensor& target, int64_t num_classes, int64_t ignore_index);

bool cuda_target_checks_enabled();
bool set_cuda_target_checks(bool enabled);  // returns the previous setting

// Per-sample losses are returned in the accumulate type: float32 for bf16/fp16/fp32 logits,
// float64 for float64 logits.
inline at::ScalarType loss_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ncfast

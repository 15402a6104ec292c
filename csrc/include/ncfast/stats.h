// Shared by the CPU and CUDA implementations of the class-statistics op: argument validation
// (identical messages on every device).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace ncfast {

// Checks of ncfast::class_moments (mirrored by the fake in ncfast/_ops.py).
void check_class_moments_args(const at::Tensor& features, const at::Tensor& labels,
                              const at::Tensor& shift);

// Checks of ncfast::nc4_mismatches.
void check_nc4_args(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                    const at::Tensor& sq_norms);

}  // namespace ncfast

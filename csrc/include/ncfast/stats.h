// Shared by the CPU and CUDA implementations of the class-statistics op: argument validation
// (identical messages on every device).
#pragma once

#include <ATen/core/Tensor.h>

namespace ncfast {

// Checks of ncfast::class_moments (mirrored by the fake in ncfast/_ops.py).
void check_class_moments_args(const at::Tensor& features, const at::Tensor& labels,
                              const at::Tensor& shift);

}  // namespace ncfast

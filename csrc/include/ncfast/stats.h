// Shared by the CPU and CUDA implementations of the class-statistics op: argument validation
// (identical messages on every device).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace ncfast {

// Checks of ncfast::class_moments (mirrored by the fake in ncfast/_ops.py).
void check_class_moments_args(const at::Tensor& features, const at::Tensor& labels,
                              const at::Tensor& shift);

// The extra rules of ncfast::class_moments_ (in place): features contiguous, of shift's dtype.
void check_class_moments_inplace_args(const at::Tensor& features, const at::Tensor& shift);

// The outputs of ncfast::class_moments, allocated for a batch of B rows: counts, sums and sq
// zeroed (kernels accumulate into them), shifted uninitialised (kernels write every entry).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> new_class_moments(
    int64_t B, const at::Tensor& shift);

// Checks of ncfast::nc4_mismatches.
void check_nc4_args(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                    const at::Tensor& sq_norms, const std::optional<at::Tensor>& skip);

}  // namespace ncfast

// Argument validation and output allocation of the class-statistics ops, shared by every
// device.
#include <ncfast/message.h>
#include <ncfast/stats.h>


#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

namespace ncfast {

void check_class_moments_args(const at::Tensor& features, const at::Tensor& labels,
                              const at::Tensor& shift) {
  constexpr const char* op = "ncfast.ClassStats.update";
  TORCH_CHECK_VALUE(features.dim() == 2,
                    cat(op, ": features must be 2-D (batch, dim), got shape ", features.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()), cat(op,
                   ": features must have a floating dtype, got ", features.scalar_type()));
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0), cat(op,
                    ": labels must be 1-D with one label per row of features (",
                    features.size(0), "), got shape ", labels.sizes()));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   cat(op, ": labels must be int64 or int32, got ", labels.scalar_type()));
  TORCH_CHECK_VALUE(shift.dim() == 2 && shift.size(1) == features.size(1), cat(op,
                    ": features must have ", shift.size(1), " columns (dim), got ",
                    features.size(1)));
  TORCH_CHECK_TYPE(shift.scalar_type() == at::toOpMathType(features.scalar_type()), cat(op,
                   ": the state dtype must be the accumulate type of the features"));
  TORCH_CHECK_VALUE(labels.device() == features.device() && shift.device() == features.device(),
                    cat(op, ": features, labels and the state must be on one device"));
}

void check_class_moments_inplace_args(const at::Tensor& features, const at::Tensor& shift) {
  constexpr const char* op = "ncfast.ClassStats.update";
  TORCH_CHECK_TYPE(features.scalar_type() == shift.scalar_type(), cat(op,
                   ": shifting in place needs features of the state dtype"));
  TORCH_CHECK_VALUE(features.is_contiguous(), cat(op,
                    ": shifting in place needs contiguous features"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> new_class_moments(
    int64_t B, const at::Tensor& shift) {
  const int64_t K = shift.size(0), d = shift.size(1);
  const auto options = shift.options();
  return {at::zeros({K}, options.dtype(at::kLong)), at::zeros({K, d}, options),
          at::zeros({K}, options), at::empty({B, d}, options)};
}

void check_nc4_args(const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                    const at::Tensor& sq_norms, const std::optional<at::Tensor>& skip) {
  constexpr const char* op = "ncfast.ClassStats (NC4)";
  TORCH_CHECK_VALUE(sq_norms.dim() == 1 && sq_norms.size(0) >= 1, cat(op,
                    ": sq_norms must be 1-D with one entry per class"));
  const int64_t K = sq_norms.size(0);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(1) == 2 * K, cat(op,
                    ": scores must be (batch, 2K) = (batch, ", 2 * K, ")"));
  TORCH_CHECK_TYPE(scores.scalar_type() == sq_norms.scalar_type() &&
                       (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble),
                   cat(op, ": scores and sq_norms must share a float32 or float64 dtype"));
  TORCH_CHECK_VALUE(sq_norms.device() == scores.device(), cat(op, ": inputs must share a device"));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == K, cat(op,
                      ": bias must be 1-D with one entry per class"));
    TORCH_CHECK_TYPE(bias->scalar_type() == scores.scalar_type(), cat(op,
                     ": bias must have the dtype of scores"));
    TORCH_CHECK_VALUE(bias->device() == scores.device(), cat(op, ": inputs must share a device"));
  }
  if (skip.has_value()) {
    TORCH_CHECK_VALUE(skip->dim() == 1 && skip->size(0) == scores.size(0), cat(op,
                      ": skip must be 1-D with one entry per row of scores"));
    TORCH_CHECK_TYPE(skip->scalar_type() == at::kBool, cat(op, ": skip must be bool"));
    TORCH_CHECK_VALUE(skip->device() == scores.device(), cat(op, ": inputs must share a device"));
  }
}

}  // namespace ncfast

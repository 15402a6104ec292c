// Argument validation of the class-statistics op, shared by every device.
#include <ncfast/stats.h>

#include <sstream>

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

namespace ncfast {

void check_class_moments_args(const at::Tensor& features, const at::Tensor& labels,
                              const at::Tensor& shift) {
  constexpr const char* op = "ncfast.ClassStats.update";
  std::ostringstream fs, ls;
  fs << features.sizes();
  ls << labels.sizes();
  TORCH_CHECK_VALUE(features.dim() == 2, op, ": features must be 2-D (batch, dim), got shape ",
                    fs.str());
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()), op,
                   ": features must have a floating dtype, got ", features.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0), op,
                    ": labels must be 1-D with one label per row of features (",
                    features.size(0), "), got shape ", ls.str());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
                   ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(shift.dim() == 2 && shift.size(1) == features.size(1), op,
                    ": features must have ", shift.size(1), " columns (dim), got ",
                    features.size(1));
  TORCH_CHECK_TYPE(shift.scalar_type() == at::toOpMathType(features.scalar_type()), op,
                   ": the state dtype must be the accumulate type of the features");
  TORCH_CHECK_VALUE(labels.device() == features.device() && shift.device() == features.device(),
                    op, ": features, labels and the state must be on one device");
}

}  // namespace ncfast

// CPU kernels of the rescaled-MSE ops: rows split across threads with at::parallel_for; the
// inner loops over classes are plain contiguous loops the compiler vectorises. Sums are carried
// in float64 and reduced in an order fixed by the shape alone, so results do not depend on the
// number of threads.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <ncfast/loss.h>

namespace ncfast {
namespace {

// sum_j x_j^2 in float64. Sixteen lanes in the input's accumulate type (the compiler keeps them
// in vector registers, so the loop is bound by memory), each adding at most kDepth terms before
// the block is folded into float64: the relative error stays below (kDepth + 1) 2^-24 for any
// length (sixteen running float32 sums lose ~1e-3 at K = 2e7).
template <typename scalar_t>
inline double sum_squares(const scalar_t* x, int64_t n) {
  using part_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr int kLanes = 16, kDepth = 8, kBlock = kLanes * kDepth;
  double total = 0;
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) {
    part_t part[kLanes] = {};
    for (int d = 0; d < kDepth; ++d) {
#pragma omp simd
      for (int u = 0; u < kLanes; ++u) {
        const part_t v = static_cast<part_t>(x[j + d * kLanes + u]);
        part[u] += v * v;
      }
    }
    double block = 0;
    for (int u = 0; u < kLanes; ++u) {
      block += part[u];
    }
    total += block;
  }
  for (; j < n; ++j) {
    const double v = static_cast<double>(x[j]);
    total += v * v;
  }
  return total;
}

// The loss of one counted row (0 <= y < K). Off-target classes and the target apart: subtracting
// z_y^2 from a full sum of squares would cancel catastrophically near collapse (z ~ M e_y).
template <typename scalar_t>
inline double row_loss(const scalar_t* row, int64_t y, int64_t K, double k, double M) {
  const double r = static_cast<double>(row[y]) - M;
  return sum_squares(row, y) + sum_squares(row + y + 1, K - y - 1) + k * r * r;
}

inline bool counted(int64_t y, int64_t K, int64_t ignore_index) {
  return y != ignore_index && y >= 0 && y < K;
}

// About 32k elements per task, as ATen's own elementwise kernels use.
int64_t rows_per_task(int64_t num_classes) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, num_classes));
}

at::Tensor rescaled_mse_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, double k,
                            double M, int64_t ignore_index) {
  raise_pending_label_errors();
  check_rescaled_mse_args(logits_in, target_in, k, M);
  const int64_t B = logits_in.size(0), K = logits_in.size(1);
  check_target_values(target_in, K, ignore_index);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  at::Tensor out = at::empty({B}, logits.options().dtype(loss_dtype(logits.scalar_type())));
  if (B == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rescaled_mse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "rescaled_mse_cpu", [&] {
      const scalar_t* z = logits.const_data_ptr<scalar_t>();
      const index_t* y = target.const_data_ptr<index_t>();
      acc_t* loss = out.mutable_data_ptr<acc_t>();
      at::parallel_for(0, B, rows_per_task(K), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          loss[i] = counted(y[i], K, ignore_index)
                        ? static_cast<acc_t>(row_loss(z + i * K, y[i], K, k, M))
                        : acc_t(0);
        }
      });
    });
  });
  return out;
}

// (loss, row_scale): loss = row_scale * sum_i loss_i over counted rows, in the logits' dtype;
// row_scale = scale / (number of counted rows) if mean, else scale (inf when mean and no row
// counts, so the loss is NaN). Rows are summed in blocks whose size depends on K only, then
// the blocks in order: the same result with any number of threads.
std::tuple<at::Tensor, at::Tensor> rescaled_mse_reduced_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, double k, double M,
    int64_t ignore_index, double scale, bool mean) {
  raise_pending_label_errors();
  check_reduced_args(logits_in, target_in, k, M, scale);
  const int64_t B = logits_in.size(0), K = logits_in.size(1);
  check_target_values(target_in, K, ignore_index);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::ScalarType acc = loss_dtype(logits.scalar_type());
  at::Tensor loss = at::empty({}, logits.options());
  at::Tensor row_scale = at::empty({}, logits.options().dtype(acc));
  const int64_t rows_per_block = rows_per_task(K);
  const int64_t blocks = (B + rows_per_block - 1) / rows_per_block;
  std::vector<double> partial(blocks, 0.0);
  std::vector<int64_t> count(blocks, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rescaled_mse_reduced_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "rescaled_mse_reduced_cpu", [&] {
      const scalar_t* z = logits.const_data_ptr<scalar_t>();
      const index_t* y = target.const_data_ptr<index_t>();
      const auto sum_blocks = [&](int64_t first, int64_t last) {
        for (int64_t blk = first; blk < last; ++blk) {
          double s = 0;
          int64_t n = 0;
          for (int64_t i = blk * rows_per_block; i < std::min(B, (blk + 1) * rows_per_block);
               ++i) {
            if (counted(y[i], K, ignore_index)) {
              s += row_loss(z + i * K, y[i], K, k, M);
              ++n;
            }
          }
          partial[blk] = s;
          count[blk] = n;
        }
      };
      // One block (small inputs) runs inline: an OpenMP region for it costs more than the work,
      // and far more when the other threads are busy.
      if (blocks > 1) {
        at::parallel_for(0, blocks, 1, sum_blocks);
      } else {
        sum_blocks(0, blocks);
      }
      double total = 0;
      int64_t rows = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        total += partial[blk];
        rows += count[blk];
      }
      const double rs = mean ? scale / static_cast<double>(rows) : scale;
      loss.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(total * rs);
      row_scale.mutable_data_ptr<acc_t>()[0] = static_cast<acc_t>(rs);
    });
  });
  return {loss, row_scale};
}

// grad_logits[i, j] = c_i w_ij (z_ij - M [j = y_i]) with c_i from `coeff(i)`; zero on rows that
// do not count (ignored, or a label outside [0, K), even where their logits are not finite).
template <typename scalar_t, typename index_t, typename Coeff>
void backward_rows(const scalar_t* z, const index_t* y, scalar_t* dz, int64_t B, int64_t K,
                   double k, double M, int64_t ignore_index, Coeff coeff) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t kk = static_cast<acc_t>(k), MM = static_cast<acc_t>(M);
  at::parallel_for(0, B, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t yi = y[i];
      const scalar_t* row = z + i * K;
      scalar_t* drow = dz + i * K;
      if (!counted(yi, K, ignore_index)) {
        std::fill(drow, drow + K, scalar_t(0));
        continue;
      }
      const acc_t c = coeff(i);
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) {
        drow[j] = static_cast<scalar_t>(c * static_cast<acc_t>(row[j]));
      }
      drow[yi] = static_cast<scalar_t>(c * kk * (static_cast<acc_t>(row[yi]) - MM));
    }
  });
}

at::Tensor rescaled_mse_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                     const at::Tensor& target_in, double k, double M,
                                     int64_t ignore_index) {
  raise_pending_label_errors();
  check_rescaled_mse_args(logits_in, target_in, k, M, &grad_in);
  const int64_t B = logits_in.size(0), K = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty({B, K}, logits.options());
  if (B == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rescaled_mse_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "rescaled_mse_backward_cpu", [&] {
      const acc_t* g = grad.const_data_ptr<acc_t>();
      backward_rows(logits.const_data_ptr<scalar_t>(), target.const_data_ptr<index_t>(),
                    out.mutable_data_ptr<scalar_t>(), B, K, k, M, ignore_index,
                    [g](int64_t i) { return 2 * g[i]; });
    });
  });
  return out;
}

at::Tensor rescaled_mse_reduced_backward_cpu(const at::Tensor& grad, const at::Tensor& row_scale,
                                             const at::Tensor& logits_in,
                                             const at::Tensor& target_in, double k, double M,
                                             int64_t ignore_index) {
  raise_pending_label_errors();
  check_reduced_backward_args(grad, row_scale, logits_in, target_in, k, M);
  const int64_t B = logits_in.size(0), K = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  at::Tensor out = at::empty({B, K}, logits.options());
  if (B == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rescaled_mse_reduced_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "rescaled_mse_reduced_backward_cpu", [&] {
      const acc_t c = 2 * static_cast<acc_t>(grad.const_data_ptr<scalar_t>()[0]) *
                      row_scale.const_data_ptr<acc_t>()[0];
      backward_rows(logits.const_data_ptr<scalar_t>(), target.const_data_ptr<index_t>(),
                    out.mutable_data_ptr<scalar_t>(), B, K, k, M, ignore_index,
                    [c](int64_t) { return c; });
    });
  });
  return out;
}

void check_labels_cpu(const at::Tensor& target, int64_t num_classes, int64_t ignore_index,
                      c10::string_view op) {
  raise_pending_label_errors();
  check_target_values(target, num_classes, ignore_index,
                      label_error_op_code(std::string_view(op.data(), op.size())));
}

void check_guard_budget_cpu(const at::Tensor& count, int64_t budget) {
  raise_pending_label_errors();
  check_guard_budget_args(count, budget);
  const int64_t flagged = count.item<int64_t>();
  if (flagged > budget) raise_guard_budget_error(flagged, budget);
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, CPU, m) {
  m.impl("rescaled_mse", &ncfast::rescaled_mse_cpu);
  m.impl("rescaled_mse_backward", &ncfast::rescaled_mse_backward_cpu);
  m.impl("rescaled_mse_reduced", &ncfast::rescaled_mse_reduced_cpu);
  m.impl("rescaled_mse_reduced_backward", &ncfast::rescaled_mse_reduced_backward_cpu);
  m.impl("check_labels", &ncfast::check_labels_cpu);
  m.impl("check_guard_budget", &ncfast::check_guard_budget_cpu);
}

// CPU kernels of the rescaled-MSE ops: rows split across threads with at::parallel_for; the
// inner loops over classes are plain contiguous loops the compiler vectorises.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <ncfast/loss.h>

namespace ncfast {
namespace {

// Sixteen independent partial sums: the compiler keeps them in vector registers, so the
// loop is bound by memory rather than by the latency of one chain of additions.
template <typename acc_t, typename scalar_t>
inline acc_t sum_squares(const scalar_t* x, int64_t n) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int u = 0; u < kLanes; ++u) {
      const acc_t v = static_cast<acc_t>(x[j + u]);
      part[u] += v * v;
    }
  }
  acc_t acc = 0;
  for (; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    acc += v * v;
  }
  for (int u = 0; u < kLanes; ++u) {
    acc += part[u];
  }
  return acc;
}

// dst[j] = c * x[j], in the accumulate type.
template <typename acc_t, typename scalar_t>
inline void scale_into(scalar_t* dst, const scalar_t* x, acc_t c, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = static_cast<scalar_t>(c * static_cast<acc_t>(x[j]));
  }
}

// About 32k elements per task, as ATen's own elementwise kernels use.
int64_t rows_per_task(int64_t num_classes) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, num_classes));
}

at::Tensor rescaled_mse_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, double k,
                            double M, int64_t ignore_index) {
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
      const acc_t kk = static_cast<acc_t>(k), MM = static_cast<acc_t>(M);
      at::parallel_for(0, B, rows_per_task(K), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t yi = y[i];
          if (yi == ignore_index) {
            loss[i] = 0;
            continue;
          }
          const scalar_t* row = z + i * K;
          if (yi < 0 || yi >= K) {  // unreachable after the label check; kept memory-safe
            loss[i] = sum_squares<acc_t>(row, K);
            continue;
          }
          // Off-target classes and the target apart: subtracting z_y^2 from a full sum of
          // squares would cancel catastrophically near collapse (z ~ M e_y).
          const acc_t r = static_cast<acc_t>(row[yi]) - MM;
          loss[i] = sum_squares<acc_t>(row, yi) + sum_squares<acc_t>(row + yi + 1, K - yi - 1) +
                    kk * r * r;
        }
      });
    });
  });
  return out;
}

at::Tensor rescaled_mse_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                     const at::Tensor& target_in, double k, double M,
                                     int64_t ignore_index) {
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
      const scalar_t* z = logits.const_data_ptr<scalar_t>();
      const index_t* y = target.const_data_ptr<index_t>();
      const acc_t* g = grad.const_data_ptr<acc_t>();
      scalar_t* dz = out.mutable_data_ptr<scalar_t>();
      const acc_t kk = static_cast<acc_t>(k), MM = static_cast<acc_t>(M);
      at::parallel_for(0, B, rows_per_task(K), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t yi = y[i];
          const scalar_t* row = z + i * K;
          scalar_t* drow = dz + i * K;
          if (yi == ignore_index) {  // zero even where the ignored logits are not finite
            std::fill(drow, drow + K, scalar_t(0));
            continue;
          }
          const acc_t c = 2 * g[i];
          scale_into(drow, row, c, K);
          if (yi >= 0 && yi < K) {  // labels are validated by the forward op
            drow[yi] = static_cast<scalar_t>(c * kk * (static_cast<acc_t>(row[yi]) - MM));
          }
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, CPU, m) {
  m.impl("rescaled_mse", &ncfast::rescaled_mse_cpu);
  m.impl("rescaled_mse_backward", &ncfast::rescaled_mse_backward_cpu);
}

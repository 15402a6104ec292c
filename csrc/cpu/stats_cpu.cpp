// CPU kernel of the class-statistics op: one pass over a batch that shifts every row by its
// class's reference point and accumulates per-class counts, sums and squared norms.
#include <algorithm>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <ncfast/stats.h>

namespace ncfast {
namespace {

// Writes the shifted rows into `shifted` (which may be `features` itself: each element is read
// before it is written, by the same iteration) and accumulates counts, sums and sq.
void class_moments_into(const at::Tensor& features, const at::Tensor& labels,
                        const at::Tensor& shift, const at::Tensor& shifted,
                        const at::Tensor& counts, const at::Tensor& sums, const at::Tensor& sq) {
  const int64_t B = features.size(0), d = features.size(1), K = shift.size(0);
  if (B == 0 || d == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "class_moments_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "class_moments_cpu", [&] {
      const scalar_t* x = features.const_data_ptr<scalar_t>();  // may alias out
      const index_t* y = labels.const_data_ptr<index_t>();
      const acc_t* c = shift.const_data_ptr<acc_t>();
      acc_t* out = shifted.mutable_data_ptr<acc_t>();
      acc_t* sum = sums.mutable_data_ptr<acc_t>();
      acc_t* sq_total = sq.mutable_data_ptr<acc_t>();
      int64_t* n = counts.mutable_data_ptr<int64_t>();
      for (int64_t i = 0; i < B; ++i) {
        if (y[i] >= 0 && y[i] < K) ++n[y[i]];
      }
      // Threads own contiguous row blocks (streaming reads and writes); each block but the
      // first accumulates into its own (K, d) partial sums, added up at the end. Column blocks
      // measured slower: every thread then walks every row. The partial sums are kept no
      // larger than the batch: at vocabulary-scale K, zeroing and adding a (K, d) block per
      // thread would cost more than the rows themselves.
      const int64_t blocks =
          std::clamp<int64_t>(std::min<int64_t>(B / 512, 1 + B / std::max<int64_t>(K, 1)), 1,
                              static_cast<int64_t>(at::get_num_threads()));
      at::Tensor partial_sums, partial_sq;
      if (blocks > 1) {
        partial_sums = at::zeros({blocks - 1, K, d}, sums.options());
        partial_sq = at::zeros({blocks - 1, K}, sq.options());
      }
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          acc_t* sum_b = b == 0 ? sum : partial_sums.mutable_data_ptr<acc_t>() + (b - 1) * K * d;
          acc_t* sq_b = b == 0 ? sq_total : partial_sq.mutable_data_ptr<acc_t>() + (b - 1) * K;
          for (int64_t i = B * b / blocks; i < B * (b + 1) / blocks; ++i) {
            const int64_t k = y[i];
            acc_t* oi = out + i * d;
            if (k < 0 || k >= K) {  // a skipped row (labels are never used as addresses out of
                                    // range): adds nothing to the Gram product either
              std::fill(oi, oi + d, acc_t(0));
              continue;
            }
            const scalar_t* xi = x + i * d;
            const acc_t* ck = c + k * d;
            acc_t* sk = sum_b + k * d;
            acc_t q = 0;
            // Rows never overlap the sums they update; simd makes the loop vectorise despite
            // the reduction (no -ffast-math here). _Pragma: this is inside a dispatch macro.
            _Pragma("omp simd reduction(+ : q)")
            for (int64_t j = 0; j < d; ++j) {
              const acc_t v = static_cast<acc_t>(xi[j]) - ck[j];
              oi[j] = v;
              sk[j] += v;
              q += v * v;
            }
            sq_b[k] += q;
          }
        }
      });
      if (blocks > 1) {
        sums.add_(partial_sums.sum(0));
        sq.add_(partial_sq.sum(0));
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_moments_cpu(
    const at::Tensor& features_in, const at::Tensor& labels_in, const at::Tensor& shift_in) {
  check_class_moments_args(features_in, labels_in, shift_in);
  const at::Tensor features = features_in.contiguous();
  const at::Tensor shift = shift_in.contiguous();
  auto [counts, sums, sq, shifted] = new_class_moments(features.size(0), shift);
  class_moments_into(features, labels_in.contiguous(), shift, shifted, counts, sums, sq);
  return {counts, sums, sq, shifted};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_inplace_cpu(
    at::Tensor& features, const at::Tensor& labels, const at::Tensor& shift_in) {
  check_class_moments_args(features, labels, shift_in);
  check_class_moments_inplace_args(features, shift_in);
  const at::Tensor shift = shift_in.contiguous();
  auto [counts, sums, sq, unused] = new_class_moments(0, shift);
  class_moments_into(features, labels.contiguous(), shift, features, counts, sums, sq);
  return {counts, sums, sq};
}

at::Tensor nc4_mismatches_cpu(const at::Tensor& scores_in, const std::optional<at::Tensor>& bias,
                              const at::Tensor& sq_norms_in,
                              const std::optional<at::Tensor>& skip_in) {
  check_nc4_args(scores_in, bias, sq_norms_in, skip_in);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor sq_norms = sq_norms_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::zeros_like(sq_norms);
  const at::Tensor skip = skip_in.has_value() ? skip_in->contiguous() : at::Tensor();
  const bool* skipped = skip.defined() ? skip.const_data_ptr<bool>() : nullptr;
  const int64_t B = scores.size(0), K = sq_norms.size(0);
  int64_t mismatches = 0;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "nc4_mismatches_cpu", [&] {
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const scalar_t* bb = b.const_data_ptr<scalar_t>();
    const scalar_t* q = sq_norms.const_data_ptr<scalar_t>();
    std::mutex lock;
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      for (int64_t i = begin; i < end; ++i) {
        if (skipped != nullptr && skipped[i]) continue;
        const scalar_t* row = s + i * 2 * K;
        int64_t pred = 0, nearest = 0;
        scalar_t best_logit = row[0] + bb[0], best_dist = q[0] - 2 * row[K];
        for (int64_t k = 1; k < K; ++k) {  // first index wins ties, as torch's argmax/argmin
          const scalar_t logit = row[k] + bb[k], dist = q[k] - 2 * row[K + k];
          if (logit > best_logit) best_logit = logit, pred = k;
          if (dist < best_dist) best_dist = dist, nearest = k;
        }
        local += pred != nearest;
      }
      const std::lock_guard<std::mutex> guard(lock);
      mismatches += local;
    });
  });
  return at::full({}, mismatches, scores.options().dtype(at::kLong));
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, CPU, m) {
  m.impl("class_moments", &ncfast::class_moments_cpu);
  m.impl("class_moments_", &ncfast::class_moments_inplace_cpu);
  m.impl("nc4_mismatches", &ncfast::nc4_mismatches_cpu);
}

// CUDA kernel of the class-statistics op: one block per row; the shifted row is written once,
// and the per-class sums, squared norms and counts are accumulated with atomics.
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ncfast/stats.h>

namespace ncfast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    class_moments_kernel(const scalar_t* x, const index_t* __restrict__ y,
                         const acc_t* __restrict__ shift, acc_t* shifted,  // may alias x
                         acc_t* __restrict__ sums, acc_t* __restrict__ sq,
                         unsigned long long* __restrict__ counts, int64_t B, int64_t d,
                         int64_t K) {
  __shared__ acc_t partial[kThreads / 32];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const int64_t k = y[i];
    acc_t* oi = shifted + i * d;
    // A skipped row (labels are never used as addresses out of range); the whole block takes
    // this branch: one row per block.
    if (k < 0 || k >= K) {
      for (int64_t j = threadIdx.x; j < d; j += kThreads) oi[j] = 0;
      continue;
    }
    const scalar_t* xi = x + i * d;
    const acc_t* ck = shift + k * d;
    acc_t* sk = sums + k * d;
    acc_t q = 0;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const acc_t v = static_cast<acc_t>(xi[j]) - ck[j];
      oi[j] = v;
      atomicAdd(sk + j, v);
      q += v * v;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      q += __shfl_xor_sync(0xffffffffu, q, offset);
    }
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = q;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
      atomicAdd(sq + k, total);
      atomicAdd(counts + k, 1ull);
    }
    __syncthreads();
  }
}

// Writes the shifted rows into `shifted` (which may be `features` itself: each element is read
// and then written by the same thread) and accumulates counts, sums and sq.
void class_moments_into(const at::Tensor& features, const at::Tensor& labels,
                        const at::Tensor& shift, const at::Tensor& shifted,
                        const at::Tensor& counts, const at::Tensor& sums, const at::Tensor& sq) {
  const int64_t B = features.size(0), d = features.size(1), K = shift.size(0);
  if (B == 0 || d == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(B, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "class_moments_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "class_moments_cuda", [&] {
      class_moments_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, 0, stream>>>(
          features.const_data_ptr<scalar_t>(), labels.const_data_ptr<index_t>(),
          shift.const_data_ptr<acc_t>(), shifted.mutable_data_ptr<acc_t>(),
          sums.mutable_data_ptr<acc_t>(), sq.mutable_data_ptr<acc_t>(),
          reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()), B, d, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_moments_cuda(
    const at::Tensor& features_in, const at::Tensor& labels_in, const at::Tensor& shift_in) {
  check_class_moments_args(features_in, labels_in, shift_in);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = features_in.contiguous();
  const at::Tensor shift = shift_in.contiguous();
  auto [counts, sums, sq, shifted] = new_class_moments(features.size(0), shift);
  class_moments_into(features, labels_in.contiguous(), shift, shifted, counts, sums, sq);
  return {counts, sums, sq, shifted};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_inplace_cuda(
    at::Tensor& features, const at::Tensor& labels, const at::Tensor& shift_in) {
  check_class_moments_args(features, labels, shift_in);
  check_class_moments_inplace_args(features, shift_in);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor shift = shift_in.contiguous();
  auto [counts, sums, sq, unused] = new_class_moments(0, shift);
  class_moments_into(features, labels.contiguous(), shift, features, counts, sums, sq);
  return {counts, sums, sq};
}

// One warp per row: each lane scans a strided slice of the classes, then the warp reduces
// (value, index) pairs, keeping the lowest index on ties as torch's argmax/argmin do.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    nc4_mismatches_kernel(const scalar_t* __restrict__ scores, const scalar_t* __restrict__ bias,
                          const scalar_t* __restrict__ sq_norms, const bool* __restrict__ skip,
                          unsigned long long* __restrict__ count, int64_t B, int64_t K) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; i < B;
       i += warps) {
    if (skip != nullptr && skip[i]) continue;  // the whole warp: one row per warp
    const scalar_t* row = scores + i * 2 * K;
    scalar_t best_logit = -INFINITY, best_dist = INFINITY;
    int64_t pred = K, nearest = K;
    for (int64_t k = lane; k < K; k += 32) {
      const scalar_t logit = row[k] + (bias != nullptr ? bias[k] : scalar_t(0));
      const scalar_t dist = sq_norms[k] - 2 * row[K + k];
      if (logit > best_logit) best_logit = logit, pred = k;
      if (dist < best_dist) best_dist = dist, nearest = k;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const scalar_t other_logit = __shfl_xor_sync(0xffffffffu, best_logit, offset);
      const int64_t other_pred = __shfl_xor_sync(0xffffffffu, pred, offset);
      const scalar_t other_dist = __shfl_xor_sync(0xffffffffu, best_dist, offset);
      const int64_t other_nearest = __shfl_xor_sync(0xffffffffu, nearest, offset);
      if (other_logit > best_logit || (other_logit == best_logit && other_pred < pred)) {
        best_logit = other_logit, pred = other_pred;
      }
      if (other_dist < best_dist || (other_dist == best_dist && other_nearest < nearest)) {
        best_dist = other_dist, nearest = other_nearest;
      }
    }
    if (lane == 0 && pred != nearest) atomicAdd(count, 1ull);
  }
}

at::Tensor nc4_mismatches_cuda(const at::Tensor& scores_in, const std::optional<at::Tensor>& bias,
                               const at::Tensor& sq_norms_in,
                               const std::optional<at::Tensor>& skip_in) {
  check_nc4_args(scores_in, bias, sq_norms_in, skip_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor sq_norms = sq_norms_in.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const at::Tensor skip = skip_in.has_value() ? skip_in->contiguous() : at::Tensor();
  const int64_t B = scores.size(0), K = sq_norms.size(0);
  at::Tensor count = at::zeros({}, scores.options().dtype(at::kLong));
  if (B == 0) {
    return count;
  }
  const unsigned int grid =
      static_cast<unsigned int>(std::min<int64_t>((B + 7) / 8, int64_t{1} << 20));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "nc4_mismatches_cuda", [&] {
    nc4_mismatches_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.const_data_ptr<scalar_t>(),
        b.has_value() ? b->const_data_ptr<scalar_t>() : nullptr,
        sq_norms.const_data_ptr<scalar_t>(), skip.defined() ? skip.const_data_ptr<bool>() : nullptr,
        reinterpret_cast<unsigned long long*>(count.mutable_data_ptr<int64_t>()), B, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return count;
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, CUDA, m) {
  m.impl("class_moments", &ncfast::class_moments_cuda);
  m.impl("class_moments_", &ncfast::class_moments_inplace_cuda);
  m.impl("nc4_mismatches", &ncfast::nc4_mismatches_cuda);
}

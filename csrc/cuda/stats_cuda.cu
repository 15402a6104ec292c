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
    class_moments_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ y,
                         const acc_t* __restrict__ shift, acc_t* __restrict__ shifted,
                         acc_t* __restrict__ sums, acc_t* __restrict__ sq,
                         unsigned long long* __restrict__ counts, int64_t B, int64_t d) {
  __shared__ acc_t partial[kThreads / 32];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const int64_t k = y[i];
    const scalar_t* xi = x + i * d;
    const acc_t* ck = shift + k * d;
    acc_t* oi = shifted + i * d;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_moments_cuda(
    const at::Tensor& features_in, const at::Tensor& labels_in, const at::Tensor& shift_in) {
  check_class_moments_args(features_in, labels_in, shift_in);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = features_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor shift = shift_in.contiguous();
  const int64_t B = features.size(0), d = features.size(1), K = shift.size(0);
  const auto acc_options = shift.options();
  at::Tensor counts = at::zeros({K}, acc_options.dtype(at::kLong));
  at::Tensor sums = at::zeros({K, d}, acc_options);
  at::Tensor sq = at::zeros({K}, acc_options);
  at::Tensor shifted = at::empty({B, d}, acc_options);
  if (B == 0 || d == 0) {
    return {counts, sums, sq, shifted};
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
          reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()), B, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {counts, sums, sq, shifted};
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, CUDA, m) {
  m.impl("class_moments", &ncfast::class_moments_cuda);
}

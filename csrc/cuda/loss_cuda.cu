// CUDA kernels of the rescaled-MSE ops: one warp per row, 16-byte vector loads and stores where
// rows are aligned; each pack summed in float32 (fp32/bf16/fp16) and added into float64, so the
// loss keeps ~1e-7 relative error for any K. The reduced loss is summed deterministically in
// the kernel (a fixed order for a given grid; no float atomics). Labels are checked on the
// device: no host synchronisation anywhere, current stream, launches checked.
#include <cstring>
#include <mutex>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <ncfast/loss.h>

namespace ncfast {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 rows in flight per block
constexpr int kRowsPerBlock = kThreads / kWarp;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    s += __shfl_xor_sync(0xffffffffu, s, offset);
  }
  return s;
}

// ---- device-side label errors (see LabelErrorSlot in loss.h)

struct LabelCheck {
  LabelErrorSlot* slot;  // mapped pinned memory; null when checks are off
  int* claim;            // device memory: the first bad label claims the slot
  int32_t op;
};

__device__ void record_bad_label(const LabelCheck& check, int64_t value, int64_t K,
                                 int64_t ignore_index) {
  if (check.slot == nullptr || atomicCAS(check.claim, 0, 1) != 0) {
    return;
  }
  volatile LabelErrorSlot* s = check.slot;
  s->op = check.op;
  s->value = value;
  s->num_classes = K;
  s->ignore_index = ignore_index;
  __threadfence_system();  // the payload is visible to the host before `ready`
  s->ready = 1;
}

// Returns true when row i counts; records its label when it is out of range.
__device__ __forceinline__ bool row_counts(int64_t yi, int64_t K, int64_t ignore_index,
                                           const LabelCheck& check, int lane) {
  if (yi == ignore_index) return false;
  if (yi < 0 || yi >= K) {
    if (lane == 0) record_bad_label(check, yi, K, ignore_index);
    return false;
  }
  return true;
}

struct LabelErrorState {
  std::mutex mutex;
  LabelErrorSlot* slots = nullptr;         // host address
  LabelErrorSlot* device_slots = nullptr;  // its device address (mapped, portable: every device)
  at::Tensor* claims[kMaxDevices] = {};
};

LabelErrorState& label_state() {
  static auto* state = new LabelErrorState();  // never destroyed: CUDA may be gone at exit
  return *state;
}

void rearm(int device) {
  LabelErrorState& st = label_state();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  C10_CUDA_CHECK(cudaMemsetAsync(st.claims[device]->data_ptr(), 0, sizeof(int),
                                 c10::cuda::getCurrentCUDAStream(device)));
}

// `always`: record even with set_cuda_target_checks(false) (the guard budget, which no
// setting turns off).
LabelCheck label_check(const at::Tensor& target, int32_t op = 0, bool always = false) {
  if (!always && !cuda_target_checks_enabled()) {
    return {nullptr, nullptr, op};
  }
  LabelErrorState& st = label_state();
  const int device = target.get_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "ncfast: CUDA device index out of range");
  std::lock_guard<std::mutex> lock(st.mutex);
  if (st.slots == nullptr) {
    void* host = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(LabelErrorSlot) * kMaxDevices,
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host, 0, sizeof(LabelErrorSlot) * kMaxDevices);
    void* mapped = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, host, 0));
    st.slots = static_cast<LabelErrorSlot*>(host);
    st.device_slots = static_cast<LabelErrorSlot*>(mapped);
    install_label_error_slots(st.slots, &rearm);
  }
  if (st.claims[device] == nullptr) {
    st.claims[device] = new at::Tensor(at::zeros({1}, target.options().dtype(at::kInt)));
    mark_label_error_device(device);
  }
  return {st.device_slots + device, st.claims[device]->mutable_data_ptr<int>(), op};
}

// ---- the loss of one row, by one warp

// sum_j w_j (z_j - M [j = y])^2 for the warp's row (0 <= y < K); every lane returns the total.
// The off-target squares are summed apart from the target's term (no full sum of squares minus
// z_y^2, which cancels near collapse), and that term is formed in float64 from the logit, as on
// the CPU: z_y - M in float32 would carry M's rounding to float32 (up to 2^-24 |M|, e.g. for
// M = 1.1), which near collapse is most of the residual.
template <typename scalar_t, int VEC>
__device__ __forceinline__ double warp_row_loss(const scalar_t* __restrict__ z, int64_t yi,
                                                int64_t K, double k, double M, int lane) {
  using part_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Pack<scalar_t, VEC>* row = reinterpret_cast<const Pack<scalar_t, VEC>*>(z);
  double s = 0;
#pragma unroll 4
  for (int64_t p = lane; p < K / VEC; p += kWarp) {
    const Pack<scalar_t, VEC> pack = row[p];
    part_t t = 0;  // at most 8 terms in float32 before the float64 sum
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const part_t x = static_cast<part_t>(pack.v[e]);
      t += p * VEC + e == yi ? part_t(0) : x * x;
    }
    s += static_cast<double>(t);
  }
  if (lane == (yi / VEC) % kWarp) {  // the lane whose packs held the target
    const double r = static_cast<double>(z[yi]) - M;
    s += k * r * r;
  }
  return warp_sum(s);
}

template <typename scalar_t, typename acc_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    per_row_forward_kernel(const scalar_t* __restrict__ z, const index_t* __restrict__ y,
                           acc_t* __restrict__ loss, int64_t B, int64_t K, double k, double M,
                           int64_t ignore_index, LabelCheck check) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp; i < B;
       i += warps) {
    const int64_t yi = y[i];
    double s = 0;
    if (row_counts(yi, K, ignore_index, check, lane)) {
      s = warp_row_loss<scalar_t, VEC>(z + i * K, yi, K, k, M, lane);
    }
    if (lane == 0) loss[i] = static_cast<acc_t>(s);
  }
}

// Block partials: the block's rows summed in a fixed order; with several blocks, the last one
// to finish (an integer ticket) sums the partials in block order.
template <typename scalar_t, typename acc_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduced_forward_kernel(const scalar_t* __restrict__ z, const index_t* __restrict__ y,
                           int64_t B, int64_t K, double k, double M, int64_t ignore_index,
                           double scale, bool mean, double* __restrict__ partial_sum,
                           long long* __restrict__ partial_rows, unsigned int* ticket,
                           scalar_t* __restrict__ out_loss, acc_t* __restrict__ out_row_scale,
                           LabelCheck check) {
  __shared__ double warp_total[kRowsPerBlock];
  __shared__ long long warp_rows[kRowsPerBlock];
  __shared__ bool is_last;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  double total = 0;
  long long rows = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; i < B; i += warps) {
    const int64_t yi = y[i];
    if (row_counts(yi, K, ignore_index, check, lane)) {
      total += warp_row_loss<scalar_t, VEC>(z + i * K, yi, K, k, M, lane);
      ++rows;
    }
  }
  if (lane == 0) {
    warp_total[warp] = total;
    warp_rows[warp] = rows;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double block_total = 0;
    long long block_rows = 0;
    for (int w = 0; w < kRowsPerBlock; ++w) {
      block_total += warp_total[w];
      block_rows += warp_rows[w];
    }
    warp_total[0] = block_total;
    warp_rows[0] = block_rows;
    is_last = gridDim.x == 1;
    if (gridDim.x > 1) {
      partial_sum[blockIdx.x] = block_total;
      partial_rows[blockIdx.x] = block_rows;
      __threadfence();
      is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
  }
  __syncthreads();
  if (!is_last || warp != 0) {
    return;
  }
  double sum = 0;
  long long count = 0;
  if (gridDim.x == 1) {
    sum = warp_total[0];
    count = warp_rows[0];
  } else {
    for (unsigned int b = lane; b < gridDim.x; b += kWarp) {  // fixed order per lane
      sum += __ldcg(partial_sum + b);
      count += __ldcg(partial_rows + b);
    }
    sum = warp_sum(sum);
    count = warp_sum(count);
  }
  if (lane == 0) {
    const double row_scale = mean ? scale / static_cast<double>(count) : scale;
    out_loss[0] = static_cast<scalar_t>(sum * row_scale);
    out_row_scale[0] = static_cast<acc_t>(row_scale);
  }
}

// grad_logits = c_i w (z - M e_y) on counted rows, 0 elsewhere; c_i = 2 grad_rows[i] (per-row
// op) or 2 grad0 row_scale (reduced op), both read on the device.
template <typename scalar_t, typename acc_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const acc_t* __restrict__ grad_rows, const scalar_t* __restrict__ grad0,
                    const acc_t* __restrict__ row_scale, const scalar_t* __restrict__ z,
                    const index_t* __restrict__ y, scalar_t* __restrict__ dz, int64_t B,
                    int64_t K, acc_t k, acc_t M, int64_t ignore_index) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  const acc_t c0 = grad_rows == nullptr ? 2 * static_cast<acc_t>(grad0[0]) * row_scale[0] : 0;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp; i < B;
       i += warps) {
    const int64_t yi = y[i];
    const bool counts = yi != ignore_index && yi >= 0 && yi < K;
    const acc_t c = !counts ? acc_t(0) : grad_rows == nullptr ? c0 : 2 * grad_rows[i];
    const Pack<scalar_t, VEC>* row = reinterpret_cast<const Pack<scalar_t, VEC>*>(z + i * K);
    Pack<scalar_t, VEC>* drow = reinterpret_cast<Pack<scalar_t, VEC>*>(dz + i * K);
#pragma unroll 4
    for (int64_t p = lane; p < K / VEC; p += kWarp) {
      Pack<scalar_t, VEC> out;
      if (!counts) {  // zero even where the row's logits are not finite
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.v[e] = scalar_t(0);
      } else {
        const Pack<scalar_t, VEC> pack = row[p];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const bool on_target = p * VEC + e == yi;
          const acc_t r = static_cast<acc_t>(pack.v[e]) - (on_target ? M : acc_t(0));
          out.v[e] = static_cast<scalar_t>(c * (on_target ? k : acc_t(1)) * r);
        }
      }
      drow[p] = out;
    }
  }
}

template <typename index_t>
__global__ void check_labels_kernel(const index_t* __restrict__ y, int64_t B, int64_t K,
                                    int64_t ignore_index, LabelCheck check) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = y[i];
    if (v != ignore_index && (v < 0 || v >= K)) record_bad_label(check, v, K, ignore_index);
  }
}

// One thread: the guard flagged *count rows; more than budget is recorded (value = count,
// num_classes = budget).
__global__ void check_guard_budget_kernel(const int64_t* __restrict__ count, int64_t budget,
                                          LabelCheck check) {
  const int64_t flagged = *count;
  if (flagged > budget) record_bad_label(check, flagged, budget, 0);
}

// ---- launchers

// 16-byte packs when every row starts on a 16-byte boundary, else one element at a time.
template <typename scalar_t>
bool rows_are_16b_aligned(const at::Tensor& t) {
  constexpr int vec = 16 / sizeof(scalar_t);
  return t.size(1) % vec == 0 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <typename scalar_t, typename F>
void with_vec(const at::Tensor& logits, F launch) {
  if (rows_are_16b_aligned<scalar_t>(logits)) {
    launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

unsigned int grid_for_rows(int64_t B) {
  return static_cast<unsigned int>(
      std::min<int64_t>((B + kRowsPerBlock - 1) / kRowsPerBlock, int64_t{1} << 20));
}

// The reduced kernel's grid: one block for small inputs (no partials, no ticket), else one
// resident wave at most (8 blocks of 256 threads per SM), so each block's rows are many.
unsigned int grid_for_reduction(int64_t B, int64_t K, int device) {
  if (B * K <= (int64_t{1} << 16)) return 1;
  static int sm_count[kMaxDevices] = {};
  if (sm_count[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count[device], cudaDevAttrMultiProcessorCount,
                                          device));
  }
  return static_cast<unsigned int>(
      std::min<int64_t>((B + kRowsPerBlock - 1) / kRowsPerBlock, int64_t{8} * sm_count[device]));
}

at::Tensor rescaled_mse_cuda(const at::Tensor& logits_in, const at::Tensor& target_in, double k,
                             double M, int64_t ignore_index) {
  raise_pending_label_errors();
  check_rescaled_mse_args(logits_in, target_in, k, M);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t B = logits_in.size(0), K = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  at::Tensor out = at::empty({B}, logits.options().dtype(loss_dtype(logits.scalar_type())));
  if (B == 0) {
    return out;
  }
  const LabelCheck check = label_check(target);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rescaled_mse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "rescaled_mse_cuda", [&] {
      with_vec<scalar_t>(logits, [&](auto vec) {
        per_row_forward_kernel<scalar_t, acc_t, index_t, decltype(vec)::value>
            <<<grid_for_rows(B), kThreads, 0, stream>>>(
                logits.const_data_ptr<scalar_t>(), target.const_data_ptr<index_t>(),
                out.mutable_data_ptr<acc_t>(), B, K, k, M, ignore_index, check);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rescaled_mse_reduced_cuda(
    const at::Tensor& logits_in, const at::Tensor& target_in, double k, double M,
    int64_t ignore_index, double scale, bool mean) {
  raise_pending_label_errors();
  check_reduced_args(logits_in, target_in, k, M, scale);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t B = logits_in.size(0), K = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  at::Tensor loss = at::empty({}, logits.options());
  at::Tensor row_scale = at::empty({}, logits.options().dtype(loss_dtype(logits.scalar_type())));
  const LabelCheck check = B > 0 ? label_check(target) : LabelCheck{nullptr, nullptr, 0};
  const unsigned int grid = B > 0 ? grid_for_reduction(B, K, logits.get_device()) : 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Partials (float64 sums, int64 row counts) and the ticket, for grids of several blocks.
  at::Tensor workspace;
  double* partial_sum = nullptr;
  long long* partial_rows = nullptr;
  unsigned int* ticket = nullptr;
  if (grid > 1) {
    workspace = at::empty({2 * static_cast<int64_t>(grid) + 1}, logits.options().dtype(at::kLong));
    partial_sum = reinterpret_cast<double*>(workspace.mutable_data_ptr<int64_t>());
    partial_rows = reinterpret_cast<long long*>(partial_sum + grid);
    ticket = reinterpret_cast<unsigned int*>(partial_rows + grid);
    C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rescaled_mse_reduced_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "rescaled_mse_reduced_cuda", [&] {
      with_vec<scalar_t>(logits, [&](auto vec) {
        reduced_forward_kernel<scalar_t, acc_t, index_t, decltype(vec)::value>
            <<<grid, kThreads, 0, stream>>>(
                logits.const_data_ptr<scalar_t>(), target.const_data_ptr<index_t>(), B, K, k, M,
                ignore_index, scale, mean, partial_sum, partial_rows, ticket,
                loss.mutable_data_ptr<scalar_t>(), row_scale.mutable_data_ptr<acc_t>(), check);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {loss, row_scale};
}

at::Tensor launch_backward(const at::Tensor* grad_rows, const at::Tensor* grad0,
                           const at::Tensor* row_scale, const at::Tensor& logits_in,
                           const at::Tensor& target_in, double k, double M,
                           int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t B = logits_in.size(0), K = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor rows = grad_rows ? grad_rows->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, K}, logits.options());
  if (B == 0) {
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rescaled_mse_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "rescaled_mse_backward_cuda", [&] {
      // The output is freshly allocated, so the logits' alignment decides for both.
      with_vec<scalar_t>(logits, [&](auto vec) {
        backward_kernel<scalar_t, acc_t, index_t, decltype(vec)::value>
            <<<grid_for_rows(B), kThreads, 0, stream>>>(
                grad_rows ? rows.const_data_ptr<acc_t>() : nullptr,
                grad0 ? grad0->const_data_ptr<scalar_t>() : nullptr,
                row_scale ? row_scale->const_data_ptr<acc_t>() : nullptr,
                logits.const_data_ptr<scalar_t>(), target.const_data_ptr<index_t>(),
                out.mutable_data_ptr<scalar_t>(), B, K, static_cast<acc_t>(k),
                static_cast<acc_t>(M), ignore_index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor rescaled_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& target, double k, double M,
                                      int64_t ignore_index) {
  raise_pending_label_errors();
  check_rescaled_mse_args(logits, target, k, M, &grad);
  return launch_backward(&grad, nullptr, nullptr, logits, target, k, M, ignore_index);
}

at::Tensor rescaled_mse_reduced_backward_cuda(const at::Tensor& grad,
                                              const at::Tensor& row_scale,
                                              const at::Tensor& logits, const at::Tensor& target,
                                              double k, double M, int64_t ignore_index) {
  raise_pending_label_errors();
  check_reduced_backward_args(grad, row_scale, logits, target, k, M);
  return launch_backward(nullptr, &grad, &row_scale, logits, target, k, M, ignore_index);
}

void check_labels_cuda(const at::Tensor& target_in, int64_t num_classes, int64_t ignore_index,
                       c10::string_view op) {
  raise_pending_label_errors();
  const int32_t code = label_error_op_code(std::string_view(op.data(), op.size()));
  const c10::cuda::CUDAGuard guard(target_in.device());
  const at::Tensor target = target_in.contiguous();
  const int64_t B = target.numel();
  const LabelCheck check = label_check(target, code);
  if (B == 0 || check.slot == nullptr) {
    return;
  }
  const unsigned int grid =
      static_cast<unsigned int>(std::min<int64_t>((B + kThreads - 1) / kThreads, 1024));
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "check_labels_cuda", [&] {
    check_labels_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        target.const_data_ptr<index_t>(), B, num_classes, ignore_index, check);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_guard_budget_cuda(const at::Tensor& count, int64_t budget) {
  raise_pending_label_errors();
  check_guard_budget_args(count, budget);
  const c10::cuda::CUDAGuard guard(count.device());
  const LabelCheck check = label_check(count, kGuardBudgetError, /*always=*/true);
  check_guard_budget_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      count.const_data_ptr<int64_t>(), budget, check);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, CUDA, m) {
  m.impl("rescaled_mse", &ncfast::rescaled_mse_cuda);
  m.impl("rescaled_mse_backward", &ncfast::rescaled_mse_backward_cuda);
  m.impl("rescaled_mse_reduced", &ncfast::rescaled_mse_reduced_cuda);
  m.impl("rescaled_mse_reduced_backward", &ncfast::rescaled_mse_reduced_backward_cuda);
  m.impl("check_labels", &ncfast::check_labels_cuda);
  m.impl("check_guard_budget", &ncfast::check_guard_budget_cuda);
}

// CUDA kernel of torch.ops.guide_mega.group_advantages: the CPU kernel's passes (see group_advantages.cpp), one
// thread per sample, with the per-group sums gathered by float64 atomics.
//
// Shape legend: N samples, G groups.
//
// A group's shift is its lowest-index reward (found with atomicMin), so it does not depend on scheduling and a
// constant group's deviations stay exactly 0. The atomic sums do depend on it, in their last bits only.

#include "group_advantages.h"

// The per-group sums use atomicAdd on doubles, which the hardware has from compute capability 6.0 (Pascal) on.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
#error "guide_mega._C needs compute capability 6.0 or newer (atomicAdd on double); set TORCH_CUDA_ARCH_LIST accordingly"
#endif

#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace guide_mega {
namespace {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loops cover any N beyond this many blocks.
constexpr int64_t kMaxBlocks = 65535;

// Per-group scratch on the device.
struct GroupScratch {
  unsigned long long* first_G;  // lowest sample index in the group; its reward is the group's shift
  double* count_G;
  double* sum_shifted_G;  // sum of (r - shift)
  double* sum_sq_G;       // sum of (r - mean)^2
};

__device__ inline int64_t first_sample() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ inline int64_t sample_stride() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

template <typename scalar_t, typename index_t>
__device__ inline double shifted_reward(const scalar_t* rewards_N, index_t group_id, int64_t i, GroupScratch scratch) {
  return static_cast<double>(rewards_N[i]) - static_cast<double>(rewards_N[scratch.first_G[group_id]]);
}

template <typename index_t>
__global__ void count_and_find_first(const index_t* group_ids_N, int64_t n, GroupScratch scratch) {
  for (int64_t i = first_sample(); i < n; i += sample_stride()) {
    const index_t group_id = group_ids_N[i];
    atomicMin(&scratch.first_G[group_id], static_cast<unsigned long long>(i));
    atomicAdd(&scratch.count_G[group_id], 1.0);
  }
}

template <typename scalar_t, typename index_t>
__global__ void sum_shifted_rewards(
    const scalar_t* rewards_N,
    const index_t* group_ids_N,
    int64_t n,
    GroupScratch scratch) {
  for (int64_t i = first_sample(); i < n; i += sample_stride()) {
    const index_t group_id = group_ids_N[i];
    atomicAdd(&scratch.sum_shifted_G[group_id], shifted_reward(rewards_N, group_id, i, scratch));
  }
}

template <typename scalar_t, typename index_t>
__device__ inline double centred_reward(const scalar_t* rewards_N, index_t group_id, int64_t i, GroupScratch scratch) {
  const double mean_shifted = scratch.sum_shifted_G[group_id] / scratch.count_G[group_id];
  return shifted_reward(rewards_N, group_id, i, scratch) - mean_shifted;
}

template <typename scalar_t, typename index_t>
__global__ void sum_squared_deviations(
    const scalar_t* rewards_N,
    const index_t* group_ids_N,
    int64_t n,
    GroupScratch scratch) {
  for (int64_t i = first_sample(); i < n; i += sample_stride()) {
    const index_t group_id = group_ids_N[i];
    const double centred = centred_reward(rewards_N, group_id, i, scratch);
    atomicAdd(&scratch.sum_sq_G[group_id], centred * centred);
  }
}

template <typename scalar_t, typename index_t>
__global__ void write_advantages(
    const scalar_t* rewards_N,
    const index_t* group_ids_N,
    int64_t n,
    GroupScratch scratch,
    AdvantageOptions options,
    scalar_t* advantages_N) {
  for (int64_t i = first_sample(); i < n; i += sample_stride()) {
    const index_t group_id = group_ids_N[i];
    const double scale = advantage_scale(scratch.count_G[group_id], scratch.sum_sq_G[group_id], options);
    advantages_N[i] = static_cast<scalar_t>(centred_reward(rewards_N, group_id, i, scratch) * scale);
  }
}

// The value checks, with one device-to-host copy for all of them. Returns G.
int64_t check_values_cuda(const at::Tensor& rewards_N, const at::Tensor& group_ids_N, int64_t num_groups) {
  const auto [min_id, max_id] = at::aminmax(group_ids_N);
  const at::Tensor num_nonfinite = at::isfinite(rewards_N).logical_not().sum();
  const at::Tensor summary = at::stack({min_id.to(at::kLong), max_id.to(at::kLong), num_nonfinite}).cpu();
  const int64_t* values = summary.const_data_ptr<int64_t>();
  const int64_t num_groups_resolved = resolve_num_groups(num_groups, values[0], values[1]);
  TORCH_CHECK_VALUE(
      values[2] == 0, "group_advantages: rewards must be finite; got ", values[2], " non-finite values");
  return num_groups_resolved;
}

template <typename scalar_t, typename index_t>
void launch_group_advantages(
    const at::Tensor& rewards_N,
    const at::Tensor& group_ids_N,
    GroupScratch scratch,
    const AdvantageOptions& options,
    at::Tensor& advantages_N) {
  const int64_t n = rewards_N.numel();
  const int blocks = static_cast<int>(std::min((n + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* rewards = rewards_N.const_data_ptr<scalar_t>();
  const index_t* group_ids = group_ids_N.const_data_ptr<index_t>();

  count_and_find_first<<<blocks, kThreadsPerBlock, 0, stream>>>(group_ids, n, scratch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_shifted_rewards<<<blocks, kThreadsPerBlock, 0, stream>>>(rewards, group_ids, n, scratch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_squared_deviations<<<blocks, kThreadsPerBlock, 0, stream>>>(rewards, group_ids, n, scratch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_advantages<<<blocks, kThreadsPerBlock, 0, stream>>>(
      rewards, group_ids, n, scratch, options, advantages_N.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor group_advantages_cuda(
    const at::Tensor& rewards_N,
    const at::Tensor& group_ids_N,
    int64_t num_groups,
    int64_t mode,
    bool unbiased_std,
    double eps,
    bool eps_inside_sqrt) {
  const AdvantageOptions options =
      check_group_advantage_args(rewards_N, group_ids_N, num_groups, mode, unbiased_std, eps, eps_inside_sqrt);
  const c10::cuda::CUDAGuard device_guard(rewards_N.device());
  const at::Tensor rewards = rewards_N.contiguous();
  const at::Tensor group_ids = group_ids_N.contiguous();
  const int64_t n = rewards.numel();
  at::Tensor advantages_N = at::empty({n}, rewards.options());
  if (n == 0) {
    resolve_num_groups(num_groups, 0, -1);
    return advantages_N;
  }
  const int64_t num_groups_resolved = check_values_cuda(rewards, group_ids, num_groups);

  // Any index >= n marks "no member seen yet" for atomicMin.
  at::Tensor first_G = at::full({num_groups_resolved}, n, group_ids.options().dtype(at::kLong));
  at::Tensor sums_3G = at::zeros({3, num_groups_resolved}, rewards.options().dtype(at::kDouble));
  double* sums = sums_3G.mutable_data_ptr<double>();
  const GroupScratch scratch{
      reinterpret_cast<unsigned long long*>(first_G.mutable_data_ptr<int64_t>()),
      sums,
      sums + num_groups_resolved,
      sums + 2 * num_groups_resolved};
  AT_DISPATCH_INDEX_TYPES(group_ids.scalar_type(), "group_advantages_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_cuda", [&] {
      launch_group_advantages<scalar_t, index_t>(rewards, group_ids, scratch, options, advantages_N);
    });
  });
  return advantages_N;
}

}  // namespace
}  // namespace guide_mega

TORCH_LIBRARY_IMPL(guide_mega, CUDA, m) {
  m.impl("group_advantages", &guide_mega::group_advantages_cuda);
}

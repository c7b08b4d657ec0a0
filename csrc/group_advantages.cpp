// torch.ops.guide_mega.group_advantages: the schema, the argument checks, the CPU kernel and the Meta kernel.
//
// Shape legend: N samples, G groups.
//
// After checking the ids' range and the rewards' finiteness, the CPU kernel reads the samples in three passes and
// keeps O(G) scratch, one record per group:
//   1. count each group and sum its rewards, shifted by the group's first reward;
//   2. sum the squared deviations from the group mean (two-pass variance: no cancellation when rewards sit far
//      from 0, unlike sum(r^2) - sum(r)^2 / n);
//   3. write each advantage.
// Shifting by a member of the group keeps a constant group's deviations exactly 0, however large its rewards.

#include "group_advantages.h"

#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace guide_mega {

AdvantageOptions check_group_advantage_args(
    const at::Tensor& rewards_N,
    const at::Tensor& group_ids_N,
    int64_t num_groups,
    int64_t mode,
    bool unbiased_std,
    double eps,
    bool eps_inside_sqrt) {
  TORCH_CHECK_VALUE(
      rewards_N.dim() == 1 && group_ids_N.dim() == 1,
      "group_advantages: rewards and group_ids must be 1-D, got shapes ",
      rewards_N.sym_sizes(),
      " and ",
      group_ids_N.sym_sizes());
  TORCH_CHECK_VALUE(
      rewards_N.sym_numel() == group_ids_N.sym_numel(),
      "group_advantages: rewards has ",
      rewards_N.sym_numel(),
      " entries but group_ids has ",
      group_ids_N.sym_numel());
  const at::ScalarType ids_dtype = group_ids_N.scalar_type();
  TORCH_CHECK_TYPE(
      ids_dtype == at::kInt || ids_dtype == at::kLong,
      "group_advantages: group_ids must be int32 or int64, got ",
      ids_dtype);
  const at::ScalarType rewards_dtype = rewards_N.scalar_type();
  TORCH_CHECK_TYPE(
      rewards_dtype == at::kFloat || rewards_dtype == at::kDouble || rewards_dtype == at::kBFloat16 ||
          rewards_dtype == at::kHalf,
      "group_advantages: rewards must be float32, float64, bfloat16 or float16, got ",
      rewards_dtype);
  TORCH_CHECK_VALUE(
      rewards_N.device() == group_ids_N.device(),
      "group_advantages: rewards and group_ids must be on one device, got ",
      rewards_N.device(),
      " and ",
      group_ids_N.device());
  TORCH_CHECK_VALUE(
      mode >= 0 && mode <= 2, "group_advantages: mode must be 0 (grpo), 1 (dr_grpo) or 2 (rloo), got ", mode);
  TORCH_CHECK_VALUE(num_groups >= -1, "group_advantages: num_groups must be >= 0, or -1 to infer it, got ", num_groups);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "group_advantages: eps must be finite and >= 0, got ", eps);
  return {static_cast<AdvantageMode>(mode), unbiased_std, eps, eps_inside_sqrt};
}

int64_t resolve_num_groups(int64_t num_groups, int64_t min_id, int64_t max_id) {
  TORCH_CHECK_VALUE(min_id >= 0, "group_advantages: group_ids must be >= 0, got min ", min_id);
  if (num_groups == -1) {
    return max_id + 1;
  }
  TORCH_CHECK_VALUE(
      max_id < num_groups, "group_advantages: group_ids has index ", max_id, " but num_groups=", num_groups);
  return num_groups;
}

namespace {

// Everything a sample needs from its group, in one record so that each pass touches one place per sample.
struct GroupStats {
  double shift = 0;         // the group's first reward
  double mean_shifted = 0;  // sum, then mean, of (r - shift)
  double sum_sq = 0;        // sum of (r - mean)^2
  double scale = 0;         // advantage_scale() of the group
  int64_t count = 0;
};

template <typename index_t>
std::pair<int64_t, int64_t> id_range(const index_t* group_ids_N, int64_t n) {
  index_t min_id = 0;
  index_t max_id = -1;
  if (n > 0) {
    min_id = max_id = group_ids_N[0];
  }
  for (int64_t i = 0; i < n; ++i) {
    min_id = std::min(min_id, group_ids_N[i]);
    max_id = std::max(max_id, group_ids_N[i]);
  }
  return {min_id, max_id};
}

template <typename scalar_t>
void check_finite(const scalar_t* rewards_N, int64_t n) {
  bool all_finite = true;
  for (int64_t i = 0; i < n; ++i) {
    all_finite &= std::isfinite(static_cast<double>(rewards_N[i]));
  }
  if (all_finite) {
    return;
  }
  // Error path only: find the first offender for the message.
  int64_t bad = 0;
  while (std::isfinite(static_cast<double>(rewards_N[bad]))) {
    ++bad;
  }
  TORCH_CHECK_VALUE(
      false, "group_advantages: rewards must be finite; got ", static_cast<double>(rewards_N[bad]), " at index ", bad);
}

template <typename scalar_t, typename index_t>
void accumulate_group_stats(
    const scalar_t* rewards_N,
    const index_t* group_ids_N,
    int64_t n,
    const AdvantageOptions& options,
    std::vector<GroupStats>& stats_G) {
  for (int64_t i = 0; i < n; ++i) {
    GroupStats& group = stats_G[group_ids_N[i]];
    const double reward = static_cast<double>(rewards_N[i]);
    // The group's first sample becomes its shift.
    group.shift = group.count == 0 ? reward : group.shift;
    group.mean_shifted += reward - group.shift;
    ++group.count;
  }
  for (GroupStats& group : stats_G) {
    group.mean_shifted /= static_cast<double>(std::max<int64_t>(group.count, 1));
  }
  for (int64_t i = 0; i < n; ++i) {
    GroupStats& group = stats_G[group_ids_N[i]];
    const double centred = (static_cast<double>(rewards_N[i]) - group.shift) - group.mean_shifted;
    group.sum_sq += centred * centred;
  }
  for (GroupStats& group : stats_G) {
    group.scale = advantage_scale(static_cast<double>(group.count), group.sum_sq, options);
  }
}

template <typename scalar_t, typename index_t>
void group_advantages_cpu_kernel(
    const at::Tensor& rewards_N,
    const at::Tensor& group_ids_N,
    int64_t num_groups,
    const AdvantageOptions& options,
    at::Tensor& advantages_N) {
  const int64_t n = rewards_N.numel();
  const scalar_t* rewards = rewards_N.const_data_ptr<scalar_t>();
  const index_t* group_ids = group_ids_N.const_data_ptr<index_t>();
  const auto [min_id, max_id] = id_range(group_ids, n);
  const int64_t num_groups_resolved = resolve_num_groups(num_groups, min_id, max_id);
  check_finite(rewards, n);

  std::vector<GroupStats> stats_G(num_groups_resolved);
  accumulate_group_stats(rewards, group_ids, n, options, stats_G);
  scalar_t* advantages = advantages_N.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) {
    const GroupStats& group = stats_G[group_ids[i]];
    const double centred = (static_cast<double>(rewards[i]) - group.shift) - group.mean_shifted;
    advantages[i] = static_cast<scalar_t>(centred * group.scale);
  }
}

at::Tensor group_advantages_cpu(
    const at::Tensor& rewards_N,
    const at::Tensor& group_ids_N,
    int64_t num_groups,
    int64_t mode,
    bool unbiased_std,
    double eps,
    bool eps_inside_sqrt) {
  const AdvantageOptions options =
      check_group_advantage_args(rewards_N, group_ids_N, num_groups, mode, unbiased_std, eps, eps_inside_sqrt);
  const at::Tensor rewards = rewards_N.contiguous();
  const at::Tensor group_ids = group_ids_N.contiguous();
  at::Tensor advantages_N = at::empty({rewards.numel()}, rewards.options());
  AT_DISPATCH_INDEX_TYPES(group_ids.scalar_type(), "group_advantages_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "group_advantages_cpu", [&] {
      group_advantages_cpu_kernel<scalar_t, index_t>(rewards, group_ids, num_groups, options, advantages_N);
    });
  });
  return advantages_N;
}

// Shapes and dtypes only, for FakeTensor tracing (torch.compile, opcheck); value checks wait for the real kernel.
at::Tensor group_advantages_meta(
    const at::Tensor& rewards_N,
    const at::Tensor& group_ids_N,
    int64_t num_groups,
    int64_t mode,
    bool unbiased_std,
    double eps,
    bool eps_inside_sqrt) {
  check_group_advantage_args(rewards_N, group_ids_N, num_groups, mode, unbiased_std, eps, eps_inside_sqrt);
  return at::empty_symint(rewards_N.sym_sizes(), rewards_N.options());
}

}  // namespace

}  // namespace guide_mega

TORCH_LIBRARY(guide_mega, m) {
  m.def(
      "group_advantages(Tensor rewards, Tensor group_ids, int num_groups, int mode, bool unbiased_std, float eps, "
      "bool eps_inside_sqrt) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(guide_mega, CPU, m) {
  m.impl("group_advantages", &guide_mega::group_advantages_cpu);
}

TORCH_LIBRARY_IMPL(guide_mega, Meta, m) {
  m.impl("group_advantages", &guide_mega::group_advantages_meta);
}

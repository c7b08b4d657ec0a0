// Shared by the CPU, CUDA and Meta implementations of torch.ops.guide_mega.group_advantages.
//
// Shape legend: N samples, G groups.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace guide_mega {

// Matches `_MODE_CODES` in guide_mega/algorithms/advantages.py.
enum class AdvantageMode : int64_t { kGrpo = 0, kDrGrpo = 1, kRloo = 2 };

struct AdvantageOptions {
  AdvantageMode mode;
  bool unbiased_std;
  double eps;
  bool eps_inside_sqrt;
};

// Factor that turns a centred reward (r - mean_g) into its advantage, for a group of `count` samples whose
// squared deviations from the mean sum to `sum_sq`.
C10_HOST_DEVICE inline double advantage_scale(double count, double sum_sq, const AdvantageOptions& options) {
  // A singleton or constant group has no spread to compare against: its advantage is 0 in every mode. Testing
  // this first also keeps eps = 0 from turning 0 / 0 into NaN.
  if (count < 2 || sum_sq == 0) {
    return 0;
  }
  switch (options.mode) {
    case AdvantageMode::kDrGrpo:
      return 1;
    case AdvantageMode::kRloo:
      // r - mean of the others = n / (n - 1) * (r - mean of all).
      return count / (count - 1);
    case AdvantageMode::kGrpo:
    default: {
      const double var = sum_sq / (options.unbiased_std ? count - 1 : count);
      return 1 / (options.eps_inside_sqrt ? ::sqrt(var + options.eps) : ::sqrt(var) + options.eps);
    }
  }
}

// Checks everything that does not need the tensors' values (dims, lengths, dtypes, devices, options) and
// returns the options. Used by every implementation, so Meta (torch.compile) rejects what CPU and CUDA reject.
AdvantageOptions check_group_advantage_args(
    const at::Tensor& rewards_N,
    const at::Tensor& group_ids_N,
    int64_t num_groups,
    int64_t mode,
    bool unbiased_std,
    double eps,
    bool eps_inside_sqrt);

// Checks the group ids' range, given their min and max (0 and -1 when N = 0), and returns G: num_groups, or
// max id + 1 when num_groups is -1.
int64_t resolve_num_groups(int64_t num_groups, int64_t min_id, int64_t max_id);

}  // namespace guide_mega

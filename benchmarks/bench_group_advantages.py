"""Benchmark group advantages (GRPO: mean/std over variable-size groups, float64 accumulation).

Compares, side by side in one run:
  ours         torch.ops.guide_mega.group_advantages via `group_advantages(..., impl="cpp")` (validates inputs too)
  index_add    vectorised torch: index_add_ for count, sum and centred sum of squares (no input validation)
  bincount     vectorised torch: bincount with weights for the same three sums (no input validation)
  loop (torch) per-group Python loop in the style of verl's original estimator: a dict of lists of reward scalars,
               torch.mean / torch.std per group, then a per-sample loop (always on CPU tensors)
  loop (float) the same loop on Python floats, the fastest a plain Python loop gets; "vs loop" compares with it

Shape legend: N samples, G groups.

Usage: python benchmarks/bench_group_advantages.py [--device cpu|cuda] [--threads 1]
Prints a table, writes it to benchmarks/results/group_advantages_<device>_<yyyymmdd>.md, and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from report import machine_lines, markdown_table, write_report

from guide_mega.algorithms.advantages import group_advantages, group_advantages_impl, group_ids_from_sizes

SAMPLE_COUNTS = (8192, 65536, 1048576)
GROUP_SIZES = (8, 16)
LAYOUTS = ("contiguous", "shuffled")
EPS = 1e-6
# Above this many samples the Python loop runs on a subset of whole groups and its time is scaled by N / subset.
LOOP_MAX_SAMPLES = 65536
# Keep timing a provider until this much time is spent (or MAX_REPS), and report the median.
MIN_TIME_S = 0.3
MAX_REPS = 50


def _grpo_scale(centred_N, count_G, sum_sq_G, group_ids_N, dtype):
    """GRPO advantages [N] from centred rewards and group sums, with singleton and constant groups set to 0."""
    std_G = torch.sqrt(sum_sq_G / (count_G - 1).clamp(min=1))
    scale_G = torch.where((count_G > 1) & (sum_sq_G > 0), 1 / (std_G + EPS), 0.0)
    return (centred_N * scale_G[group_ids_N]).to(dtype)


def torch_index_add_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Vectorised torch GRPO advantages [N] with index_add_ (two-pass variance, float64)."""
    rewards64_N = rewards_N.to(torch.float64)
    zeros_G = torch.zeros(num_groups, dtype=torch.float64, device=rewards_N.device)
    count_G = zeros_G.clone().index_add_(0, group_ids_N, torch.ones_like(rewards64_N))
    mean_G = zeros_G.clone().index_add_(0, group_ids_N, rewards64_N) / count_G.clamp(min=1)
    centred_N = rewards64_N - mean_G[group_ids_N]
    sum_sq_G = zeros_G.index_add_(0, group_ids_N, centred_N * centred_N)
    return _grpo_scale(centred_N, count_G, sum_sq_G, group_ids_N, rewards_N.dtype)


def torch_bincount_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Vectorised torch GRPO advantages [N] with weighted bincount (two-pass variance, float64)."""
    rewards64_N = rewards_N.to(torch.float64)
    count_G = torch.bincount(group_ids_N, minlength=num_groups).to(torch.float64)
    mean_G = torch.bincount(group_ids_N, weights=rewards64_N, minlength=num_groups) / count_G.clamp(min=1)
    centred_N = rewards64_N - mean_G[group_ids_N]
    sum_sq_G = torch.bincount(group_ids_N, weights=centred_N * centred_N, minlength=num_groups)
    return _grpo_scale(centred_N, count_G, sum_sq_G, group_ids_N, rewards_N.dtype)


def python_loop_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """GRPO advantages [N] the way most RL frameworks compute them: Python dicts keyed by group, scalar ops."""
    scores_N = rewards_N.to(torch.float64).clone()
    group_ids = group_ids_N.tolist()
    scores_by_group = defaultdict(list)
    for i, group_id in enumerate(group_ids):
        scores_by_group[group_id].append(scores_N[i])
    mean_by_group, std_by_group = {}, {}
    for group_id, scores in scores_by_group.items():
        group_scores = torch.stack(scores)
        mean_by_group[group_id] = torch.mean(group_scores)
        std_by_group[group_id] = torch.std(group_scores) if len(scores) > 1 else torch.tensor(0.0)
    for i, group_id in enumerate(group_ids):
        std = std_by_group[group_id]
        scores_N[i] = (scores_N[i] - mean_by_group[group_id]) / (std + EPS) if std > 0 else 0.0
    return scores_N.to(rewards_N.dtype)


def python_float_loop_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """GRPO advantages [N] from the same per-group loop on Python floats instead of torch scalars."""
    rewards, group_ids = rewards_N.tolist(), group_ids_N.tolist()
    rewards_by_group = defaultdict(list)
    for reward, group_id in zip(rewards, group_ids, strict=True):
        rewards_by_group[group_id].append(reward)
    mean_and_scale_by_group = {}
    for group_id, group_rewards in rewards_by_group.items():
        size = len(group_rewards)
        mean = sum(group_rewards) / size
        std = math.sqrt(sum((reward - mean) ** 2 for reward in group_rewards) / (size - 1)) if size > 1 else 0.0
        mean_and_scale_by_group[group_id] = (mean, 1 / (std + EPS) if std > 0 else 0.0)
    advantages = []
    for reward, group_id in zip(rewards, group_ids, strict=True):
        mean, scale = mean_and_scale_by_group[group_id]
        advantages.append((reward - mean) * scale)
    return torch.tensor(advantages, dtype=rewards_N.dtype)


PYTHON_LOOPS = {"loop_torch": python_loop_advantages, "loop_float": python_float_loop_advantages}


def time_ms(fn: Callable[[], object], *, device: str, max_reps: int = MAX_REPS, warm_up: bool = True) -> float:
    """Median wall time of fn() in milliseconds over at least one call (and until MIN_TIME_S or max_reps)."""

    def timed_call() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if warm_up:
        timed_call()
    times = [timed_call()]
    while len(times) < max_reps and sum(times) < MIN_TIME_S:
        times.append(timed_call())
    return 1e3 * statistics.median(times)


def make_case(num_samples: int, group_size: int, layout: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary float32 rewards [N] (verifiable rewards) and int64 group ids [N] for groups of group_size."""
    generator = torch.Generator().manual_seed(num_samples + group_size)
    rewards_N = torch.randint(0, 2, (num_samples,), generator=generator).to(torch.float32)
    group_ids_N = group_ids_from_sizes(torch.full((num_samples // group_size,), group_size))
    if layout == "shuffled":
        group_ids_N = group_ids_N[torch.randperm(num_samples, generator=generator)]
    return rewards_N.to(device), group_ids_N.to(device)


def time_python_loops(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, group_size: int) -> tuple[dict, bool]:
    """Each Python loop's time in ms for all N samples (measured on at most LOOP_MAX_SAMPLES, whole groups, then
    scaled) and whether it was scaled; also checks each loop's advantages against ours on the timed samples."""
    rewards_N, group_ids_N = rewards_N.cpu(), group_ids_N.cpu()
    num_samples = rewards_N.numel()
    is_scaled = num_samples > LOOP_MAX_SAMPLES
    if is_scaled:
        is_kept_N = group_ids_N < LOOP_MAX_SAMPLES // group_size
        rewards_N, group_ids_N = rewards_N[is_kept_N], group_ids_N[is_kept_N]
    expected_N = group_advantages(rewards_N, group_ids_N, eps=EPS, impl="cpp")
    times_ms = {}
    for name, loop in PYTHON_LOOPS.items():
        torch.testing.assert_close(loop(rewards_N, group_ids_N), expected_N)
        loop_ms = time_ms(lambda loop=loop: loop(rewards_N, group_ids_N), device="cpu", max_reps=1, warm_up=False)
        times_ms[f"{name}_ms"] = loop_ms * num_samples / rewards_N.numel()
    return times_ms, is_scaled


def run_case(num_samples: int, group_size: int, layout: str, device: str) -> dict:
    """Times every provider on one shape, after checking that they agree."""
    rewards_N, group_ids_N = make_case(num_samples, group_size, layout, device)
    num_groups = num_samples // group_size
    providers = {
        "ours": lambda: group_advantages(rewards_N, group_ids_N, num_groups=num_groups, eps=EPS, impl="cpp"),
        "index_add": lambda: torch_index_add_advantages(rewards_N, group_ids_N, num_groups),
        "bincount": lambda: torch_bincount_advantages(rewards_N, group_ids_N, num_groups),
    }
    expected_N = providers["ours"]()
    for name in ("index_add", "bincount"):
        torch.testing.assert_close(providers[name](), expected_N, msg=lambda m, name=name: f"{name}: {m}")
    row = {"n": num_samples, "group_size": group_size, "layout": layout}
    row.update({f"{name}_ms": time_ms(fn, device=device) for name, fn in providers.items()})
    loop_times_ms, row["loop_scaled"] = time_python_loops(rewards_N, group_ids_N, group_size)
    row.update(loop_times_ms)
    row["torch_ms"] = min(row["index_add_ms"], row["bincount_ms"])
    row["speedup_vs_loop"] = min(loop_times_ms.values()) / row["ours_ms"]
    row["speedup_vs_torch"] = row["torch_ms"] / row["ours_ms"]
    return row


def format_table(rows: list[dict]) -> list[str]:
    """The results as markdown table lines; (*) marks Python-loop times scaled from a subset."""
    header = (
        "N", "group size", "layout", "ours (ms)", "index_add (ms)", "bincount (ms)", "loop (torch) (ms)",
        "loop (float) (ms)", "vs loop", "vs best torch",
    )  # fmt: skip
    cells = []
    for row in rows:
        mark = "*" if row["loop_scaled"] else ""
        cells.append(
            (
                row["n"],
                row["group_size"],
                row["layout"],
                f"{row['ours_ms']:.3f}",
                f"{row['index_add_ms']:.3f}",
                f"{row['bincount_ms']:.3f}",
                f"{row['loop_torch_ms']:.1f}{mark}",
                f"{row['loop_float_ms']:.1f}{mark}",
                f"{row['speedup_vs_loop']:.0f}x",
                f"{row['speedup_vs_torch']:.2f}x",
            )
        )
    return markdown_table(header, cells, align="rrlrrrrrrr")


def headline(rows: list[dict], threads: int) -> dict:
    """The JSON summary (write_report adds bench and device): per N, the worst speedup over group sizes and layouts
    (against the faster Python loop and the faster torch baseline), and our slowest time at N = 65536."""
    summary = {"threads": threads}
    for num_samples in SAMPLE_COUNTS:
        at_n = [row for row in rows if row["n"] == num_samples]
        summary[f"speedup_vs_loop_n{num_samples}"] = round(min(row["speedup_vs_loop"] for row in at_n), 1)
        summary[f"speedup_vs_torch_n{num_samples}"] = round(min(row["speedup_vs_torch"] for row in at_n), 2)
    summary["ours_ms_n65536"] = round(max(row["ours_ms"] for row in rows if row["n"] == 65536), 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (ours is single-threaded)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if group_advantages_impl() != "cpp":
        raise SystemExit("guide_mega._C is not built: run `pip install --no-build-isolation -e .` first")
    rows = [
        run_case(num_samples, group_size, layout, args.device)
        for num_samples in SAMPLE_COUNTS
        for group_size in GROUP_SIZES
        for layout in LAYOUTS
    ]
    notes = [
        "- GRPO mode (unbiased std, eps 1e-6 outside the sqrt), float32 binary rewards, int64 ids, median wall times.",
        "- Ours also checks its inputs (finite rewards, id range); the torch baselines do not.",
        "- vs loop: against the faster Python loop; vs best torch: against the faster of index_add and bincount.",
        f"- (*) Python loops timed on {LOOP_MAX_SAMPLES} samples (whole groups), scaled by N / {LOOP_MAX_SAMPLES}.",
        "- The Python loops run on CPU tensors whatever the device.",
    ]
    write_report(
        "group_advantages",
        args.device,
        title=f"group advantages benchmark ({args.device})",
        machine=machine_lines(args.device),
        table=format_table(rows),
        notes=notes,
        summary=headline(rows, args.threads),
    )


if __name__ == "__main__":
    main()

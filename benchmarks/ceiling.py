"""The machine's GEMM ceiling and a profile split, for benchmarks that report throughput as a share of what the
hardware's matrix multiplies allow (bench_rollout.py, bench_train_step.py).

A model's tokens/s ceiling is the GEMM rate at its own shapes divided by its FLOPs per token; both benchmarks time
the GEMMs in the same run as the model, because on a shared machine only numbers measured side by side compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
PYTHON = "Python, framework"


def gemm_rate(shape_counts: dict[tuple[int, int, int], int], *, seconds: float = 0.25) -> float:
    """FLOP/s of a mix of GEMMs {(m, k, n): how often it occurs}, each [m, k] @ [n, k]^T (an nn.Linear's layout)
    in fp32, weighted by count. Each shape is called repeatedly for about `seconds` after a warm-up, and its fastest
    call counts: on a shared machine other processes only ever slow a call down, and a ceiling is what the
    hardware can do."""
    flops = elapsed = 0.0
    for (m, k, n), count in shape_counts.items():
        a_MK, b_NK = torch.randn(m, k), torch.randn(n, k)
        torch.mm(a_MK, b_NK.t())
        fastest, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline or fastest == float("inf"):
            start = time.perf_counter()
            torch.mm(a_MK, b_NK.t())
            fastest = min(fastest, time.perf_counter() - start)
        elapsed += count * fastest
        flops += count * 2.0 * m * k * n
    return flops / elapsed


def profile_split(run: Callable[[], object], categorize: Callable[[object], str]) -> dict[str, float]:
    """Seconds of one `run` by category: each aten op's self time goes to `categorize(event)`; the rest of the
    wall time (Python, dispatch, the profiler's own overhead) to PYTHON. Keys: the categories seen, PYTHON, wall."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    seconds: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith("aten::"):
            category = categorize(event)
            seconds[category] = seconds.get(category, 0.0) + event.self_cpu_time_total / 1e6
    seconds[PYTHON] = wall - sum(seconds.values())
    seconds["wall"] = wall
    return seconds


def has_ancestor(event, name: str) -> bool:
    """Whether a profiler event runs inside a `record_function(name)` region."""
    parent = event.cpu_parent
    while parent is not None and parent.name != name:
        parent = parent.cpu_parent
    return parent is not None

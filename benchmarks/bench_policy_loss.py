"""Benchmark the per-token Guide policy loss, forward + backward (per-token upstream gradient), side by side.

Providers:
  ours       guide_mega.kernels.policy_loss(impl="auto"): on CUDA one Triton launch computes loss and
             d(loss)/d(logprob), the backward is one multiply; on CPU the same closed form in vectorised torch
  reference  guide_mega.kernels.policy_loss.reference (eager torch, autograd builds the backward)
  losses     guide_mega.algorithms.losses.policy_loss, what the trainer calls (autograd; also computes its metrics)
  compile    (CUDA) torch.compile of the reference

Shape legend: T tokens. Options: off_policy=shaping (gamma given), clip 0.2/0.28, dual-clip 3; half the tokens
guided, 90% inside the loss mask. Target on an H100 (K6): under 50 us per 16k-token micro-batch.

Usage: python benchmarks/bench_policy_loss.py [--device cpu|cuda] [--threads 1]
Prints a table, writes it to benchmarks/results/policy_loss_<device>_<yyyymmdd>.md, prints one JSON line last.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from report import machine_lines, markdown_table, write_report

from guide_mega.algorithms.losses import PolicyLossOptions
from guide_mega.algorithms.losses import policy_loss as losses_policy_loss
from guide_mega.kernels import policy_loss
from guide_mega.kernels.policy_loss import policy_loss_reference

TOKEN_COUNTS = (16384, 262144)
OPTIONS = PolicyLossOptions(clip_low=0.2, clip_high=0.28, dual_clip=3.0, off_policy="shaping")
GAMMA = 0.8
# CPU timing: repeat until this much time is spent (or MAX_REPS), report the median.
MIN_TIME_S = 0.3
MAX_REPS = 50


def make_batch(num_tokens: int, device: str):
    generator = torch.Generator(device=device).manual_seed(0)

    def uniform():
        return torch.rand(num_tokens, device=device, generator=generator)

    old_logprobs_T = -uniform() * 5.0
    logprobs_T = old_logprobs_T + uniform() - 0.5
    advantages_T = torch.randn(num_tokens, device=device, generator=generator)
    loss_mask_T, is_guided_T = uniform() < 0.9, uniform() < 0.5
    upstream_T = torch.randn(num_tokens, device=device, generator=generator)
    return logprobs_T, (old_logprobs_T, advantages_T, loss_mask_T, is_guided_T), upstream_T


def provider_fn(name: str, gamma):
    """logprobs_T, rest -> loss_T for one provider."""
    if name == "ours":
        return lambda lp, rest: policy_loss(lp, *rest, options=OPTIONS, gamma=gamma)
    if name == "reference":
        return lambda lp, rest: policy_loss_reference(lp, *rest, options=OPTIONS, gamma=gamma)
    if name == "losses":
        return lambda lp, rest: losses_policy_loss(lp, *rest, options=OPTIONS, gamma=gamma)[0]
    if name == "compile":
        return torch.compile(lambda lp, rest: policy_loss_reference(lp, *rest, options=OPTIONS, gamma=gamma))
    raise ValueError(f"unknown provider {name!r}")


def forward_backward(compute, logprobs_T, rest, upstream_T):
    """One forward + backward; returns (loss_T, grad_T)."""
    logprobs_T = logprobs_T.detach().requires_grad_()
    loss_T = compute(logprobs_T, rest)
    loss_T.backward(upstream_T)
    return loss_T.detach(), logprobs_T.grad


def median_us(step, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return 1000 * do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]
    times, spent = [], 0.0
    while spent < MIN_TIME_S and len(times) < MAX_REPS:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return 1e6 * statistics.median(times)


def run(device: str) -> tuple[list[dict], dict]:
    providers = ("ours", "reference", "losses") + (("compile",) if device == "cuda" else ())
    gamma = torch.tensor(GAMMA, device=device)
    rows, headline = [], {}
    for num_tokens in TOKEN_COUNTS:
        logprobs_T, rest, upstream_T = make_batch(num_tokens, device)
        expected = forward_backward(provider_fn("losses", gamma), logprobs_T, rest, upstream_T)
        timings = {}
        for provider in providers:
            compute = provider_fn(provider, gamma)
            loss_T, grad_T = forward_backward(compute, logprobs_T, rest, upstream_T)
            timings[provider] = median_us(
                functools.partial(forward_backward, compute, logprobs_T, rest, upstream_T), device
            )
            row = {"T": num_tokens, "provider": provider, "us": timings[provider]}
            row["loss_diff"] = (loss_T - expected[0]).abs().max().item()
            row["grad_diff"] = (grad_T - expected[1]).abs().max().item()
            rows.append(row)
        headline[f"ours_us_t{num_tokens}"] = round(timings["ours"], 1)
        for baseline in ("reference", "losses"):
            headline[f"speedup_vs_{baseline}_t{num_tokens}"] = round(timings[baseline] / timings["ours"], 2)
    return rows, headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (elementwise work: 1 is steadiest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, headline = run(args.device)
    ours_us = {row["T"]: row["us"] for row in rows if row["provider"] == "ours"}
    table = markdown_table(
        ("T", "provider", "fwd+bwd (us)", "vs ours", "max abs diff loss", "max abs diff grad"),
        [
            (
                row["T"],
                row["provider"],
                f"{row['us']:.1f}",
                f"{row['us'] / ours_us[row['T']]:.2f}x",
                f"{row['loss_diff']:.1e}",
                f"{row['grad_diff']:.1e}",
            )
            for row in rows
        ],
        align="rlrrrr",
    )
    notes = [
        "Median wall time of forward + backward (per-token upstream gradient), including autograd overhead.",
        "Diffs are against guide_mega.algorithms.losses.policy_loss (values and autograd gradients).",
        "'ours' on CPU is the closed-form torch pass; on CUDA it is the Triton kernel.",
    ]
    write_report(
        "policy_loss",
        args.device,
        title=f"policy_loss benchmark ({args.device})",
        machine=machine_lines(args.device),
        table=table,
        notes=notes,
        summary={"threads": args.threads, **headline},
    )


if __name__ == "__main__":
    main()

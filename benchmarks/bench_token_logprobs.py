"""Benchmark per-token logprobs from the LM head: time and peak extra memory, side by side in one run.

Providers:
  naive          logits = hidden @ W^T ([T, V] in the input dtype), fp32 log_softmax, gather (a typical trainer)
  token_chunked  the same per 512-token chunk (verl's torch fallback style): [512, V] at a time, no recompute
  ours           guide_mega.kernels.token_logprobs(impl="auto"): on CPU the chunked torch path (two-level
                 [1024, 4096] blocks, online log-sum-exp, logits recomputed in backward); on CUDA the Triton kernel
  compile        (CUDA) torch.compile of naive;   liger (CUDA, if installed) Liger's fused linear cross entropy

CPU: fp32, one run per provider, each in a fresh subprocess. Peak extra memory there is the rise of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs after the inputs exist) while the provider runs,
with glibc's mmap threshold pinned at 1 MiB so freed blocks go back to the OS: real pages touched, not an estimate.
The Triton interpreter is a test vehicle, not a performance path, so "ours" on CPU is the chunked torch code.
CUDA: bf16, triton.testing.do_bench medians, torch.cuda.max_memory_allocated; TFLOP/s count 2THV forward and
8THV forward+backward (logits recomputed), against cuBLAS's bf16 hidden @ W^T at the same shape.

Usage: python benchmarks/bench_token_logprobs.py [--device cpu|cuda]
Prints a table, writes it to benchmarks/results/token_logprobs_<device>_<yyyymmdd>.md, prints one JSON line last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from report import machine_lines, markdown_table, write_report

from guide_mega.kernels import token_logprobs
from guide_mega.kernels.token_logprobs.reference import token_logprobs_naive

TEMPERATURE = 0.9
TOKEN_CHUNK = 512
# (label, T, H, V, with backward): the headline shapes of the issue, plus a smaller forward+backward one.
CPU_CASES = (
    ("v32768", 4096, 1024, 32768, False),
    ("v151936", 512, 1024, 151936, False),
    ("v32768_fwd_bwd", 1024, 1024, 32768, True),
)
CPU_PROVIDERS = ("naive", "token_chunked", "ours")
GPU_CASES = (("qwen2.5-7b", 16384, 3584, 152064), ("qwen2.5-72b_tp8", 16384, 8192, 19008))
GPU_PROVIDERS = ("ours", "eager", "compile", "liger")


def token_chunked_logprobs(hidden_TH, weight_VH, target_ids_T, *, temperature=1.0):
    """Logprobs [T] computed per TOKEN_CHUNK tokens over the full vocabulary (autograd keeps every chunk)."""
    pieces = []
    for t0 in range(0, hidden_TH.shape[0], TOKEN_CHUNK):
        logits_cV = (hidden_TH[t0 : t0 + TOKEN_CHUNK] @ weight_VH.T).float() / temperature
        targets_c = target_ids_T[t0 : t0 + TOKEN_CHUNK].unsqueeze(1)
        pieces.append(torch.log_softmax(logits_cV, dim=-1).gather(1, targets_c).squeeze(1))
    return torch.cat(pieces)


def provider_fn(name: str):
    """(hidden, weight, targets) -> logprobs_T for one provider."""
    if name == "naive" or name == "eager":
        return lambda h, w, y: token_logprobs_naive(h, w, y, temperature=TEMPERATURE).logprobs_T
    if name == "token_chunked":
        return lambda h, w, y: token_chunked_logprobs(h, w, y, temperature=TEMPERATURE)
    if name == "ours":
        return lambda h, w, y: token_logprobs(h, w, y, temperature=TEMPERATURE).logprobs_T
    if name == "compile":
        return torch.compile(lambda h, w, y: token_logprobs_naive(h, w, y, temperature=TEMPERATURE).logprobs_T)
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # Liger has no temperature: scale the hidden states instead (same logits, one extra [T, H] op).
        return lambda h, w, y: -liger_fused_linear_cross_entropy(h / TEMPERATURE, w, y, reduction="none")
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(num_tokens, hidden, vocab, dtype, device, *, requires_grad=False):
    generator = torch.Generator(device=device).manual_seed(0)
    hidden_TH = torch.randn(num_tokens, hidden, device=device, generator=generator).to(dtype)
    weight_VH = (torch.randn(vocab, hidden, device=device, generator=generator) * (4.0 / hidden**0.5)).to(dtype)
    target_ids_T = torch.randint(0, vocab, (num_tokens,), device=device, generator=generator)
    return hidden_TH.requires_grad_(requires_grad), weight_VH.requires_grad_(requires_grad), target_ids_T


def _memory_status_kib() -> dict[str, int]:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return {key: int(value.split()[0]) for key, value in fields.items()}


def _measure_cpu(provider: str, inputs, upstream_T, backward: bool) -> dict:
    """One run of one provider: wall time, rise of the peak resident set, and its logprobs."""
    hidden_TH, weight_VH, target_ids_T = inputs
    hidden_TH.grad = weight_VH.grad = None
    compute = provider_fn(provider)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline_kib = _memory_status_kib()["VmRSS"]
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        logprobs_T = compute(hidden_TH, weight_VH, target_ids_T)
        if backward:
            logprobs_T.backward(upstream_T)
    seconds = time.perf_counter() - start
    peak_extra_mib = (_memory_status_kib()["VmHWM"] - baseline_kib) / 1024
    return {"seconds": seconds, "peak_extra_mib": peak_extra_mib, "logprobs_T": logprobs_T.detach()}


def cpu_worker(num_tokens: int, hidden: int, vocab: int, backward: bool, out_path: str) -> None:
    """Measure every provider on one case in this fresh process, after warming each up on a tiny input
    (thread pools, allocator arenas), so that no provider pays one-time costs inside its measurement."""
    for provider in CPU_PROVIDERS:
        tiny = make_inputs(64, 64, 1024, torch.float32, "cpu", requires_grad=backward)
        _measure_cpu(provider, tiny, torch.randn(64), backward)
    inputs = make_inputs(num_tokens, hidden, vocab, torch.float32, "cpu", requires_grad=backward)
    upstream_T = torch.randn(num_tokens)
    torch.save({provider: _measure_cpu(provider, inputs, upstream_T, backward) for provider in CPU_PROVIDERS}, out_path)


def run_cpu(rows: list[dict]) -> dict:
    """All CPU cases, each in its own subprocess; returns the JSON headline figures."""
    headline = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    with tempfile.TemporaryDirectory() as scratch:
        for label, num_tokens, hidden, vocab, backward in CPU_CASES:
            out_path = os.path.join(scratch, f"{label}.pt")
            worker = [str(num_tokens), str(hidden), str(vocab), str(int(backward)), out_path]
            subprocess.run([sys.executable, __file__, "--worker", *worker], env=env, check=True)
            results = torch.load(out_path)
            naive, ours = results["naive"], results["ours"]
            for provider, result in results.items():
                rows.append(
                    {
                        "case": label,
                        "T": num_tokens,
                        "V": vocab,
                        "mode": "fwd+bwd" if backward else "fwd",
                        "provider": provider,
                        "seconds": result["seconds"],
                        "peak_extra_mib": result["peak_extra_mib"],
                        "mem_ratio": result["peak_extra_mib"] / naive["peak_extra_mib"],
                        "max_diff": (result["logprobs_T"] - naive["logprobs_T"]).abs().max().item(),
                    }
                )
            headline[f"peak_mem_ratio_vs_naive_{label}"] = round(ours["peak_extra_mib"] / naive["peak_extra_mib"], 4)
            headline[f"time_ratio_vs_naive_{label}"] = round(ours["seconds"] / naive["seconds"], 3)
    return headline


def _median_ms(step) -> float:
    from triton.testing import do_bench

    return do_bench(step, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])[0]


def gpu_measure(provider: str, num_tokens: int, hidden: int, vocab: int, backward: bool) -> dict:
    """Median time and peak extra memory of one provider on bf16 inputs (forward, or forward + backward)."""
    hidden_TH, weight_VH, target_ids_T = make_inputs(
        num_tokens, hidden, vocab, torch.bfloat16, "cuda", requires_grad=backward
    )
    upstream_T = torch.randn(num_tokens, device="cuda")
    compute = provider_fn(provider)

    def step():
        hidden_TH.grad = weight_VH.grad = None
        with torch.set_grad_enabled(backward):
            logprobs_T = compute(hidden_TH, weight_VH, target_ids_T)
            if backward:
                logprobs_T.backward(upstream_T)
        return logprobs_T

    step()
    hidden_TH.grad = weight_VH.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    logprobs_T = step().detach().float()
    torch.cuda.synchronize()
    peak_extra_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return {"ms": _median_ms(step), "peak_extra_mib": peak_extra_mib, "logprobs_T": logprobs_T}


def cublas_tflops(num_tokens: int, hidden: int, vocab: int) -> float:
    """Measured bf16 TFLOP/s of the bare LM-head matmul hidden @ W^T at this shape (the roofline we compare to)."""
    hidden_TH, weight_VH, _ = make_inputs(num_tokens, hidden, vocab, torch.bfloat16, "cuda")
    return 2 * num_tokens * hidden * vocab / _median_ms(lambda: hidden_TH @ weight_VH.T) / 1e9


def gpu_case_rows(label: str, num_tokens: int, hidden: int, vocab: int, backward: bool, matmul_tflops: float):
    """One row per provider; a failure (missing peer, out of memory) becomes the row's error, not an exception."""
    results = {}
    for provider in GPU_PROVIDERS:
        try:
            results[provider] = gpu_measure(provider, num_tokens, hidden, vocab, backward)
        except Exception as error:  # one failing provider must not hide the other numbers
            results[provider] = {"error": f"{type(error).__name__}: {str(error)[:80]}"}
        torch.cuda.empty_cache()
    flops = (8 if backward else 2) * num_tokens * hidden * vocab
    reference_T = results["eager"].get("logprobs_T")
    rows = []
    for provider, result in results.items():
        row = {"case": label, "mode": "fwd+bwd" if backward else "fwd", "provider": provider}
        row["error"] = result.get("error")
        if "ms" in result:
            row.update(ms=result["ms"], tflops=flops / result["ms"] / 1e9, peak_extra_mib=result["peak_extra_mib"])
            row["pct_of_matmul"] = 100 * row["tflops"] / matmul_tflops
            if reference_T is not None:
                row["max_diff"] = (result["logprobs_T"] - reference_T).abs().max().item()
        rows.append(row)
    return rows


def run_gpu(rows: list[dict]) -> dict:
    """Every GPU case and mode; returns the JSON headline figures for "ours"."""
    headline = {}
    for label, num_tokens, hidden, vocab in GPU_CASES:
        matmul_tflops = cublas_tflops(num_tokens, hidden, vocab)
        for backward in (False, True):
            case_rows = gpu_case_rows(label, num_tokens, hidden, vocab, backward, matmul_tflops)
            rows.extend(case_rows)
            ours, eager = (next(r for r in case_rows if r["provider"] == name) for name in ("ours", "eager"))
            mode = "fwd_bwd" if backward else "fwd"
            headline[f"{mode}_pct_of_matmul_peak_{label}"] = round(ours.get("pct_of_matmul", 0.0), 1)
            if "ms" in ours and "ms" in eager:
                headline[f"{mode}_speedup_vs_eager_{label}"] = round(eager["ms"] / ours["ms"], 2)
                memory_ratio = ours["peak_extra_mib"] / eager["peak_extra_mib"]
                headline[f"{mode}_peak_mem_ratio_vs_eager_{label}"] = round(memory_ratio, 4)
    return headline


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict], device: str) -> list[str]:
    if device == "cpu":
        header = ("case", "T", "V", "mode", "provider", "time (s)", "peak extra (MiB)", "vs naive",
                  "max abs diff vs naive")  # fmt: skip
        cells = [
            (r["case"], r["T"], r["V"], r["mode"], r["provider"], f"{r['seconds']:.2f}",
             f"{r['peak_extra_mib']:.0f}", f"{r['mem_ratio']:.3f}", f"{r['max_diff']:.1e}")
            for r in rows
        ]  # fmt: skip
        return markdown_table(header, cells, align="lrrllrrrr")
    header = ("case", "mode", "provider", "ms", "TFLOP/s", "% of cuBLAS", "peak extra (MiB)", "max abs diff vs eager")
    # A provider that failed (missing peer, out of memory) shows its error in the time column.
    cells = [
        (r["case"], r["mode"], r["provider"], r["error"]) if r["error"] else
        (r["case"], r["mode"], r["provider"], f"{r['ms']:.2f}", f"{r['tflops']:.0f}", f"{r['pct_of_matmul']:.0f}",
         f"{r['peak_extra_mib']:.0f}", _fmt(r.get("max_diff"), 4))
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, cells, align="lllrrrrr")


NOTES = {
    "cpu": [
        "fp32, temperature 0.9; each case runs in a fresh process, every provider warmed up on a tiny input first,",
        "then measured once (CPU GEMMs run at ~25 GFLOP/s on this shared 2-core machine: times are indicative).",
        "Peak extra = rise of the process's peak resident set while the provider runs (VmHWM reset through",
        "/proc/self/clear_refs; glibc mmap threshold pinned at 1 MiB so freed blocks leave the resident set).",
        "'ours' on CPU = the chunked torch path (the Triton interpreter is for tests, not speed).",
        "fwd rows run without autograd (the old-logprob pass); fwd+bwd takes a random per-token gradient, and its",
        "peaks include the 128 MiB fp32 grad_weight [V, H] that every provider has to produce.",
    ],
    "cuda": [
        "bf16 inputs, temperature 0.9, do_bench medians. TFLOP/s count 2THV (fwd) and 8THV (fwd+bwd, logits",
        "recomputed), for every provider; % of cuBLAS = against bf16 hidden @ W^T at the same shape.",
        "Liger has no temperature argument: its inputs are scaled by 1/temperature first.",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worker", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        num_tokens, hidden, vocab, backward, out_path = args.worker
        cpu_worker(int(num_tokens), int(hidden), int(vocab), bool(int(backward)), out_path)
        return
    rows: list[dict] = []
    headline = run_cpu(rows) if args.device == "cpu" else run_gpu(rows)
    write_report(
        "token_logprobs",
        args.device,
        title=f"token_logprobs benchmark ({args.device})",
        machine=machine_lines(args.device),
        table=format_table(rows, args.device),
        notes=NOTES[args.device],
        summary=headline,
    )


if __name__ == "__main__":
    main()

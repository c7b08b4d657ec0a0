"""Rollout throughput on CPU as a share of the machine's fp32 GEMM ceiling: HFEngine now vs before (v1), side by side.

v1 is the engine before continuous batching (hf_decode.py of commit 50cd770, read from git): it decodes requests
in chunks of the batch width, drops finished rows, and grows a DynamicCache by concatenation. Both engines get the
same model, seeded requests and sampling, in two workloads:

  fixed     every sequence generates exactly --max-new-tokens (ignore_eos) and the requests fill one batch:
            the cost of a decode step
  natural   sequences stop at end-of-sequence, as in training, and there are twice as many requests as slots:
            what continuous batching adds (v1 decodes two chunks that shrink as their rows finish)

Ceiling: the model's GEMMs (its own Linear weights, at the batch width's rows) are timed in the same run,
interleaved with the engines; generated tokens/s x FLOPs per token (2 x matmul parameters + attention over the mean
context) over that rate is the share reported. A profile of a fixed run per engine (torch.profiler, the faster of
two) splits the wall time into GEMM, attention, KV cache copies, sampling, other ops, and Python (the rest).
With --sglang, a local
SGLang server (its own virtual environment, guide_mega.rollout.sglang_server) runs the fixed workload too.
Prints tables, writes them to benchmarks/results/rollout_cpu_<date>.md, and prints one JSON line last.

    python benchmarks/bench_rollout.py                          # SmolLM2-135M (embedded), 64 slots x 64 tokens
    python benchmarks/bench_rollout.py --prompts 2 --max-new-tokens 16 --repeats 1    # quick
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from ceiling import GEMM_OPS, PYTHON, gemm_rate, has_ancestor, profile_split
from report import machine_lines, markdown_table, write_report
from torch.profiler import record_function

from guide_mega.data.chat import render_prompt_ids
from guide_mega.data.embedded_model import default_cache_dir, resolve_model_path
from guide_mega.data.reasoning_gym_source import load_reasoning_gym
from guide_mega.rollout import hf_decode
from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.rollout.hf_engine import HFEngine

V1_COMMIT = "50cd770"
_LEG_COUNTING = {"min_animals": 2, "max_animals": 2, "min_instances": 1, "max_instances": 3}
CACHE_OPS = {"aten::cat", "aten::index", "aten::index_select", "aten::copy_", "aten::clone", "aten::zero_"}
PROFILE_CATEGORIES = ("GEMM", "attention", "KV cache copies", "sampling", "other ops", PYTHON)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="HF directory or embedded:<name>")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the fixed workload (x2 for natural)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per engine and workload")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sglang", action="store_true", help="also time a local SGLang server (fixed workload)")
    parser.add_argument("--sglang-venv", default=None, help="its environment (default: under the cache dir)")
    return parser.parse_args()


class V1Engine:
    """The engine before continuous batching: v1's sample_batch over chunks of `batch_size` requests."""

    def __init__(self, engine: HFEngine) -> None:
        source = subprocess.run(
            ["git", "show", f"{V1_COMMIT}:guide_mega/rollout/hf_decode.py"],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent,
        ).stdout  # fmt: skip
        self.decode = types.ModuleType("hf_decode_v1")
        exec(compile(source, "hf_decode_v1.py", "exec"), self.decode.__dict__)
        self.engine = engine

    def generate(self, requests, sampling: SamplingParams, *, seeds=None) -> list[Completion]:
        engine, width, completions = self.engine, self.engine.batch_size, []
        for start in range(0, len(requests), width):
            completions += self.decode.sample_batch(
                engine.model, requests[start : start + width], sampling, tokenizer=engine.tokenizer,
                pad_id=engine.pad_id, stop_ids=set() if sampling.ignore_eos else engine.eos_ids,
                seeds=None if seeds is None else seeds[start : start + width],
            )  # fmt: skip
        return completions


def _requests(tokenizer, *, prompts: int, group_size: int) -> list[list[int]]:
    source = load_reasoning_gym("leg_counting", size=prompts, seed=1234, **_LEG_COUNTING).prompts
    return [render_prompt_ids(tokenizer, prompt.prompt) for prompt in source for _ in range(group_size)]


def matmul_parameters(model) -> int:
    """Weights that take part in a GEMM per token: every Linear (the LM head included, tied or not)."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def flops_per_token(model, *, context: float) -> float:
    """Decode FLOPs per generated token: 2 x matmul parameters, plus QK^T and AV over `context` cached positions."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    return 2 * matmul_parameters(model) + attention


def decode_shapes(model, rows: int) -> dict[tuple[int, int, int], int]:
    """The GEMMs (m, k, n) of a decode step with `rows` rows, with how often each occurs: the model's Linear layers."""
    counts: dict[tuple[int, int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            shape = (rows, in_features, out_features)
            counts[shape] = counts.get(shape, 0) + 1
    return counts


def _timed(run: Callable[[], list[Completion]]) -> tuple[float, list[Completion]]:
    start = time.perf_counter()
    completions = run()
    return time.perf_counter() - start, completions


def _profile(run: Callable[[], object], decode: types.ModuleType) -> dict[str, float]:
    """Seconds of one run by category: GEMM, attention, KV cache copies, sampling (inside
    `decode.sample_next_tokens`), other ops, and Python (the rest of the wall time)."""
    sample_next_tokens = decode.sample_next_tokens

    def labelled(*args, **kwargs):
        with record_function("sampling"):
            return sample_next_tokens(*args, **kwargs)

    decode.sample_next_tokens = labelled
    try:
        return profile_split(run, _category)
    finally:
        decode.sample_next_tokens = sample_next_tokens


def _category(event) -> str:
    if has_ancestor(event, "sampling"):
        return "sampling"
    if event.name in GEMM_OPS:
        return "GEMM"
    if "scaled_dot_product" in event.name:
        return "attention"
    return "KV cache copies" if event.name in CACHE_OPS else "other ops"


def _bench_sglang(model_dir: Path, requests, sampling, args) -> float | None:
    """Tokens/s of a local SGLang server on the fixed workload, or None (with a message) without its environment."""
    from guide_mega.rollout.sglang_engine import SGLangServerEngine
    from guide_mega.rollout.sglang_server import SGLANG_VERSION, LocalSGLangServer, build_cpu_venv

    venv = Path(args.sglang_venv or default_cache_dir() / f"sglang-{SGLANG_VERSION}-cpu")
    if not (venv / ".guide_mega_ready").is_file():
        print(f"no SGLang environment at {venv}; skipping it", file=sys.stderr)
        return None
    build_cpu_venv(venv)
    log_path = Path(tempfile.mkdtemp(prefix="bench_rollout_")) / "sglang.log"
    server = LocalSGLangServer(venv, model_dir, log_path=log_path, extra_args=("--random-seed", "0"))
    server.env["OMP_NUM_THREADS"] = str(args.threads)
    with server:
        engine = SGLangServerEngine(server.url, requests_per_call=len(requests))
        engine.generate(requests[:2], SamplingParams(temperature=0, max_new_tokens=4))
        seconds, completions = _timed(lambda: engine.generate(requests, sampling))
    return sum(len(c.response_ids) for c in completions) / seconds


def _workloads(tokenizer, args) -> dict[str, tuple[list[list[int]], SamplingParams, list[int]]]:
    """name -> (requests, sampling, per-request seeds)."""
    workloads = {}
    for name, prompts, ignore_eos in (("fixed", args.prompts, True), ("natural", 2 * args.prompts, False)):
        requests = _requests(tokenizer, prompts=prompts, group_size=args.group_size)
        sampling = SamplingParams(
            temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=ignore_eos, seed=0
        )
        workloads[name] = (requests, sampling, list(range(len(requests))))
    return workloads


def _measure(engines: dict, workloads: dict, shapes: dict[tuple[int, int, int], int], *, repeats: int) -> dict:
    """Interleaved timings: per repeat the GEMM rates, then every engine on every workload. Returns the medians
    (tokens/s per (engine, workload), FLOP/s at decode and large shapes) and the last completions."""
    speeds: dict[tuple[str, str], list[float]] = {}
    decode_rates, large_rates, completions = [], [], {}
    for _ in range(repeats):
        decode_rates.append(gemm_rate(shapes))
        large_rates.append(gemm_rate({(2048, 2048, 2048): 1}, seconds=1.0))
        for workload, (requests, sampling, seeds) in workloads.items():
            for name, engine in engines.items():
                seconds, out = _timed(lambda: engine.generate(requests, sampling, seeds=seeds))  # noqa: B023
                speeds.setdefault((name, workload), []).append(sum(len(c.response_ids) for c in out) / seconds)
                completions[(name, workload)] = out
    return {
        "tok_s": {key: statistics.median(values) for key, values in speeds.items()},
        "decode_flops": statistics.median(decode_rates),
        "large_flops": statistics.median(large_rates),
        "completions": completions,
    }


def _agreement(left: list[Completion], right: list[Completion]) -> tuple[int, float]:
    """(requests with identical tokens, largest logprob difference over the common tokens)."""
    same = sum(a.response_ids == b.response_ids for a, b in zip(left, right, strict=True))
    diffs = [abs(x - y) for a, b in zip(left, right, strict=True) for x, y in zip(a.logprobs, b.logprobs, strict=False)]
    return same, max(diffs, default=0.0)


def _mean_context(requests: list[list[int]], completions: list[Completion]) -> float:
    """Mean cached positions a generated token attends to: its prompt plus half its response."""
    pairs = [(len(prompt), len(c.response_ids)) for prompt, c in zip(requests, completions, strict=True)]
    return sum(n * (p + n / 2) for p, n in pairs) / sum(n for _, n in pairs)


def main() -> None:
    args = _parse_args()
    # A timeout's SIGTERM becomes an exception, so an SGLang server's context manager still stops it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_rollout: terminated"))
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path(args.model)
    width = args.prompts * args.group_size
    engine = HFEngine(model_dir, batch_size=width)
    engines = {"v1": V1Engine(engine), "HFEngine": engine}
    workloads = _workloads(engine.tokenizer, args)
    for candidate in engines.values():  # warm-up
        candidate.generate(workloads["fixed"][0][:2], SamplingParams(temperature=0, max_new_tokens=4))
    results = _measure(engines, workloads, decode_shapes(engine.model, width), repeats=args.repeats)
    fixed_requests, fixed_sampling, fixed_seeds = workloads["fixed"]
    # Two profiled runs per engine, interleaved; the faster of each is kept (a load spike only ever slows one down).
    profiles: dict[str, dict[str, float]] = {}
    for _ in range(2):
        for name, candidate, module in (("v1", engines["v1"], engines["v1"].decode), ("HFEngine", engine, hf_decode)):
            split = _profile(lambda: candidate.generate(fixed_requests, fixed_sampling, seeds=fixed_seeds), module)  # noqa: B023
            if name not in profiles or split["wall"] < profiles[name]["wall"]:
                profiles[name] = split
    sglang = _bench_sglang(model_dir, fixed_requests, fixed_sampling, args) if args.sglang else None
    _report(args, engine.model, workloads, results, profiles, sglang=sglang, load=os.getloadavg())


def _report(args, model, workloads: dict, results: dict, profiles: dict, *, sglang, load) -> None:
    """Write and print the throughput and profile tables, then the JSON line."""
    tok_s, completions = results["tok_s"], results["completions"]
    rows, summary = [], {"model": args.model, "width": args.prompts * args.group_size}
    for workload, (requests, _, _) in workloads.items():
        ceiling = results["decode_flops"] / flops_per_token(
            model, context=_mean_context(requests, completions[("HFEngine", workload)])
        )
        same, diff = _agreement(completions[("v1", workload)], completions[("HFEngine", workload)])
        for name in ("v1", "HFEngine"):
            speed = tok_s[(name, workload)]
            rows.append((workload, name, f"{speed:.1f}", f"{ceiling:.0f}", f"{100 * speed / ceiling:.0f}%"))
        rows[-1] += (f"{tok_s[('HFEngine', workload)] / tok_s[('v1', workload)]:.2f}x", f"{same}/{len(requests)}",
                     f"{diff:.1e}")  # fmt: skip
        summary |= {
            f"{workload}_tok_s": round(tok_s[("HFEngine", workload)], 1),
            f"{workload}_v1_tok_s": round(tok_s[("v1", workload)], 1),
            f"{workload}_speedup": round(tok_s[("HFEngine", workload)] / tok_s[("v1", workload)], 2),
            f"{workload}_ceiling_share": round(tok_s[("HFEngine", workload)] / ceiling, 3),
        }
    if sglang is not None:
        rows.append(("fixed", "SGLang server", f"{sglang:.1f}"))
        summary["sglang_tok_s"] = round(sglang, 1)
    header = ("workload", "engine", "tokens/s", "ceiling tok/s", "share", "vs v1", "same samples", "max |dlogprob|")
    table = markdown_table(header, rows, align="llrrrrrr")
    table += ["", *_profile_table(profiles)]
    summary |= {"gemm_gflops_decode": round(results["decode_flops"] / 1e9, 1),
                "gemm_gflops_large": round(results["large_flops"] / 1e9, 1)}  # fmt: skip
    notes = [
        f"Model {args.model}, {matmul_parameters(model) / 1e6:.1f}M matmul parameters; {args.group_size} samples "
        f"per leg_counting prompt, {args.prompts} prompts (fixed: ignore_eos) and {2 * args.prompts} (natural: "
        f"stops at end-of-sequence), up to {args.max_new_tokens} new tokens, T={args.temperature}, seeded per "
        f"request, fp32, {args.prompts * args.group_size} slots. Medians of {args.repeats} interleaved repeats; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.",
        "GEMM rate in the same run (each shape's fastest call, median over repeats): "
        f"{results['decode_flops'] / 1e9:.1f} GFLOP/s at the decode shapes (the model's Linear weights, "
        f"{args.prompts * args.group_size} rows), {results['large_flops'] / 1e9:.1f} GFLOP/s at "
        "2048^3. Ceiling = that decode rate / FLOPs per generated token (2 x matmul parameters + attention over the "
        "mean context); prefill FLOPs count against the share (they are not generated tokens).",
    ]
    write_report(
        "rollout",
        "cpu",
        title="Rollout throughput on CPU: share of the GEMM ceiling",
        machine=machine_lines("cpu", extra_versions=(f"transformers {transformers.__version__}",)),
        table=table,
        notes=notes,
        summary=summary,
    )


def _profile_table(profiles: dict[str, dict[str, float]]) -> list[str]:
    """Where one fixed-workload run's wall time goes, per engine (torch.profiler, which adds some overhead)."""
    names = list(profiles)
    header = ("category", *(f"{name} s" for name in names), *(f"{name} %" for name in names))
    rows = []
    for category in (*PROFILE_CATEGORIES, "wall"):
        seconds = [profiles[name].get(category, 0.0) for name in names]
        shares = [f"{100 * value / profiles[name]['wall']:.0f}%" for name, value in zip(names, seconds, strict=True)]
        rows.append((category, *(f"{value:.2f}" for value in seconds), *shares))
    return markdown_table(header, rows, align="lrrrr")


if __name__ == "__main__":
    main()

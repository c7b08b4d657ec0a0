"""Rollout throughput on CPU: HFEngine vs a local SGLang server, same model, prompts and sampling, in one run.

Both engines generate exactly `--max-new-tokens` per sequence (ignore_eos), so they do the same work; the figure is
generated tokens per second of wall time for the whole batch. SGLang runs in its own virtual environment
(guide_mega.rollout.sglang_server; built with --build-sglang-venv, ~2.6 GB); without it only HFEngine is timed.
Prints a table, writes it to benchmarks/results/rollout_cpu_<date>.md, and prints one JSON line last.

    python benchmarks/bench_rollout.py                       # SmolLM2-135M-Instruct (embedded), 64 x 64 tokens
    python benchmarks/bench_rollout.py --prompts 4 --group-size 4 --max-new-tokens 32   # quick
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from report import machine_lines, markdown_table, write_report
from transformers import AutoTokenizer

from guide_mega.data.chat import render_prompt_ids
from guide_mega.data.embedded_model import default_cache_dir, resolve_model_path
from guide_mega.data.reasoning_gym_source import load_reasoning_gym
from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.rollout.hf_engine import HFEngine
from guide_mega.rollout.sglang_engine import SGLangServerEngine
from guide_mega.rollout.sglang_server import SGLANG_VERSION, LocalSGLangServer, build_cpu_venv

_LEG_COUNTING = {"min_animals": 2, "max_animals": 2, "min_instances": 1, "max_instances": 3}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="HF directory or embedded:<name>")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sglang-venv", default=str(default_cache_dir() / f"sglang-{SGLANG_VERSION}-cpu"))
    parser.add_argument("--build-sglang-venv", action="store_true", help="build the SGLang environment if missing")
    return parser.parse_args()


def _requests(tokenizer, args: argparse.Namespace) -> list[list[int]]:
    prompts = load_reasoning_gym("leg_counting", size=args.prompts, seed=1234, **_LEG_COUNTING).prompts
    return [render_prompt_ids(tokenizer, prompt.prompt) for prompt in prompts for _ in range(args.group_size)]


def _timed(engine, requests: list[list[int]], sampling: SamplingParams) -> tuple[float, list[Completion]]:
    engine.generate(requests[:2], SamplingParams(temperature=0, max_new_tokens=4))  # warm-up
    start = time.perf_counter()
    completions = engine.generate(requests, sampling)
    return time.perf_counter() - start, completions


def _bench_sglang(model_dir: Path, requests, sampling, args) -> tuple[float, list[Completion]] | None:
    venv = Path(args.sglang_venv)
    if not (venv / ".guide_mega_ready").is_file() and not args.build_sglang_venv:
        print(f"no SGLang environment at {venv} (use --build-sglang-venv); timing HFEngine only", file=sys.stderr)
        return None
    build_cpu_venv(venv)
    log_path = Path(tempfile.mkdtemp(prefix="bench_rollout_")) / "sglang.log"
    server = LocalSGLangServer(venv, model_dir, log_path=log_path, extra_args=("--random-seed", "0"))
    server.env["OMP_NUM_THREADS"] = str(args.threads)
    with server:
        engine = SGLangServerEngine(server.url, requests_per_call=len(requests))
        return _timed(engine, requests, sampling)


def main() -> None:
    args = _parse_args()
    # A timeout's SIGTERM becomes an exception, so the SGLang server's context manager still stops it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_rollout: terminated"))
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path(args.model)
    requests = _requests(AutoTokenizer.from_pretrained(model_dir), args)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=True, seed=0)
    rows = []
    sglang = _bench_sglang(model_dir, requests, sampling, args)
    if sglang is not None:
        rows.append(("SGLang server", sglang[0], sum(len(c.response_ids) for c in sglang[1])))
    hf_seconds, hf_completions = _timed(HFEngine(model_dir, batch_size=len(requests)), requests, sampling)
    rows.insert(0, ("HFEngine", hf_seconds, sum(len(c.response_ids) for c in hf_completions)))
    speeds = {name: tokens / seconds for name, seconds, tokens in rows}
    ratio = speeds["SGLang server"] / speeds["HFEngine"] if sglang is not None else None
    table = markdown_table(
        ("engine", "wall s", "generated tokens", "tokens/s"),
        [(name, f"{seconds:.1f}", tokens, f"{tokens / seconds:.1f}") for name, seconds, tokens in rows],
    )
    notes = [
        f"Model {args.model}; {args.prompts} leg_counting prompts x {args.group_size} samples, "
        f"{args.max_new_tokens} new tokens each (ignore_eos), T={args.temperature}, fp32.",
        "",
        f"SGLang / HFEngine tokens/s: {ratio:.2f}" if ratio is not None else "SGLang not run.",
    ]
    summary = {
        "model": args.model,
        "sequences": len(requests),
        "new_tokens": args.max_new_tokens,
        "hf_tok_s": round(speeds["HFEngine"], 1),
        "sglang_tok_s": round(speeds["SGLang server"], 1) if sglang is not None else None,
        "sglang_over_hf": round(ratio, 2) if ratio is not None else None,
    }
    versions = (f"transformers {transformers.__version__}", f"sglang {SGLANG_VERSION} (own venv)")
    write_report(
        "rollout",
        "cpu",
        title="Rollout throughput on CPU",
        machine=machine_lines("cpu", extra_versions=versions),
        table=table,
        notes=notes,
        summary=summary,
    )


if __name__ == "__main__":
    main()

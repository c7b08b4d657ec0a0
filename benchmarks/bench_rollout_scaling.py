"""Rollout at scale: generated tokens/s with 1 vs 2 engines (one thread each) and the weight sync's cost, in one run.

Engines: torchrun starts 1, then 2 processes; each owns an HFEngine on one CPU thread, and rank 0's EngineFleet
spreads the same seeded requests over them while the other serves (guide_mega.rollout.fleet, the trainer's path).
Every sequence is exactly --max-new-tokens long (ignore_eos), so both runs do the same work; the figure is
generated tokens per second of wall time. On a 2-core machine the ideal ratio is 2.

Weight sync: the engine's update_weights for the model's every tensor (the push after each step in colocated
mode), against a plain copy of the same bytes between two tensors on the same device; seconds per GB and the ratio.
(CPU only so far: the GPU figure for a 7B-shaped model through a colocated SGLang engine needs a GPU machine with
SGLang, which the one we borrow lacks.)

    python benchmarks/bench_rollout_scaling.py                      # SmolLM2-135M-Instruct (embedded)
    python benchmarks/bench_rollout_scaling.py --prompts 4 --max-new-tokens 16    # quick
Prints a table, writes benchmarks/results/rollout_scaling_<device>_<date>.md, and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import machine_lines, markdown_table, write_report

from guide_mega.data.embedded_model import resolve_model_path
from guide_mega.rollout.engine import SamplingParams, bucket_named_tensors, request_seed
from guide_mega.rollout.hf_engine import HFEngine

BUCKET_BYTES = 512 << 20


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="HF directory or embedded:<name>")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--worker", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    return parser.parse_args()


def _requests(args: argparse.Namespace, tokenizer) -> tuple[list[list[int]], list[int]]:
    """G copies of each prompt (short arithmetic questions) and one seed per request."""
    prompts = [
        tokenizer(f"Question {i}: what is {i} + {2 * i}? Think step by step.")["input_ids"] for i in range(args.prompts)
    ]
    requests = [ids for ids in prompts for _ in range(args.group_size)]
    seeds = [request_seed(0, prompt, sample) for prompt in range(args.prompts) for sample in range(args.group_size)]
    return requests, seeds


def worker(args: argparse.Namespace) -> None:
    """Under torchrun: every rank owns an engine; rank 0 times one spread generate call and writes the result."""
    import torch.distributed as dist

    from guide_mega.rollout.fleet import EngineFleet, serve

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    engine = HFEngine(resolve_model_path(args.model), batch_size=args.prompts * args.group_size)
    requests, seeds = _requests(args, engine.tokenizer)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    engine.generate(requests[:1], SamplingParams(max_new_tokens=2))  # warm-up: allocator, kernels
    dist.barrier()
    if dist.get_rank() != 0:
        serve(engine, group=dist.group.WORLD)
    else:
        fleet = EngineFleet(engine, owners=list(range(dist.get_world_size())), group=dist.group.WORLD)
        start = time.perf_counter()
        completions = fleet.generate(requests, sampling, seeds=seeds)
        seconds = time.perf_counter() - start
        fleet.stop_serving()
        result = {"tokens": sum(len(c.response_ids) for c in completions), "seconds": seconds,
                  "samples": [c.response_ids for c in completions]}  # fmt: skip
        Path(args.worker).write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generation_run(args: argparse.Namespace, engines: int, scratch: Path) -> dict:
    """One torchrun launch with `engines` processes; its rank 0's result."""
    out = scratch / f"engines_{engines}.json"
    passthrough = ["--model", args.model, "--prompts", str(args.prompts), "--group-size", str(args.group_size),
                   "--max-new-tokens", str(args.max_new_tokens), "--worker", str(out)]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={engines}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", __file__, *passthrough]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def weight_sync(args: argparse.Namespace) -> dict:
    """Seconds per GB of pushing every tensor into the engine (bucketed) and of copying the same bytes."""
    engine = HFEngine(resolve_model_path(args.model))
    tensors = [(name, param.detach().clone()) for name, param in engine.model.named_parameters()]
    targets = [torch.empty_like(tensor) for _, tensor in tensors]
    gigabytes = sum(t.numel() * t.element_size() for _, t in tensors) / 1e9

    def push() -> None:
        for bucket in bucket_named_tensors(tensors, bucket_bytes=BUCKET_BYTES):
            engine.update_weights(bucket)

    def copy() -> None:
        for target, (_, tensor) in zip(targets, tensors, strict=True):
            target.copy_(tensor)

    push_seconds, copy_seconds = _second_run_seconds(push), _second_run_seconds(copy)
    return {
        "gigabytes": gigabytes,
        "push_s_per_gb": push_seconds / gigabytes,
        "memcpy_s_per_gb": copy_seconds / gigabytes,
    }


def _second_run_seconds(run) -> float:
    """Wall time of the second of two runs (the first pays for first-touch page faults and cold caches)."""
    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    args = _parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        runs = {engines: generation_run(args, engines, Path(scratch)) for engines in (1, 2)}
    same = runs[1]["samples"] == runs[2]["samples"]
    rates = {engines: run["tokens"] / run["seconds"] for engines, run in runs.items()}
    sync = weight_sync(args)
    rows = [(f"{engines} engine{'s' * (engines > 1)}", run["tokens"], f"{run['seconds']:.1f}", f"{rates[engines]:.1f}")
            for engines, run in runs.items()]  # fmt: skip
    table = markdown_table(("rollout", "generated tokens", "seconds", "tokens/s"), rows, align="lrrr")
    table += ["", *markdown_table(("weight sync", "GB", "s per GB", "vs memcpy"), [
        ("HFEngine.update_weights, 512 MiB buckets", f"{sync['gigabytes']:.3f}", f"{sync['push_s_per_gb']:.3f}",
         f"{sync['push_s_per_gb'] / sync['memcpy_s_per_gb']:.2f}x"),
        ("torch copy_ of the same bytes", f"{sync['gigabytes']:.3f}", f"{sync['memcpy_s_per_gb']:.3f}", "1.00x"),
    ], align="lrrr")]  # fmt: skip
    notes = [
        f"{args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} tokens (ignore_eos), one thread",
        f"per engine process; the same seeded samples with 1 and 2 engines: {same}.",
    ]
    summary = {"tokens_per_s_1": round(rates[1], 1), "tokens_per_s_2": round(rates[2], 1),
               "speedup_2_engines": round(rates[2] / rates[1], 2), "same_samples": same,
               "sync_s_per_gb": round(sync["push_s_per_gb"], 3),
               "sync_vs_memcpy": round(sync["push_s_per_gb"] / sync["memcpy_s_per_gb"], 2)}  # fmt: skip
    write_report("rollout_scaling", "cpu", title="Rollout scaling: engines and weight sync",
                 machine=machine_lines("cpu"), table=table, notes=notes, summary=summary)  # fmt: skip


if __name__ == "__main__":
    main()

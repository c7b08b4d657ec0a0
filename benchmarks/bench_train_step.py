"""Benchmark the Megatron train step: tokens/s and peak memory (MFU on GPU), with an HF eager peer side by side.

Compares, in one run and on the same random Qwen2-style checkpoint and batch:
  megatron step (1 mb)   MegatronPolicy.train: Guide loss, fused LM-head logprobs, DDP + distributed Adam,
                         the whole batch in one micro-batch
  megatron step (4 mb)   the same step with the batch cut into four micro-batches (gradient accumulation)
  megatron logprobs      forward-only old logprobs (MegatronPolicy.compute_logprobs)
  hf eager step (peer)   transformers model, full-logits log_softmax, the same clipped surrogate, torch AdamW

Tokens are prompt + response tokens of the batch. Old logprobs are computed once up front, so a "step" is one
forward, backward and optimizer step. Peak memory is the process's peak RSS on CPU (includes everything loaded so
far, so it only grows down the table) and torch.cuda.max_memory_allocated per provider on GPU. MFU on GPU counts
6 * params * tokens plus causal attention FLOPs against the H100's dense bf16 peak.

Usage: python benchmarks/bench_train_step.py [--hidden 256 --layers 4 --seqs 16 --response-tokens 96]
Prints a table, writes it to benchmarks/results/train_step_<device>_<yyyymmdd>.md, and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import megatron.core
import torch
import transformers
from report import machine_lines, markdown_table, write_report

from guide_mega.config import AlgorithmConfig, GuideConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from guide_mega.training.micro_batches import sequence_lengths
from guide_mega.types import TrainBatch

H100_BF16_DENSE_FLOPS = 989e12
VOCAB = 4099  # not a multiple of 128: the padded-vocabulary path is part of the measurement
CLIP = 0.2


def save_checkpoint(directory: Path, *, hidden: int, layers: int) -> None:
    """A random Qwen2-style checkpoint (GQA, qkv bias, untied) of the requested size."""
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def make_batch(*, num_seqs: int, prompt_tokens: int, response_tokens: int) -> tuple[TrainBatch, torch.Tensor]:
    """num_seqs sequences (groups of 4) with lengths spread around the given means, a quarter guided; and random
    advantages [T]."""
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, VOCAB, (prompt_tokens + seq % 5,), generator=generator).tolist() for seq in range(num_seqs)
    ]
    lengths_S = torch.tensor([response_tokens // 2 + (seq * 37) % response_tokens for seq in range(num_seqs)])
    cu_seqlens_S1 = torch.cat([torch.zeros(1, dtype=torch.long), lengths_S.cumsum(0)])
    is_guided_S = torch.arange(num_seqs) % 4 == 0
    advantages_T = torch.randn(num_seqs, generator=generator).repeat_interleave(lengths_S)
    batch = TrainBatch(
        train_prompt_ids=prompts,
        sampled_prompt_ids=[
            prompt + [7, 8, 9] if guided else prompt
            for prompt, guided in zip(prompts, is_guided_S.tolist(), strict=True)
        ],
        response_ids_T=torch.randint(0, VOCAB, (int(cu_seqlens_S1[-1]),), generator=generator),
        cu_seqlens_S1=cu_seqlens_S1,
        is_guided_S=is_guided_S,
        rewards_S=torch.zeros(num_seqs),
        group_ids_S=torch.arange(num_seqs) // 4,
    )
    return batch, advantages_T


def num_tokens(batch: TrainBatch) -> int:
    return sum(len(prompt) for prompt in batch.train_prompt_ids) + batch.response_ids_T.numel()


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_provider(run, *, device: str, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory MiB) of `run` after one warm-up call."""
    run()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_memory_mib(device)


def megatron_policy(checkpoint: Path, *, micro_batch_tokens: int, dtype: str):
    from guide_mega.training.policy import MegatronPolicy

    return MegatronPolicy(
        model=ModelConfig(path=str(checkpoint), dtype=dtype),
        parallel=ParallelConfig(),
        algorithm=AlgorithmConfig(guide=GuideConfig(enabled=True)),
        optimizer=OptimizerConfig(lr=1e-6),
        train=TrainConfig(micro_batch_tokens=micro_batch_tokens),
        total_optimizer_steps=1000,
    )


def hf_eager_step(checkpoint: Path, batch: TrainBatch, advantages_T: torch.Tensor, *, device: str, dtype):
    """A plain transformers train step: right-padded rows, full logits, clipped surrogate, AdamW."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows = [prompt + batch.response_ids_T[batch.cu_seqlens_S1[s] : batch.cu_seqlens_S1[s + 1]].tolist()
            for s, prompt in enumerate(batch.train_prompt_ids)]  # fmt: skip
    width = max(len(row) for row in rows)
    input_ids_BS = torch.zeros(len(rows), width, dtype=torch.long)
    targets_BS = torch.full((len(rows), width), -100, dtype=torch.long)
    advantages_BS = torch.zeros(len(rows), width)
    for s, (row, prompt) in enumerate(zip(rows, batch.train_prompt_ids, strict=True)):
        input_ids_BS[s, : len(row)] = torch.tensor(row)
        response = slice(len(prompt) - 1, len(row) - 1)
        targets_BS[s, response] = torch.tensor(row[len(prompt) :])
        advantages_BS[s, response] = advantages_T[batch.cu_seqlens_S1[s] : batch.cu_seqlens_S1[s + 1]]
    input_ids_BS, targets_BS, advantages_BS = (t.to(device) for t in (input_ids_BS, targets_BS, advantages_BS))
    mask_BS = targets_BS >= 0

    def step():
        log_probs_BSV = torch.log_softmax(model(input_ids_BS).logits.float(), dim=-1)
        logprobs_BS = log_probs_BSV.gather(-1, targets_BS.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ratio_BS = torch.exp(logprobs_BS - logprobs_BS.detach())
        loss_BS = torch.maximum(-advantages_BS * ratio_BS, -advantages_BS * ratio_BS.clamp(1 - CLIP, 1 + CLIP))
        loss = (loss_BS * mask_BS).sum() / mask_BS.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def model_flops_per_token(policy) -> float:
    """Training FLOPs per token: 6 x parameters (matmuls) on this rank's stage."""
    return 6.0 * sum(param.numel() for param in policy.module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    batch, advantages_T = make_batch(
        num_seqs=args.seqs, prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens
    )
    tokens = num_tokens(batch)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "model"
        save_checkpoint(checkpoint, hidden=args.hidden, layers=args.layers)
        whole = megatron_policy(checkpoint, micro_batch_tokens=10**9, dtype=dtype_name)
        old_logprobs_T = whole.compute_old_logprobs(batch)
        inputs = {"old_logprobs_T": old_logprobs_T, "advantages_T": advantages_T}
        params = sum(param.numel() for param in whole.module.parameters())
        flops_per_token = model_flops_per_token(whole)
        # Padded micro-batches cost rows x longest row: a quarter of the rows per micro-batch gives about four.
        budget = max(sequence_lengths(batch, "train")) * -(-args.seqs // 4)
        split = megatron_policy(checkpoint, micro_batch_tokens=budget, dtype=dtype_name)
        num_micro_batches = len(split.runner.micro_batches(batch, list(range(batch.num_seqs)), "train"))
        providers = [
            ("megatron step (1 mb)", lambda: whole.train(batch, **inputs)),
            (f"megatron step ({num_micro_batches} mb)", lambda: split.train(batch, **inputs)),
            ("megatron logprobs", lambda: whole.compute_logprobs(batch, context="sampled")),
            (
                "hf eager step (peer)",
                hf_eager_step(checkpoint, batch, advantages_T, device=args.device, dtype=getattr(torch, dtype_name)),
            ),
        ]
        for name, run in providers:
            seconds, memory = time_provider(run, device=args.device, repeats=args.repeats)
            rows.append((name, seconds, tokens / seconds, memory))
    report(rows, args, tokens=tokens, params=params, flops_per_token=flops_per_token)


def report(rows, args, *, tokens: int, params: int, flops_per_token: float) -> None:
    """Write and print the table (MFU on GPU), then the JSON line."""
    on_gpu = args.device == "cuda"
    header = ("provider", "step ms", "tokens/s", "peak MiB") + (("MFU",) if on_gpu else ())
    cells = []
    for name, seconds, tokens_per_s, memory in rows:
        mfu = [f"{100 * flops_per_token * tokens_per_s / H100_BF16_DENSE_FLOPS:.1f}%"] if on_gpu else []
        cells.append([name, f"{seconds * 1e3:.1f}", f"{tokens_per_s:,.0f}", f"{memory:,.0f}", *mfu])
    ours, peer = rows[0], rows[-1]
    summary = {
        "tokens_per_s": round(ours[2], 1),
        "peak_mem_mib": round(ours[3], 1),
        "speedup_vs_hf_eager": round(ours[2] / peer[2], 3),
    }
    if on_gpu:
        summary["mfu"] = round(flops_per_token * ours[2] / H100_BF16_DENSE_FLOPS, 4)
    versions = (f"megatron-core {megatron.core.__version__}", f"transformers {transformers.__version__}")
    notes = [
        f"- model {params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}); "
        f"batch {args.seqs} seqs, {tokens} tokens"
    ]
    write_report(
        "train_step",
        args.device,
        title=f"Train step benchmark ({args.device})",
        machine=machine_lines(args.device, extra_versions=versions),
        table=markdown_table(header, cells, align="lrrrr"),
        notes=notes,
        summary=summary,
    )


if __name__ == "__main__":
    main()

"""Benchmark the Megatron train step: tokens/s, peak memory and the share of the GEMM ceiling (CPU) or MFU (GPU), with
an HF eager peer side by side.

Compares, in one run and on the same checkpoint (a random Qwen2-style one, or --model) and batch:
  megatron step (1 mb)   MegatronPolicy.train: Guide loss, fused LM-head logprobs, DDP + distributed Adam,
                         the whole batch in one micro-batch
  megatron step (4 mb)   the same step with the batch cut into four micro-batches (gradient accumulation)
  megatron logprobs      forward-only old logprobs (MegatronPolicy.compute_logprobs)
  hf eager step (peer)   transformers model, full-logits log_softmax, the same clipped surrogate, torch AdamW

Tokens are prompt + response tokens of the batch. Old logprobs are computed once up front, so a "step" is one
forward, backward and optimizer step. On CPU the ceiling is the machine's fp32 GEMM rate at this step's GEMM shapes
(every weight's forward and backward GEMMs over the batch's tokens), timed before each provider in the same run;
share = tokens/s x FLOPs per token (6 x GEMM parameters + causal attention) / that rate, and a torch.profiler
table splits one step into GEMM, other ops and Python. Peak memory is the process's peak RSS on CPU (includes
everything loaded so far, so it only grows down the table) and torch.cuda.max_memory_allocated per provider on
GPU. MFU on GPU counts the same FLOPs against the H100's dense bf16 peak.

Usage: python benchmarks/bench_train_step.py [--hidden 256 --layers 4 --seqs 16 --response-tokens 96]
       python benchmarks/bench_train_step.py --model embedded:smollm2-135m-instruct --seqs 8 --repeats 2
Prints a table, writes it to benchmarks/results/train_step_<device>_<yyyymmdd>.md, and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import megatron.core
import torch
import transformers
from ceiling import GEMM_OPS, gemm_rate, profile_split
from report import machine_lines, markdown_table, write_report

from guide_mega.config import AlgorithmConfig, GuideConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from guide_mega.data.embedded_model import resolve_model_path
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


def make_batch(
    *, num_seqs: int, prompt_tokens: int, response_tokens: int, vocab: int = VOCAB
) -> tuple[TrainBatch, torch.Tensor]:
    """num_seqs sequences (groups of 4) with lengths spread around the given means, a quarter guided; and random
    advantages [T]."""
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, vocab, (prompt_tokens + seq % 5,), generator=generator).tolist() for seq in range(num_seqs)
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
        response_ids_T=torch.randint(0, vocab, (int(cu_seqlens_S1[-1]),), generator=generator),
        cu_seqlens_S1=cu_seqlens_S1,
        is_guided_S=is_guided_S,
        rewards_S=torch.zeros(num_seqs),
        group_ids_S=torch.arange(num_seqs) // 4,
        hint_level_S=torch.where(is_guided_S, 0, -1),
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


def gemm_weights(policy) -> list[torch.Tensor]:
    """The weights that enter a GEMM per token: every matrix but the input embedding, which is a lookup (unless
    the output layer shares it)."""
    named = dict(policy.module.named_parameters())
    tied = not any("output_layer" in name for name in named)
    return [p for name, p in named.items() if p.dim() == 2 and (tied or "word_embeddings" not in name)]


def model_flops_per_token(policy, batch: TrainBatch) -> float:
    """Training FLOPs per token: 6 x GEMM parameters, plus causal attention (QK^T and AV, forward and backward)
    over the mean context of the batch's sequences."""
    config = policy.module.config
    lengths = sequence_lengths(batch, "train")
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    attention = 3 * 4 * config.num_layers * config.kv_channels * config.num_attention_heads * mean_context
    return 6.0 * sum(weight.numel() for weight in gemm_weights(policy)) + attention


def training_shapes(policy, tokens: int) -> dict[tuple[int, int, int], int]:
    """The GEMMs (m, k, n) of a step over `tokens` tokens, with how often each occurs: per weight [n, k] the forward
    (tokens, k, n) and the two backward ones (tokens, n, k) and (n, tokens, k), all timed in nn.Linear's layout (an
    approximation for the backward ones)."""
    counts: dict[tuple[int, int, int], int] = {}
    for weight in gemm_weights(policy):
        n, k = weight.shape
        for shape in ((tokens, k, n), (tokens, n, k), (n, tokens, k)):
            counts[shape] = counts.get(shape, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="HF directory or embedded:<name> (default: a random Qwen2)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    vocab = VOCAB if args.model is None else transformers.AutoConfig.from_pretrained(checkpoint_of(args)).vocab_size
    batch, advantages_T = make_batch(
        num_seqs=args.seqs, prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens, vocab=vocab
    )
    tokens = num_tokens(batch)
    rows, rates = [], []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = checkpoint_of(args)
        if args.model is None:
            checkpoint = Path(scratch) / "model"
            save_checkpoint(checkpoint, hidden=args.hidden, layers=args.layers)
        whole = megatron_policy(checkpoint, micro_batch_tokens=10**9, dtype=dtype_name)
        old_logprobs_T = whole.compute_old_logprobs(batch)
        inputs = {"old_logprobs_T": old_logprobs_T, "advantages_T": advantages_T}
        params = sum(param.numel() for param in whole.module.parameters())
        flops_per_token = model_flops_per_token(whole, batch)
        shapes = training_shapes(whole, tokens)
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
            if args.device == "cpu":  # the ceiling, interleaved with the providers
                rates.append(gemm_rate(shapes))
            seconds, memory = time_provider(run, device=args.device, repeats=args.repeats)
            rows.append((name, seconds, tokens / seconds, memory))
        split_s = profile_split(lambda: whole.train(batch, **inputs), _category) if args.device == "cpu" else None
    ceiling = statistics.median(rates) if rates else H100_BF16_DENSE_FLOPS
    report(rows, args, tokens=tokens, params=params, flops_per_token=flops_per_token, ceiling=ceiling,
           profile=split_s, vocab=vocab)  # fmt: skip


def checkpoint_of(args) -> Path | None:
    return None if args.model is None else resolve_model_path(args.model)


def _category(event) -> str:
    # Megatron's local attention on CPU is baddbmm + softmax + bmm: its matmuls count as GEMM.
    return "GEMM" if event.name in GEMM_OPS else "other ops"


def report(rows, args, *, tokens: int, params: int, flops_per_token: float, ceiling: float, profile, vocab) -> None:
    """Write and print the table (share of the GEMM ceiling on CPU, MFU on GPU) and the profile, then the JSON
    line."""
    on_gpu = args.device == "cuda"
    header = ("provider", "step ms", "tokens/s", "peak MiB", "MFU" if on_gpu else "share of GEMM ceiling")
    cells = []
    for name, seconds, tokens_per_s, memory in rows:
        # A forward-only provider does a third of a training step's FLOPs per token.
        flops = flops_per_token / 3 if "logprobs" in name else flops_per_token
        share = f"{100 * flops * tokens_per_s / ceiling:.1f}%"
        cells.append([name, f"{seconds * 1e3:.1f}", f"{tokens_per_s:,.0f}", f"{memory:,.0f}", share])
    ours, peer = rows[0], rows[-1]
    summary = {
        "tokens_per_s": round(ours[2], 1),
        "peak_mem_mib": round(ours[3], 1),
        "speedup_vs_hf_eager": round(ours[2] / peer[2], 3),
        "mfu" if on_gpu else "ceiling_share": round(flops_per_token * ours[2] / ceiling, 4),
    }
    versions = (f"megatron-core {megatron.core.__version__}", f"transformers {transformers.__version__}")
    model = args.model or f"random Qwen2 (hidden {args.hidden}, {args.layers} layers)"
    notes = [
        f"- model {model}: {params / 1e6:.2f}M params, vocab {vocab}; batch {args.seqs} seqs, {tokens} tokens; "
        f"{flops_per_token / 1e9:.3f} GFLOP per token (6 x GEMM parameters + causal attention)",
    ]
    table = markdown_table(header, cells, align="lrrrr")
    if profile is not None:
        notes.append(
            f"- GEMM ceiling: {ceiling / 1e9:.1f} GFLOP/s (this step's GEMM shapes, fp32, each shape's fastest call; "
            f"median over the measurements before each provider) = {ceiling / flops_per_token:,.0f} training "
            f"tokens/s; load average at the end {os.getloadavg()[0]:.1f}"
        )
        wall = profile["wall"]
        table += ["", *markdown_table(("megatron step (1 mb), profiled", "s", "%"),
                                      [(key, f"{value:.2f}", f"{100 * value / wall:.0f}%")
                                       for key, value in profile.items()], align="lrr")]  # fmt: skip
    write_report(
        "train_step",
        args.device,
        title=f"Train step benchmark ({args.device})",
        machine=machine_lines(args.device, extra_versions=versions),
        table=table,
        notes=notes,
        summary=summary,
    )


if __name__ == "__main__":
    main()

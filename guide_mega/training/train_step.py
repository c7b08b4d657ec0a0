"""The Guide policy loss on micro-batches, and one optimizer step over a mini-batch.

Shape legend: T response tokens of the whole batch, N response tokens of one micro-batch, S sequences.

Normalisation: every micro-batch's loss is `aggregate_loss` with the mini-batch's global token and sequence
counts (over all micro-batches and data-parallel ranks). The schedule sums micro-batch losses without dividing
(`calculate_per_token_loss`) and data-parallel gradients are summed, not averaged, so the gradient equals that of
the loss over the whole mini-batch, whatever the micro-batch split and the data-parallel size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from guide_mega.algorithms.losses import (
    PolicyLossOptions,
    aggregate_loss,
    combine_token_losses,
    kl_penalty,
    policy_loss,
)
from guide_mega.config import AlgorithmConfig
from guide_mega.training.logprobs import micro_batch_logprobs
from guide_mega.training.micro_batches import MicroBatch


@dataclass(kw_only=True)
class StepTensors:
    """A mini-batch's sequences, the loss inputs for the whole batch [T], and the mini-batch's normalisers."""

    seqs: list[int]
    old_logprobs_T: torch.Tensor
    advantages_T: torch.Tensor
    is_guided_T: torch.Tensor
    ref_logprobs_T: torch.Tensor | None
    gamma: float
    """Shaping gamma for guided tokens, computed once per step (so that it is split-invariant)."""
    global_num_tokens: float
    global_num_seqs: float


def loss_options(algorithm: AlgorithmConfig) -> PolicyLossOptions:
    """The policy-loss knobs from the algorithm config."""
    guide = algorithm.guide
    return PolicyLossOptions(
        clip_low=algorithm.clip_low,
        clip_high=algorithm.clip_high,
        dual_clip=algorithm.dual_clip,
        off_policy=guide.off_policy,
        guided_clip_low=guide.clip_low,
        guided_clip_high=guide.clip_high,
        truncated_is_cap=guide.truncated_is_cap,
    )


def make_policy_loss_fn(
    weight_fn: Callable[[], torch.Tensor],
    step: StepTensors,
    algorithm: AlgorithmConfig,
    *,
    vocab_size: int,
    sequence_parallel: bool,
    temperature: float = 1.0,
) -> Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """loss_fn(hidden_SBH, micro_batch) -> (normalised loss, metrics) for `forward.run_schedule`."""
    options = loss_options(algorithm)

    def loss_fn(hidden_SBH: torch.Tensor, micro_batch: MicroBatch):
        token_logprobs = micro_batch_logprobs(
            hidden_SBH,
            weight_fn(),
            micro_batch,
            vocab_size=vocab_size,
            sequence_parallel=sequence_parallel,
            temperature=temperature,
            with_entropy=True,
        )
        logprobs_N, entropy_N = token_logprobs
        device = logprobs_N.device
        index_N = micro_batch.token_index_N
        mask_N = torch.ones_like(logprobs_N, dtype=torch.bool)
        pg_loss_N, metrics = policy_loss(
            logprobs_N,
            step.old_logprobs_T[index_N].to(device),
            step.advantages_T[index_N].to(device, torch.float32),
            mask_N,
            step.is_guided_T[index_N].to(device),
            options=options,
            gamma=step.gamma,
        )
        kl_N = None
        if step.ref_logprobs_T is not None:
            kl_N = kl_penalty(logprobs_N, step.ref_logprobs_T[index_N].to(device), estimator=algorithm.kl_estimator)
            metrics["actor/kl"] = kl_N.detach().mean()
        total_N = combine_token_losses(
            pg_loss_N, kl_T=kl_N, kl_coef=algorithm.kl_coef, entropy_T=entropy_N, entropy_coef=algorithm.entropy_coef
        )
        loss = aggregate_loss(
            total_N,
            mask_N,
            micro_batch.seq_ids_N,
            mode=algorithm.loss_aggregation,
            global_num_tokens=step.global_num_tokens,
            global_num_seqs=step.global_num_seqs,
            token_sum_scale=algorithm.token_sum_scale,
        )
        metrics["actor/entropy"] = entropy_N.detach().mean()
        metrics["actor/logprob_mean"] = logprobs_N.detach().mean()
        return loss, {"loss": loss.detach(), "num_tokens": torch.tensor(float(logprobs_N.numel())), **metrics}

    return loss_fn


def gradients_are_finite(model_chunks: list[torch.nn.Module], *, device: torch.device) -> bool:
    """Whether every gradient on every rank is finite (a collective over the whole world: call it on all ranks).

    One sum per gradient, added up across ranks with a single all-reduce (no host sync per tensor): NaN and Inf
    survive any sum, so the total is finite when every gradient is, unless a sum of finite gradients overflows
    fp32, which only an already diverged step reaches.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)  # Megatron DDP accumulates into main_grad
            grad = param.grad if grad is None else grad
            if grad is not None:
                total += grad.sum()
    if dist.is_initialized():
        dist.all_reduce(total)
    return bool(torch.isfinite(total))


# How each metric combines over micro-batches and data-parallel ranks: counts and the loss add up, extremes take
# max/min, and per-micro-batch means are weighted by the micro-batch's token count.
_SUMMED = ("loss", "critic/loss", "num_tokens", "actor/on_policy_tokens", "actor/off_policy_tokens")
_MAXED = ("actor/ratio_max",)
_MINNED = ("actor/ratio_min",)


def reduce_step_metrics(outputs: list[dict[str, torch.Tensor]], *, device: torch.device) -> dict[str, float]:
    """Combine loss_fn outputs of this rank's micro-batches and then over data-parallel ranks (last stage only)."""
    names = sorted({name for output in outputs for name in output})
    if parallel_state.get_data_parallel_world_size() > 1:
        # A rank may lack a metric (or have no micro-batch at all); agree on the names before reducing.
        gathered: list[list[str] | None] = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(gathered, names, group=parallel_state.get_data_parallel_group())
        names = sorted({name for rank_names in gathered for name in rank_names})
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    maxima = torch.full((len(names),), -torch.inf, dtype=torch.float64, device=device)
    for output in outputs:
        weight = float(output["num_tokens"])
        for index, name in enumerate(names):
            if name not in output:
                continue
            value = float(output[name])
            sums[index] += value if name in _SUMMED else value * weight
            maxima[index] = max(maxima[index], -value if name in _MINNED else value)
    if parallel_state.get_data_parallel_world_size() > 1:
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    total_tokens = max(float(sums[names.index("num_tokens")]), 1.0) if "num_tokens" in names else 1.0
    metrics = {}
    for index, name in enumerate(names):
        if name in _MAXED:
            metrics[name] = float(maxima[index])
        elif name in _MINNED:
            metrics[name] = -float(maxima[index])
        elif name in _SUMMED:
            metrics[name] = float(sums[index])
        else:
            metrics[name] = float(sums[index]) / total_tokens
    return metrics

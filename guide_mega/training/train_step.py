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

from guide_mega.algorithms.guide import hint_teacher_loss
from guide_mega.algorithms.losses import (
    PolicyLossOptions,
    aggregate_loss,
    combine_token_losses,
    importance_ratio,
    kl_penalty,
    policy_loss_metrics,
    shaping_gamma,
)
from guide_mega.config import AlgorithmConfig, GuideConfig
from guide_mega.kernels.policy_loss import policy_loss as fused_policy_loss
from guide_mega.training.logprobs import micro_batch_logprobs
from guide_mega.training.micro_batches import MicroBatch


@dataclass(frozen=True, kw_only=True)
class LossInputs:
    """What the policy loss of one mini-batch needs beyond the model: its sequences, the batch's per-token inputs
    [T], and the mini-batch's normalisers."""

    seqs: list[int]
    old_logprobs_T: torch.Tensor
    advantages_T: torch.Tensor
    is_guided_T: torch.Tensor
    ref_logprobs_T: torch.Tensor | None
    gamma: float | None
    """Shaping gamma of the whole step (algorithm.guide.gamma_scope=global), or None: each micro-batch takes the
    quantile of its own guided ratios at the current policy (gamma_scope=micro_batch, as the authors' code)."""
    global_num_tokens: float
    global_num_seqs: float
    teacher_logprobs_T: torch.Tensor | None = None
    """The hint-teacher's logprobs (algorithm.guide.teacher_coef > 0): the tokens of `is_student_T` under their
    group's hinted prompt, at the step's start; None when the term is off."""
    is_student_T: torch.Tensor | None = None
    """Bool [T]: the tokens the hint teacher teaches."""


def loss_options(algorithm: AlgorithmConfig) -> PolicyLossOptions:
    """The policy-loss knobs from the algorithm config."""
    guide = algorithm.guide
    return PolicyLossOptions(
        clip_low=algorithm.clip_low,
        clip_high=algorithm.clip_high,
        dual_clip=algorithm.dual_clip,
        off_policy=guide.off_policy,
        off_policy_clip_low=guide.off_policy_clip_low,
        off_policy_clip_high=guide.off_policy_clip_high,
        truncated_is_cap=guide.truncated_is_cap,
    )


def micro_batch_gamma(
    logprobs_N: torch.Tensor, old_logprobs_N: torch.Tensor, is_guided_N: torch.Tensor, *, guide: GuideConfig
) -> torch.Tensor:
    """The shaping gamma of one micro-batch: the quantile of its guided tokens' ratios at the current policy."""
    quantile = guide.gamma_quantile if guide.gamma == "quantile" else None
    ratio_N = importance_ratio(logprobs_N.detach(), old_logprobs_N)
    return shaping_gamma(ratio_N, is_guided_N, quantile=quantile, constant=guide.gamma_constant)


def make_policy_loss_fn(
    weight_fn: Callable[[], torch.Tensor],
    inputs: LossInputs,
    algorithm: AlgorithmConfig,
    *,
    vocab_size: int,
    sequence_parallel: bool,
    temperature: float = 1.0,
) -> Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """loss_fn(hidden_SBH, micro_batch) -> (normalised loss, metrics) for `forward.run_schedule`.

    The Guide surrogate is the fused kernel `guide_mega.kernels.policy_loss` (Triton on CUDA, its closed-form
    torch pass on CPU), whose reference is `algorithms.losses.policy_loss`; its metrics come from the same inputs.
    """
    options = loss_options(algorithm)

    def loss_fn(hidden_SBH: torch.Tensor, micro_batch: MicroBatch):
        logprobs_N, entropy_N = micro_batch_logprobs(
            hidden_SBH, weight_fn(), micro_batch, vocab_size=vocab_size, sequence_parallel=sequence_parallel,
            temperature=temperature, with_entropy=True,
        )  # fmt: skip
        device, index_N = logprobs_N.device, micro_batch.token_index_N
        old_N = inputs.old_logprobs_T[index_N].to(device, torch.float32)
        advantages_N = inputs.advantages_T[index_N].to(device, torch.float32)
        guided_N = inputs.is_guided_T[index_N].to(device)
        mask_N = torch.ones_like(logprobs_N, dtype=torch.bool)
        gamma = inputs.gamma
        if gamma is None:
            gamma = micro_batch_gamma(logprobs_N, old_N, guided_N, guide=algorithm.guide)
        pg_loss_N = fused_policy_loss(logprobs_N, old_N, advantages_N, mask_N, guided_N, options=options, gamma=gamma)
        metrics = policy_loss_metrics(logprobs_N, old_N, advantages_N, pg_loss_N, mask_N, guided_N, options=options)
        metrics["guide/shaping_gamma"] = torch.as_tensor(gamma, dtype=torch.float32)
        kl_N = None
        if inputs.ref_logprobs_T is not None:
            kl_N = kl_penalty(logprobs_N, inputs.ref_logprobs_T[index_N].to(device), estimator=algorithm.kl_estimator)
            metrics["actor/kl"] = kl_N.detach().mean()
        total_N = combine_token_losses(
            pg_loss_N, kl_T=kl_N, kl_coef=algorithm.kl_coef, entropy_T=entropy_N, entropy_coef=algorithm.entropy_coef
        )
        if inputs.teacher_logprobs_T is not None:
            teacher_N = inputs.teacher_logprobs_T[index_N].to(device, torch.float32)
            student_N = inputs.is_student_T[index_N].to(device)
            total_N = total_N + algorithm.guide.teacher_coef * hint_teacher_loss(logprobs_N, teacher_N) * student_N
            # Summed here, divided in the policy: the sampled-token estimate of KL(pi(.|q) || pi(.|q,h)).
            metrics["actor/teacher_kl_sum"] = ((logprobs_N.detach() - teacher_N) * student_N).sum()
            metrics["actor/teacher_tokens"] = student_N.sum().float()
        loss = aggregate_loss(
            total_N, mask_N, micro_batch.seq_ids_N, mode=algorithm.loss_aggregation,
            global_num_tokens=inputs.global_num_tokens, global_num_seqs=inputs.global_num_seqs,
            token_sum_scale=algorithm.token_sum_scale,
        )  # fmt: skip
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
_SUMMED = (
    "loss", "critic/loss", "num_tokens", "actor/on_policy_tokens", "actor/off_policy_tokens", "actor/teacher_kl_sum",
    "actor/teacher_tokens",
)  # fmt: skip
# guide/shaping_gamma is a per-micro-batch value under gamma_scope=micro_batch: its token-weighted mean is logged.
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

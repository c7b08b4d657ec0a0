"""Vocabulary-parallel log-softmax partials and their combination into per-token logprobs and entropies.

Shape legend: T tokens, V_local vocabulary entries held by one shard, R shards stacked on one device.

Every implementation (reference, chunked torch, Triton) reduces one vocabulary shard of the scaled logits
z = logits / temperature to four per-token fp32 partials:

    max_T          m   = max_v z_v                               (a shift; carries no gradient)
    sum_exp_T      s   = sum_v exp(z_v - m)
    target_logit_T x   = z_target if this shard owns the target id, else 0
    sum_exp_logit_T e  = sum_v exp(z_v - m) (z_v - m)            (only when the entropy is requested)

`combine_partials` merges the shards with two reductions over them (MAX of m, then one SUM of the stacked
rescaled [s, e, x]) and returns logprob = x - lse and entropy = lse - sum_v p_v z_v. It is pure: the shards are
either all on this device (one [T] set, or an [R, T] stack), or the caller passes `reduce_shards`, which performs
the reduction across devices. Under tensor parallelism that callable is the all-reduce over the TP group, and it
lives with the process groups in `guide_mega.training.vocab_parallel`; this package never imports
torch.distributed. The backward is local: under tensor parallelism every rank holds the same outputs and the same
upstream gradient, as with Megatron's vocab-parallel cross entropy, so no collective sends gradients back to the
shard-local partials.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

# Target ids below zero (the conventional ignore index is -100) mark rows whose logprob is defined as 0, whose
# entropy is defined as 0 and that send no gradient back: padding, prompt tokens, or fully masked rows.
IGNORE_INDEX = -100


class TokenLogprobs(NamedTuple):
    """Per-token outputs: fp32 logprobs [T] (<= 0) and, when requested, fp32 entropies [T] (>= 0)."""

    logprobs_T: torch.Tensor
    entropy_T: torch.Tensor | None


@dataclass(frozen=True)
class LogprobPartials:
    """One vocabulary shard's fp32 partials, each [T] (or [R, T] for R shards emulated on one device)."""

    max_T: torch.Tensor
    sum_exp_T: torch.Tensor
    target_logit_T: torch.Tensor
    sum_exp_logit_T: torch.Tensor | None = None

    @classmethod
    def from_outputs(cls, outputs, *, with_entropy: bool) -> LogprobPartials:
        """From an implementation's (max, sum_exp, target_logit, sum_exp_logit) outputs; the entropy partial is
        kept only when asked for (autograd functions always return all four)."""
        max_T, sum_exp_T, target_T, sum_exp_logit_T = outputs
        return cls(max_T, sum_exp_T, target_T, sum_exp_logit_T if with_entropy else None)


def dlogit_coefficients(
    grad_sum_exp_T: torch.Tensor | None, grad_target_T: torch.Tensor | None, grad_sum_exp_logit_T: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token fp32 coefficients (a, b, c) [T] of the partials' backward; a missing gradient counts as zero.

    With u_v = exp(z_v - m), the upstream gradients contracted with d(partials)/dz_v give
        dL/dz_v = u_v (a + b (z_v - m)) + c [v == target],   a = g_s + g_e,  b = g_e,  c = g_x
    and every implementation's backward evaluates this per logit. b is None when no entropy gradient flows.
    """
    present = [g for g in (grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T) if g is not None]
    zeros_T = torch.zeros_like(present[0], dtype=torch.float32)
    g_s = zeros_T if grad_sum_exp_T is None else grad_sum_exp_T.float()
    g_x = zeros_T if grad_target_T is None else grad_target_T.float()
    if grad_sum_exp_logit_T is None:
        return g_s.contiguous(), None, g_x.contiguous()
    g_e = grad_sum_exp_logit_T.float()
    return (g_s + g_e).contiguous(), g_e.contiguous(), g_x.contiguous()


def merge_stacked_partials(
    max_ST: torch.Tensor, sum_exp_ST: torch.Tensor, target_ST: torch.Tensor, sum_exp_logit_ST: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge S stacked [S, T] partials of disjoint vocabulary blocks into one set [T] (online log-sum-exp)."""
    max_T = max_ST.amax(dim=0)
    shift_ST = max_ST - max_T
    scale_ST = torch.exp(shift_ST)
    sum_exp_T = (scale_ST * sum_exp_ST).sum(dim=0)
    sum_exp_logit_T = None
    if sum_exp_logit_ST is not None:
        sum_exp_logit_T = (scale_ST * (sum_exp_logit_ST + shift_ST * sum_exp_ST)).sum(dim=0)
    return max_T, sum_exp_T, target_ST.sum(dim=0), sum_exp_logit_T


ReduceOp = Literal["max", "sum"]
ShardReduce = Callable[[torch.Tensor, ReduceOp], torch.Tensor]
"""reduce_shards(tensor, op): the elementwise MAX or SUM of this shard's `tensor` over every vocabulary shard
(same shape in and out, a new tensor; no gradient flows through it). An all-reduce over the tensor-parallel group
is one; `guide_mega.training.vocab_parallel` builds it."""


def _reduce_local(tensor: torch.Tensor, op: ReduceOp, *, stacked: bool) -> torch.Tensor:
    """The shards held on this device: reduce the leading shard dim of an [R, ...] stack; one shard is the total."""
    if not stacked:
        return tensor
    return tensor.amax(dim=0) if op == "max" else tensor.sum(dim=0)


class _CombinePartials(torch.autograd.Function):
    """Differentiable merge of vocabulary-shard partials into (logprobs_T, entropy_T)."""

    @staticmethod
    def forward(ctx, max_T, sum_exp_T, target_logit_T, sum_exp_logit_T, valid_T, reduce_shards):
        if reduce_shards is None:
            reduce_shards = functools.partial(_reduce_local, stacked=max_T.dim() == 2)
        global_max_T = reduce_shards(max_T, "max")
        scale_T = torch.exp(max_T - global_max_T)
        rescaled_T = scale_T * (sum_exp_logit_T + (max_T - global_max_T) * sum_exp_T)
        # One SUM reduction for the three sums; e is re-centred on the global max before summing.
        sums_3T = torch.stack([scale_T * sum_exp_T, rescaled_T, target_logit_T], dim=-2)
        sums_3T = reduce_shards(sums_3T, "sum")
        total_sum_exp_T, total_sum_exp_logit_T, total_target_T = sums_3T.unbind(-2)
        log_sum_exp_T = torch.log(total_sum_exp_T)
        mean_shifted_logit_T = total_sum_exp_logit_T / total_sum_exp_T
        zeros_T = torch.zeros_like(total_target_T)
        # x <= lse holds exactly; rounding can leave a positive residue of a few ulps, which must never escape.
        logprobs_T = torch.where(valid_T, (total_target_T - global_max_T - log_sum_exp_T).clamp(max=0.0), zeros_T)
        entropy_T = torch.where(valid_T, (log_sum_exp_T - mean_shifted_logit_T).clamp(min=0.0), zeros_T)
        weight_T = scale_T / total_sum_exp_T
        ctx.save_for_backward(weight_T, max_T - global_max_T, mean_shifted_logit_T, valid_T)
        return logprobs_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprobs_T, grad_entropy_T):
        weight_T, shift_T, mean_shifted_logit_T, valid_T = ctx.saved_tensors
        g_lp = torch.where(valid_T, grad_logprobs_T, 0.0)
        g_h = torch.where(valid_T, grad_entropy_T, 0.0)
        # logprob = x - M - log S, H = log S - E / S, with c_r = exp(m_r - M), S = sum_r c_r s_r and
        # E = sum_r c_r (e_r + (m_r - M) s_r); weight_T = c_r / S.
        grad_sum_exp_T = weight_T * (-g_lp + g_h * (1.0 + mean_shifted_logit_T - shift_T))
        grad_sum_exp_logit_T = -weight_T * g_h
        grad_target_T = g_lp.expand_as(weight_T).clone()
        return None, grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T, None, None


def combine_partials(
    partials: LogprobPartials,
    target_ids_T: torch.Tensor,
    *,
    reduce_shards: ShardReduce | None = None,
) -> TokenLogprobs:
    """Merge vocabulary-shard partials into fp32 logprobs [T] and (if partials carry it) entropies [T].

    Without `reduce_shards`, the partials are either one shard's [T] (the whole vocabulary) or [R, T] stacks of
    R shards, reduced on this device. With it, each caller passes its own shard's [T] partials and the two
    reductions (a MAX of [T], then a SUM of [3, T]) go through `reduce_shards`; every caller that reduces together
    returns the same result. target_ids_T are the global ids; negative ids are ignored rows (logprob 0,
    entropy 0, no gradient).
    """
    with_entropy = partials.sum_exp_logit_T is not None
    sum_exp_logit_T = partials.sum_exp_logit_T if with_entropy else torch.zeros_like(partials.sum_exp_T)
    valid_T = target_ids_T >= 0
    logprobs_T, entropy_T = _CombinePartials.apply(
        partials.max_T.detach(),
        partials.sum_exp_T,
        partials.target_logit_T,
        sum_exp_logit_T,
        valid_T,
        reduce_shards,
    )
    return TokenLogprobs(logprobs_T, entropy_T if with_entropy else None)

"""The policy loss and its derivative in one vectorised torch pass (the CPU runtime path, no autograd graph).

Shape legend: T tokens. The derivative is taken with respect to the current logprob and follows torch's
conventions, so that it matches autograd through `reference.py`: clamp passes the gradient on its closed interval
(a log-ratio of exactly +-20, a ratio exactly on a clip bound), and max(-A r, -A clip(r)) ties only inside the clip
range (or for A = 0), where both arguments have the derivative -A, so "unclipped >= clipped" selects -A.
"""

from __future__ import annotations

import torch

from .options import MAX_LOG_RATIO, PolicyLossOptionsLike, check_options


def _clipped_surrogate_with_grad(ratio_T, advantages_T, low: float, high: float):
    """max(-A r, -A clip(r, 1 - low, 1 + high)) and its derivative in r: -A where the unclipped term wins, else 0."""
    unclipped_T = -advantages_T * ratio_T
    clipped_T = -advantages_T * ratio_T.clamp(1.0 - low, 1.0 + high)
    unclipped_wins_T = unclipped_T >= clipped_T
    grad_T = torch.where(unclipped_wins_T, -advantages_T, torch.zeros_like(advantages_T))
    return torch.where(unclipped_wins_T, unclipped_T, clipped_T), grad_T


def _on_policy_with_grad(ratio_T, advantages_T, options: PolicyLossOptionsLike):
    """On-policy loss and its derivative in the log-ratio."""
    loss_T, grad_ratio_T = _clipped_surrogate_with_grad(ratio_T, advantages_T, options.clip_low, options.clip_high)
    if options.dual_clip is not None:
        cap_T = -advantages_T * options.dual_clip
        capped_T = (advantages_T < 0) & (loss_T > cap_T)
        loss_T = torch.where(capped_T, cap_T, loss_T)
        grad_ratio_T = torch.where(capped_T, torch.zeros_like(grad_ratio_T), grad_ratio_T)
    return loss_T, grad_ratio_T * ratio_T


def _guided_with_grad(ratio_T, advantages_T, gamma_T, options: PolicyLossOptionsLike):
    """Guided-token loss under options.off_policy and its derivative in the log-ratio."""
    if options.off_policy == "shaping":
        denominator_T = ratio_T + gamma_T
        grad_ratio_T = -advantages_T * gamma_T / denominator_T.square()
        return -advantages_T * ratio_T / denominator_T, grad_ratio_T * ratio_T
    if options.off_policy == "clip":
        loss_T, grad_ratio_T = _clipped_surrogate_with_grad(
            ratio_T, advantages_T, options.off_policy_clip_low, options.off_policy_clip_high
        )
        return loss_T, grad_ratio_T * ratio_T
    if options.off_policy == "truncated_is":
        loss_T = -advantages_T * ratio_T.clamp(max=options.truncated_is_cap)
        return loss_T, loss_T
    loss_T = -advantages_T * ratio_T
    return loss_T, loss_T


def policy_loss_with_grad_torch(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    is_guided_T: torch.Tensor,
    *,
    options: PolicyLossOptionsLike,
    gamma: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_T, dloss_dlogprobs_T), both [T] in fp32 (fp64 for fp64 logprobs); equations in `reference.py`."""
    check_options(options)
    dtype = torch.float64 if logprobs_T.dtype == torch.float64 else torch.float32
    logprobs_T, old_logprobs_T, advantages_T = (t.to(dtype) for t in (logprobs_T, old_logprobs_T, advantages_T))
    mask_T = loss_mask_T.bool()
    guided_T = is_guided_T.bool() & mask_T
    on_policy_T = ~is_guided_T.bool() & mask_T
    raw_log_ratio_T = logprobs_T - old_logprobs_T
    passes_T = (raw_log_ratio_T >= -MAX_LOG_RATIO) & (raw_log_ratio_T <= MAX_LOG_RATIO)
    ratio_T = torch.exp(raw_log_ratio_T.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    gamma_T = torch.as_tensor(gamma, dtype=dtype, device=logprobs_T.device)

    on_loss_T, on_grad_T = _on_policy_with_grad(ratio_T, advantages_T, options)
    off_loss_T, off_grad_T = _guided_with_grad(ratio_T, advantages_T, gamma_T, options)
    zeros_T = torch.zeros_like(on_loss_T)
    loss_T = torch.where(guided_T, off_loss_T, torch.where(on_policy_T, on_loss_T, zeros_T))
    grad_T = torch.where(guided_T, off_grad_T, torch.where(on_policy_T, on_grad_T, zeros_T))
    return loss_T, torch.where(passes_T, grad_T, zeros_T)

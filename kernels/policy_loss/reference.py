"""Eager specification of the per-token Guide policy loss (autograd gives its gradient), in fp32 or fp64.

Shape legend: T tokens. With lr = clamp(logprob - old_logprob, -20, 20), r = exp(lr), A the advantage:

  on-policy tokens (is_guided false):
      L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high));  L = -A c  where A < 0 and L > -A c  (dual_clip=c)
  guided tokens (is_guided true), by off_policy:
      shaping:       L = -A r / (r + gamma)                 (gamma a given constant)
      clip:          L = max(-A r, -A clip(r, 1 - off_policy_clip_low, 1 + off_policy_clip_high))
      truncated_is:  L = -A sg(min(r, cap)) exp(lr - sg(lr))   (value -A min(r, cap); gradient -A min(r, cap))
      none:          L = -A r
  masked tokens (loss_mask false): L = 0, no gradient.

This is the math of `guide_mega.algorithms.losses.policy_loss` for a given gamma; the tests hold both to it.
"""

from __future__ import annotations

import torch

from .options import MAX_LOG_RATIO, PolicyLossOptionsLike, check_options


def _clipped_surrogate(ratio_T, advantages_T, low: float, high: float) -> torch.Tensor:
    return torch.maximum(-advantages_T * ratio_T, -advantages_T * ratio_T.clamp(1.0 - low, 1.0 + high))


def _guided_loss(ratio_T, log_ratio_T, advantages_T, gamma_T, options: PolicyLossOptionsLike) -> torch.Tensor:
    if options.off_policy == "shaping":
        return -advantages_T * ratio_T / (ratio_T + gamma_T)
    if options.off_policy == "clip":
        return _clipped_surrogate(ratio_T, advantages_T, options.off_policy_clip_low, options.off_policy_clip_high)
    if options.off_policy == "truncated_is":
        weight_T = ratio_T.detach().clamp(max=options.truncated_is_cap)
        return -advantages_T * weight_T * torch.exp(log_ratio_T - log_ratio_T.detach())
    return -advantages_T * ratio_T


def policy_loss_reference(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    is_guided_T: torch.Tensor,
    *,
    options: PolicyLossOptionsLike,
    gamma: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Per-token loss [T] (fp32, or fp64 for fp64 logprobs), differentiable in logprobs_T."""
    check_options(options)
    dtype = torch.float64 if logprobs_T.dtype == torch.float64 else torch.float32
    logprobs_T, old_logprobs_T, advantages_T = (t.to(dtype) for t in (logprobs_T, old_logprobs_T, advantages_T))
    mask_T = loss_mask_T.bool()
    guided_T = is_guided_T.bool() & mask_T
    on_policy_T = ~is_guided_T.bool() & mask_T
    log_ratio_T = (logprobs_T - old_logprobs_T).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio_T = torch.exp(log_ratio_T)
    gamma_T = torch.as_tensor(gamma, dtype=dtype, device=logprobs_T.device).detach()

    on_loss_T = _clipped_surrogate(ratio_T, advantages_T, options.clip_low, options.clip_high)
    if options.dual_clip is not None:
        cap_T = -advantages_T * options.dual_clip
        on_loss_T = torch.where((advantages_T < 0) & (on_loss_T > cap_T), cap_T, on_loss_T)
    off_loss_T = _guided_loss(ratio_T, log_ratio_T, advantages_T, gamma_T, options)
    zeros_T = torch.zeros_like(on_loss_T)
    return torch.where(guided_T, off_loss_T, torch.where(on_policy_T, on_loss_T, zeros_T))

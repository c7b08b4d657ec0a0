"""Triton policy loss: one elementwise launch computes the per-token loss and d(loss)/d(logprob) together.

Shape legend: T tokens. The equations are those of `reference.py`; the derivative follows the conventions
spelled out in `closed_form.py` (closed clamp intervals, ties of max() only where both sides agree). All in
fp32; a 16k-token micro-batch moves ~0.3 MB, so the launch is latency-bound (target: well under 50 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import MAX_LOG_RATIO, OFF_POLICY_MODES, PolicyLossOptionsLike, check_options

_BLOCK = 1024


@triton.jit
def _clipped_surrogate(ratio, advantages, low, high):
    """max(-A r, -A clip(r, 1 - low, 1 + high)) and its derivative in r: -A where the unclipped term wins, else 0."""
    unclipped = -advantages * ratio
    clipped = -advantages * tl.minimum(tl.maximum(ratio, 1.0 - low), 1.0 + high)
    unclipped_wins = unclipped >= clipped
    return tl.where(unclipped_wins, unclipped, clipped), tl.where(unclipped_wins, -advantages, 0.0)


@triton.jit
def _policy_loss_kernel(
    logprobs_ptr,
    old_logprobs_ptr,
    advantages_ptr,
    loss_mask_ptr,
    is_guided_ptr,
    gamma_ptr,
    loss_ptr,
    grad_ptr,
    T,
    clip_low,
    clip_high,
    dual_clip,
    off_policy_clip_low,
    off_policy_clip_high,
    truncated_is_cap,
    max_log_ratio,
    OFF_POLICY: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """OFF_POLICY indexes OFF_POLICY_MODES: 0 shaping, 1 clip, 2 truncated_is, 3 none."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < T
    logprobs = tl.load(logprobs_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    old_logprobs = tl.load(old_logprobs_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    advantages = tl.load(advantages_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    masked_in = tl.load(loss_mask_ptr + offs, mask=in_bounds, other=0) != 0
    guided = masked_in & (tl.load(is_guided_ptr + offs, mask=in_bounds, other=0) != 0)

    raw_log_ratio = logprobs - old_logprobs
    passes = (raw_log_ratio >= -max_log_ratio) & (raw_log_ratio <= max_log_ratio)
    ratio = tl.exp(tl.minimum(tl.maximum(raw_log_ratio, -max_log_ratio), max_log_ratio))

    on_loss, on_grad = _clipped_surrogate(ratio, advantages, clip_low, clip_high)
    if HAS_DUAL_CLIP:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (on_loss > cap)
        on_loss = tl.where(capped, cap, on_loss)
        on_grad = tl.where(capped, 0.0, on_grad)
    on_grad = on_grad * ratio

    if OFF_POLICY == 0:
        gamma = tl.load(gamma_ptr).to(tl.float32)
        denominator = ratio + gamma
        off_loss = -advantages * ratio / denominator
        off_grad = -advantages * gamma / (denominator * denominator) * ratio
    elif OFF_POLICY == 1:
        off_loss, off_grad = _clipped_surrogate(ratio, advantages, off_policy_clip_low, off_policy_clip_high)
        off_grad = off_grad * ratio
    elif OFF_POLICY == 2:
        off_loss = -advantages * tl.minimum(ratio, truncated_is_cap)
        off_grad = off_loss
    else:
        off_loss = -advantages * ratio
        off_grad = off_loss

    loss = tl.where(guided, off_loss, tl.where(masked_in, on_loss, 0.0))
    grad = tl.where(guided, off_grad, tl.where(masked_in, on_grad, 0.0))
    grad = tl.where(passes, grad, 0.0)
    tl.store(loss_ptr + offs, loss, mask=in_bounds)
    tl.store(grad_ptr + offs, grad, mask=in_bounds)


def _as_flag(flag_T: torch.Tensor) -> torch.Tensor:
    """A byte view of a boolean tensor (free), or a != 0 test for integer and float masks."""
    flag_T = flag_T.contiguous()
    return flag_T.view(torch.uint8) if flag_T.dtype == torch.bool else (flag_T != 0).view(torch.uint8)


def policy_loss_with_grad_triton(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    is_guided_T: torch.Tensor,
    *,
    options: PolicyLossOptionsLike,
    gamma: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_T, dloss_dlogprobs_T), both fp32 [T], from one launch; gamma may stay on the device (no sync)."""
    check_options(options)
    num_tokens = logprobs_T.shape[0]
    device = logprobs_T.device
    gamma_1 = torch.as_tensor(gamma, dtype=torch.float32, device=device).reshape(1)
    loss_T = torch.empty(num_tokens, dtype=torch.float32, device=device)
    grad_T = torch.empty(num_tokens, dtype=torch.float32, device=device)
    _policy_loss_kernel[(triton.cdiv(num_tokens, _BLOCK),)](
        logprobs_T.contiguous(),
        old_logprobs_T.contiguous(),
        advantages_T.contiguous(),
        _as_flag(loss_mask_T),
        _as_flag(is_guided_T),
        gamma_1,
        loss_T,
        grad_T,
        num_tokens,
        options.clip_low,
        options.clip_high,
        0.0 if options.dual_clip is None else options.dual_clip,
        options.off_policy_clip_low,
        options.off_policy_clip_high,
        options.truncated_is_cap,
        MAX_LOG_RATIO,
        OFF_POLICY=OFF_POLICY_MODES.index(options.off_policy),
        HAS_DUAL_CLIP=options.dual_clip is not None,
        BLOCK=_BLOCK,
    )
    return loss_T, grad_T

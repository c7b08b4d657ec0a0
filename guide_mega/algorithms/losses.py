"""Policy and value losses: the token-level clipped surrogate with Guide's handling of guided tokens.

Shape legend: T tokens (a packed batch of responses, or a flattened padded one), S sequences.

For token t of sample i the ratio is r = exp(logprob - old_logprob), where `logprob` is always computed under the
hint-free prompt and `old_logprob` under the context the token was sampled in (the hinted prompt for guided
samples). On-policy tokens get the PPO clip (with clip-higher and dual-clip); guided tokens get the off-policy
treatment chosen by `off_policy`. Every function returns per-token losses; `aggregate_loss` reduces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# exp() of a log-ratio above ~88 overflows float32; trainer and behaviour logprobs that disagree that much are a
# bug upstream, and clamping to +-MAX_LOG_RATIO keeps one bad token from turning the whole loss into inf/NaN.
# The fused kernel defines the bound; this reference and the trainer use the same one.
from guide_mega.kernels.policy_loss import MAX_LOG_RATIO

OffPolicyMode = Literal["shaping", "clip", "truncated_is", "none"]
LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
KLEstimator = Literal["k1", "k2", "k3"]

OFF_POLICY_MODES: tuple[str, ...] = ("shaping", "clip", "truncated_is", "none")
LOSS_AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

# The authors' code floors the shaping gamma so that r / (r + gamma) stays well defined when guided ratios collapse.
_MIN_SHAPING_GAMMA = 1e-4


@dataclass(frozen=True, kw_only=True)
class PolicyLossOptions:
    """The knobs of `policy_loss`, mirroring `guide_mega.config.AlgorithmConfig` (the trainer builds it)."""

    clip_low: float = 0.2
    """On-policy tokens: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """On-policy tokens: the ratio is clipped above at 1 + clip_high (> clip_low is DAPO's clip-higher)."""
    dual_clip: float | None = None
    """For negative advantages, cap the loss at -A * dual_clip (dual-clip PPO); None disables it."""
    off_policy: OffPolicyMode = "shaping"
    """How guided tokens are trained: r/(r+gamma) shaping, a PPO clip, truncated IS, or the plain ratio."""
    off_policy_clip_low: float = 0.2
    """off_policy='clip': lower clip range for guided tokens."""
    off_policy_clip_high: float = 0.2
    """off_policy='clip': upper clip range for guided tokens."""
    truncated_is_cap: float = 1.0
    """off_policy='truncated_is': the importance weight is min(r, cap), treated as a constant."""


def masked_quantile(values_T: torch.Tensor, mask_T: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile q of `values_T` over positions where `mask_T` is true (linear interpolation, as torch.quantile).

    Exact for any number of values, in float64 (torch.quantile refuses more than 2^24 of them, fewer than the
    guided tokens of a large step). Returns a 0-d tensor of values_T's dtype; NaN when the mask is empty. Padding
    must be masked out: the authors' code takes the quantile over padded positions too, which makes gamma a
    statistic of the padding.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    selected = values_T[mask_T.bool()].to(torch.float64)
    if selected.numel() == 0:
        return torch.full((), float("nan"), dtype=values_T.dtype, device=values_T.device)
    position = q * (selected.numel() - 1)
    below = int(position)  # floor; kthvalue counts from 1
    low = torch.kthvalue(selected, below + 1).values
    high = torch.kthvalue(selected, min(below + 2, selected.numel())).values
    return (low + (high - low) * (position - below)).to(values_T.dtype)


def importance_ratio(logprobs_T: torch.Tensor, old_logprobs_T: torch.Tensor) -> torch.Tensor:
    """r = exp(logprob - old_logprob) [T], the log-ratio clamped to +-MAX_LOG_RATIO first."""
    return torch.exp((logprobs_T - old_logprobs_T).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def shaping_gamma(
    ratio_T: torch.Tensor, guided_mask_T: torch.Tensor, *, quantile: float | None = 0.9, constant: float = 1.0
) -> torch.Tensor:
    """The gamma of r/(r+gamma) shaping: a masked quantile of the guided tokens' ratios, or a constant.

    quantile=None selects the constant. The quantile is detached and floored at 1e-4; with no guided token in
    the batch the value is irrelevant and 1.0 is returned.
    """
    if quantile is None:
        return torch.tensor(constant, dtype=ratio_T.dtype, device=ratio_T.device)
    gamma = masked_quantile(ratio_T.detach(), guided_mask_T, quantile)
    if torch.isnan(gamma):
        return torch.ones((), dtype=ratio_T.dtype, device=ratio_T.device)
    return gamma.clamp(min=_MIN_SHAPING_GAMMA)


def _on_policy_loss(ratio_T: torch.Tensor, advantages_T: torch.Tensor, options: PolicyLossOptions):
    """PPO clipped surrogate with separate low/high ranges and dual-clip. Returns (loss_T, dual_clipped_T)."""
    unclipped_T = -advantages_T * ratio_T
    clipped_T = -advantages_T * ratio_T.clamp(1.0 - options.clip_low, 1.0 + options.clip_high)
    loss_T = torch.maximum(unclipped_T, clipped_T)
    dual_clipped_T = torch.zeros_like(loss_T, dtype=torch.bool)
    if options.dual_clip is not None:
        cap_T = -advantages_T * options.dual_clip
        dual_clipped_T = (advantages_T < 0) & (loss_T > cap_T)
        loss_T = torch.where(dual_clipped_T, cap_T, loss_T)
    return loss_T, dual_clipped_T


def _off_policy_loss(
    ratio_T: torch.Tensor, log_ratio_T: torch.Tensor, advantages_T: torch.Tensor, gamma, options: PolicyLossOptions
) -> torch.Tensor:
    """Loss of guided tokens under the chosen off-policy treatment."""
    if options.off_policy == "shaping":
        # d/dlogprob [r / (r + gamma)] = gamma r / (r + gamma)^2: bounded, so hint-exploiting tokens (r << 1)
        # and rare tokens (r >> 1) both get small gradients, with gamma detached.
        return -advantages_T * ratio_T / (ratio_T + gamma)
    if options.off_policy == "clip":
        clipped_T = ratio_T.clamp(1.0 - options.off_policy_clip_low, 1.0 + options.off_policy_clip_high)
        return torch.maximum(-advantages_T * ratio_T, -advantages_T * clipped_T)
    if options.off_policy == "truncated_is":
        # Value -A * w and gradient -A * w * dlogprob with w = min(r, cap) held constant.
        weight_T = ratio_T.detach().clamp(max=options.truncated_is_cap)
        return -advantages_T * weight_T * torch.exp(log_ratio_T - log_ratio_T.detach())
    if options.off_policy == "none":
        return -advantages_T * ratio_T
    raise ValueError(f"off_policy must be one of {OFF_POLICY_MODES}, got {options.off_policy!r}")


def policy_loss(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    is_guided_T: torch.Tensor,
    *,
    options: PolicyLossOptions,
    gamma: torch.Tensor | float | None = None,
    gamma_quantile: float | None = 0.9,
    gamma_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token Guide surrogate loss [T] (zero where loss_mask is false) and metrics.

    On-policy tokens (is_guided false):
        L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), then min(L, -A c) when A < 0 and dual_clip=c
    Guided tokens (is_guided true), by options.off_policy:
        shaping:      L = -A r / (r + gamma)            gamma detached (see `shaping_gamma`)
        clip:         L = max(-A r, -A clip(r, 1 - off_policy_clip_low, 1 + off_policy_clip_high))
        truncated_is: L = -A sg(min(r, cap)) exp(logprob - sg(logprob))
        none:         L = -A r
    `gamma` overrides the quantile/constant choice when given (the trainer passes a gamma computed over the whole
    step so that it does not depend on the micro-batch split).
    """
    mask_T = loss_mask_T.bool()
    guided_T = is_guided_T.bool() & mask_T
    on_policy_T = ~is_guided_T.bool() & mask_T
    log_ratio_T = (logprobs_T - old_logprobs_T).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio_T = torch.exp(log_ratio_T)
    if gamma is None:
        gamma = shaping_gamma(ratio_T, guided_T, quantile=gamma_quantile, constant=gamma_constant)
    gamma = torch.as_tensor(gamma, dtype=ratio_T.dtype, device=ratio_T.device).detach()

    on_loss_T, _ = _on_policy_loss(ratio_T, advantages_T, options)
    off_loss_T = _off_policy_loss(ratio_T, log_ratio_T, advantages_T, gamma, options)
    loss_T = torch.where(guided_T, off_loss_T, torch.where(on_policy_T, on_loss_T, torch.zeros_like(on_loss_T)))
    metrics = policy_loss_metrics(
        logprobs_T, old_logprobs_T, advantages_T, loss_T, loss_mask_T, is_guided_T, options=options
    )
    metrics["guide/shaping_gamma"] = gamma.float()
    return loss_T, metrics


def _masked_mean(values_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    count = mask_T.sum()
    return torch.where(count > 0, (values_T * mask_T).sum() / count.clamp(min=1), torch.zeros_like(count)).float()


def policy_loss_metrics(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    loss_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    is_guided_T: torch.Tensor,
    *,
    options: PolicyLossOptions,
) -> dict[str, torch.Tensor]:
    """Detached statistics of one evaluation of the policy loss (from `policy_loss` or the fused kernel): clip
    fractions, on/off-policy losses and ratios, token counts, ratio extremes."""
    mask_T = loss_mask_T.bool()
    guided_T, on_policy_T = is_guided_T.bool() & mask_T, ~is_guided_T.bool() & mask_T
    ratio_T, loss_T = importance_ratio(logprobs_T.detach(), old_logprobs_T), loss_T.detach()
    _, dual_clipped_T = _on_policy_loss(ratio_T, advantages_T, options)
    below_T = (ratio_T < 1.0 - options.clip_low) & (advantages_T < 0)
    above_T = (ratio_T > 1.0 + options.clip_high) & (advantages_T > 0)
    metrics = {
        "actor/clip_frac_low": _masked_mean(below_T.float(), on_policy_T),
        "actor/clip_frac_high": _masked_mean(above_T.float(), on_policy_T),
        "actor/dual_clip_frac": _masked_mean(dual_clipped_T.float(), on_policy_T),
        "actor/on_policy_loss": _masked_mean(loss_T, on_policy_T),
        "actor/off_policy_loss": _masked_mean(loss_T, guided_T),
        "actor/on_policy_ratio_mean": _masked_mean(ratio_T, on_policy_T),
        "actor/off_policy_ratio_mean": _masked_mean(ratio_T, guided_T),
        "actor/on_policy_tokens": on_policy_T.sum().float(),
        "actor/off_policy_tokens": guided_T.sum().float(),
    }
    if mask_T.any():
        metrics["actor/ratio_max"] = ratio_T[mask_T].max().float()
        metrics["actor/ratio_min"] = ratio_T[mask_T].min().float()
    return metrics


def kl_penalty(logprobs_T: torch.Tensor, ref_logprobs_T: torch.Tensor, *, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta. With d = logprob - ref_logprob:

    k1 = d;   k2 = d^2 / 2;   k3 = exp(-d) - 1 + d   (unbiased and non-negative; Schulman's estimator)
    """
    log_ratio_T = (logprobs_T - ref_logprobs_T).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return log_ratio_T
    if estimator == "k2":
        return 0.5 * log_ratio_T.square()
    if estimator == "k3":
        return torch.exp(-log_ratio_T) - 1.0 + log_ratio_T
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def value_loss(
    values_T: torch.Tensor, old_values_T: torch.Tensor, returns_T: torch.Tensor, *, clip: float | None = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss [T] for the PPO critic and a per-token clipped flag [T]:

    L = 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); clip=None gives 0.5 (V - R)^2.
    """
    unclipped_T = (values_T - returns_T).square()
    if clip is None:
        return 0.5 * unclipped_T, torch.zeros_like(unclipped_T, dtype=torch.bool)
    clipped_values_T = old_values_T + (values_T - old_values_T).clamp(-clip, clip)
    clipped_T = (clipped_values_T - returns_T).square()
    return 0.5 * torch.maximum(unclipped_T, clipped_T), clipped_T > unclipped_T


def aggregate_loss(
    loss_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    seq_ids_T: torch.Tensor,
    *,
    mode: LossAggregation,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    token_sum_scale: float = 1.0,
) -> torch.Tensor:
    """Reduce per-token losses to a scalar.

      token_mean:          sum_t L_t / N_tok
      seq_mean_token_mean: sum_s (sum_{t in s} L_t / n_s) / N_seq
      seq_mean_token_sum:  sum_s (sum_{t in s} L_t) / (N_seq * token_sum_scale)   (Dr. GRPO: a constant length)
    N_tok and N_seq default to this batch's counts; pass the totals over every micro-batch and data-parallel rank
    so that summing the per-micro-batch results (and averaging gradients over DP) gives the full-batch loss
    whatever the split. seq_ids_T gives each token's sequence index (0..S-1) within this batch.
    """
    mask_T = loss_mask_T.to(loss_T.dtype)
    masked_T = loss_T * mask_T
    if mode == "token_mean":
        denom = mask_T.sum().clamp(min=1) if global_num_tokens is None else global_num_tokens
        return masked_T.sum() / denom
    num_seqs = int(seq_ids_T.max()) + 1 if seq_ids_T.numel() else 0
    seq_sum_S = torch.zeros(num_seqs, dtype=loss_T.dtype, device=loss_T.device).index_add(0, seq_ids_T, masked_T)
    seq_tokens_S = torch.zeros_like(seq_sum_S).index_add(0, seq_ids_T, mask_T)
    present_S = seq_tokens_S > 0
    denom = present_S.sum().clamp(min=1) if global_num_seqs is None else global_num_seqs
    if mode == "seq_mean_token_mean":
        return (seq_sum_S / seq_tokens_S.clamp(min=1)).sum() / denom
    if mode == "seq_mean_token_sum":
        return seq_sum_S.sum() / (denom * token_sum_scale)
    raise ValueError(f"mode must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def combine_token_losses(
    pg_loss_T: torch.Tensor,
    *,
    kl_T: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_T: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token total loss [T] = policy loss + kl_coef * KL - entropy_coef * entropy.

    Adding the terms per token (before `aggregate_loss`) keeps every term under the same aggregation mode.
    """
    total_T = pg_loss_T
    if kl_T is not None and kl_coef != 0.0:
        total_T = total_T + kl_coef * kl_T
    if entropy_T is not None and entropy_coef != 0.0:
        total_T = total_T - entropy_coef * entropy_T
    return total_T

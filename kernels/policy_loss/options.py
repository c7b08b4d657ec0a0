"""The option set the policy-loss kernels read, and the constants they share with the reference."""

from __future__ import annotations

from typing import Protocol

# Log-ratios are clamped to +-20 before exp(), as in guide_mega.algorithms.losses: the gradient passes where
# -20 <= logprob - old_logprob <= 20 (torch.clamp's inclusive convention) and is zero outside.
MAX_LOG_RATIO = 20.0
OFF_POLICY_MODES: tuple[str, ...] = ("shaping", "clip", "truncated_is", "none")


class PolicyLossOptionsLike(Protocol):
    """Structural type of `guide_mega.algorithms.losses.PolicyLossOptions` (kernels never import algorithms)."""

    clip_low: float
    clip_high: float
    dual_clip: float | None
    off_policy: str
    off_policy_clip_low: float
    off_policy_clip_high: float
    truncated_is_cap: float


def check_options(options: PolicyLossOptionsLike) -> None:
    """Reject an off-policy mode the kernels do not implement."""
    if options.off_policy not in OFF_POLICY_MODES:
        raise ValueError(f"off_policy must be one of {OFF_POLICY_MODES}, got {options.off_policy!r}")

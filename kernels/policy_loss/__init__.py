"""Fused per-token Guide policy loss (forward and d(loss)/d(logprob) in one pass)."""

from .dispatch import IMPLS, policy_loss, policy_loss_with_grad, resolve_impl
from .options import MAX_LOG_RATIO, OFF_POLICY_MODES, PolicyLossOptionsLike
from .reference import policy_loss_reference

__all__ = [
    "IMPLS",
    "MAX_LOG_RATIO",
    "OFF_POLICY_MODES",
    "PolicyLossOptionsLike",
    "policy_loss",
    "policy_loss_reference",
    "policy_loss_with_grad",
    "resolve_impl",
]

"""Public entry points for the fused Guide policy loss: pick an implementation, wrap it for autograd.

Shape legend: T tokens. impl="auto" runs the Triton kernel on CUDA tensors and the closed-form torch pass
elsewhere; "triton", "torch" and "reference" force one (Triton on CPU tensors needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import os
from typing import Literal

import torch

from .closed_form import policy_loss_with_grad_torch
from .options import PolicyLossOptionsLike
from .reference import policy_loss_reference

Impl = Literal["auto", "triton", "torch", "reference"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch", "reference")


def resolve_impl(impl: str, logprobs_T: torch.Tensor) -> str:
    """The concrete implementation ('triton', 'torch' or 'reference') that `impl` runs on this input."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if logprobs_T.is_cuda and logprobs_T.dtype != torch.float64 else "torch"
    if impl == "triton" and not logprobs_T.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    return impl


def _check_shapes(tensors: tuple[torch.Tensor, ...]) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"policy-loss inputs must all be [T], got shapes {[tuple(t.shape) for t in tensors]}")


def policy_loss_with_grad(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    is_guided_T: torch.Tensor,
    *,
    options: PolicyLossOptionsLike,
    gamma: torch.Tensor | float = 1.0,
    impl: Literal["auto", "triton", "torch"] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [T] and d(loss_t)/d(logprob_t) [T] in one pass, outside autograd (fp32; fp64 stays fp64).

    For callers that feed the derivative straight into the logprob backward. Equations: `reference.py`;
    `options` is any object with the fields of `guide_mega.algorithms.losses.PolicyLossOptions`; gamma is the
    shaping constant (a 0-d tensor may stay on the device).
    """
    tensors = (logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T)
    _check_shapes(tensors)
    resolved = resolve_impl(impl, logprobs_T)
    if resolved == "reference":
        raise ValueError("impl='reference' is autograd-only: call policy_loss(..., impl='reference')")
    if resolved == "triton":
        kernel = importlib.import_module(".kernel", __package__)
        return kernel.policy_loss_with_grad_triton(*tensors, options=options, gamma=gamma)
    return policy_loss_with_grad_torch(*tensors, options=options, gamma=gamma)


class _FusedPolicyLoss(torch.autograd.Function):
    """Forward computes loss and derivative together; backward scales the saved derivative by the upstream grad."""

    @staticmethod
    def forward(ctx, logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, options, gamma, impl):
        loss_T, grad_T = policy_loss_with_grad(
            logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, options=options, gamma=gamma, impl=impl
        )
        ctx.save_for_backward(grad_T)
        ctx.logprobs_dtype = logprobs_T.dtype
        return loss_T

    @staticmethod
    def backward(ctx, grad_loss_T):
        (grad_T,) = ctx.saved_tensors
        return (grad_loss_T * grad_T).to(ctx.logprobs_dtype), None, None, None, None, None, None, None


def policy_loss(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    loss_mask_T: torch.Tensor,
    is_guided_T: torch.Tensor,
    *,
    options: PolicyLossOptionsLike,
    gamma: torch.Tensor | float = 1.0,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-token Guide surrogate loss [T] (zero where loss_mask is false), differentiable in logprobs_T only.

    Equals `guide_mega.algorithms.losses.policy_loss(..., gamma=gamma)[0]` in value and gradient; old logprobs,
    advantages and gamma are treated as constants.
    """
    if resolve_impl(impl, logprobs_T) == "reference":
        tensors = (logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T)
        _check_shapes(tensors)
        return policy_loss_reference(*tensors, options=options, gamma=gamma)
    return _FusedPolicyLoss.apply(
        logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, options, gamma, impl
    )

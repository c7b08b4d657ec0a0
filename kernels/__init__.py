"""Kernels for the RL hot paths, installed as `guide_mega.kernels`.

token_logprobs: per-token logprob (+ entropy) of the sampled tokens fused with the LM head, vocabulary-parallel.
policy_loss:    the per-token Guide surrogate loss with its derivative in the same pass.
Each has an eager `reference.py` (the spec), a torch runtime path for CPU and a Triton kernel for CUDA; the
public functions choose with `impl=`. Importing this package does not import triton.
"""

from .policy_loss import PolicyLossOptionsLike, policy_loss, policy_loss_with_grad
from .token_logprobs import (
    IGNORE_INDEX,
    LogprobPartials,
    TokenLogprobs,
    combine_partials,
    logprob_partials,
    logprob_partials_from_logits,
    token_logprobs,
    token_logprobs_from_logits,
)

__all__ = [
    "IGNORE_INDEX",
    "LogprobPartials",
    "PolicyLossOptionsLike",
    "TokenLogprobs",
    "combine_partials",
    "logprob_partials",
    "logprob_partials_from_logits",
    "policy_loss",
    "policy_loss_with_grad",
    "token_logprobs",
    "token_logprobs_from_logits",
]

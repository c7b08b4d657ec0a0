"""Eager specification of per-token logprobs and entropies: materialises the logits, in fp32 (or fp64 if given).

Shape legend: T tokens, H hidden size, V vocabulary entries (V_local for one tensor-parallel shard).

With z = (hidden @ weight^T) / temperature, computed in fp32 from the input dtype:

    logprob_t = z_{t, y_t} - logsumexp_v z_{t, v}                      (0 where y_t < 0: ignored row)
    entropy_t = -sum_v p_{t, v} log p_{t, v},  p = softmax(z_t)        (0 where y_t < 0)

Tests use these in fp64 as ground truth; `impl="reference"` routes the public functions through
`logprob_partials_from_logits_reference`, so the reference also covers the vocabulary-parallel path.
`token_logprobs_naive` is the unfused baseline that tests and benchmarks compare against.
"""

from __future__ import annotations

import torch

from .partials import LogprobPartials, TokenLogprobs


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when the inputs already are (the ground truth of the tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logprobs_from_scaled_logits(logits_TV, target_ids_T, with_entropy: bool) -> TokenLogprobs:
    log_probs_TV = torch.log_softmax(logits_TV, dim=-1)
    valid_T = target_ids_T >= 0
    gathered_T = log_probs_TV.gather(1, target_ids_T.clamp(min=0).unsqueeze(1)).squeeze(1)
    logprobs_T = torch.where(valid_T, gathered_T, torch.zeros_like(gathered_T))
    if not with_entropy:
        return TokenLogprobs(logprobs_T, None)
    row_entropy_T = -(log_probs_TV.exp() * log_probs_TV).sum(dim=-1)
    return TokenLogprobs(logprobs_T, torch.where(valid_T, row_entropy_T, torch.zeros_like(row_entropy_T)))


def token_logprobs_reference(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """Logprobs [T] and optional entropies [T] over the whole vocabulary of weight_VH (differentiable)."""
    dtype = _compute_dtype(hidden_TH.dtype)
    logits_TV = (hidden_TH.to(dtype) @ weight_VH.to(dtype).T) / temperature
    return _logprobs_from_scaled_logits(logits_TV, target_ids_T, with_entropy)


def token_logprobs_naive(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """The unfused path of a typical trainer: logits [T, V] in the input dtype, then fp32 log_softmax and gather.

    Same conventions as `token_logprobs_reference`; it is the same-dtype baseline of the error-bound tests and
    the "naive" provider of the benchmarks (it holds [T, V] logits, their fp32 copy and the log-softmax).
    """
    logits_TV = (hidden_TH @ weight_VH.T).float() / temperature
    return _logprobs_from_scaled_logits(logits_TV, target_ids_T, with_entropy)


def logprob_partials_from_logits_reference(
    logits_TV: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
) -> LogprobPartials:
    """The partials (see `partials.py`) of one vocabulary shard [vocab_start, vocab_start + V_local), via autograd."""
    scaled_TV = logits_TV.to(_compute_dtype(logits_TV.dtype)) / temperature
    max_T = scaled_TV.max(dim=-1).values.detach()
    shifted_TV = scaled_TV - max_T.unsqueeze(1)
    exp_TV = shifted_TV.exp()
    local_ids_T = target_ids_T - vocab_start
    owned_T = (local_ids_T >= 0) & (local_ids_T < logits_TV.shape[1]) & (target_ids_T >= 0)
    gathered_T = scaled_TV.gather(1, local_ids_T.clamp(0, logits_TV.shape[1] - 1).unsqueeze(1)).squeeze(1)
    target_logit_T = torch.where(owned_T, gathered_T, torch.zeros_like(gathered_T))
    sum_exp_logit_T = (exp_TV * shifted_TV).sum(dim=-1) if with_entropy else None
    return LogprobPartials(max_T, exp_TV.sum(dim=-1), target_logit_T, sum_exp_logit_T)


def logprob_partials_reference(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
) -> LogprobPartials:
    """Partials of the shard held by weight_VH [V_local, H], from the materialised fp32 logits [T, V_local]."""
    dtype = _compute_dtype(hidden_TH.dtype)
    logits_TV = hidden_TH.to(dtype) @ weight_VH.to(dtype).T
    return logprob_partials_from_logits_reference(
        logits_TV, target_ids_T, temperature=temperature, vocab_start=vocab_start, with_entropy=with_entropy
    )

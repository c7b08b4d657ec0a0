"""Chunked pure-torch logprob partials: the CPU runtime path (and a portable fallback on any device).

Shape legend: T tokens, H hidden size, V vocabulary entries of this shard, Tc / Vc a token / vocabulary chunk.

The fused variant never holds more than one [Tc, Vc] block of fp32 logits (plus its exp): the forward merges
block partials with an online log-sum-exp and saves only hidden, weight, targets and the per-token max; the
backward recomputes each block's logits, forms dL/dz from `dlogit_coefficients` and accumulates
grad_hidden += dz @ W_block and grad_weight[block] += dz^T @ hidden_chunk in fp32.
"""

from __future__ import annotations

import torch

from .partials import LogprobPartials, dlogit_coefficients, merge_stacked_partials

DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 4096


def _block_partials(scaled_TV: torch.Tensor, local_ids_T: torch.Tensor, with_entropy: bool):
    """(max, sum_exp, target_logit, sum_exp_logit) of one block of scaled logits; overwrites scaled_TV."""
    num_cols = scaled_TV.shape[1]
    owned_T = (local_ids_T >= 0) & (local_ids_T < num_cols)
    gathered_T = scaled_TV.gather(1, local_ids_T.clamp(0, num_cols - 1).unsqueeze(1)).squeeze(1)
    target_T = torch.where(owned_T, gathered_T, torch.zeros_like(gathered_T))
    max_T = scaled_TV.amax(dim=1)
    shifted_TV = scaled_TV.sub_(max_T.unsqueeze(1))
    if not with_entropy:
        return max_T, shifted_TV.exp_().sum(dim=1), target_T, None
    exp_TV = shifted_TV.exp()
    return max_T, exp_TV.sum(dim=1), target_T, torch.einsum("tv,tv->t", exp_TV, shifted_TV)


def _block_dlogits_(scaled_TV, local_ids_T, max_T, coefs, inv_temperature: float):
    """dL/dlogits of one block, written over scaled_TV: u (a + b (z - m)) + c [v == target], times 1/temperature.

    coefs = (a, b, c) from `dlogit_coefficients`, rows matching scaled_TV; b is None when no entropy gradient flows.
    """
    coef_a_T, coef_b_T, coef_c_T = coefs
    shifted_TV = scaled_TV.sub_(max_T.unsqueeze(1))
    if coef_b_T is None:
        grad_TV = shifted_TV.exp_().mul_(coef_a_T.unsqueeze(1))
    else:
        exp_TV = shifted_TV.exp()
        grad_TV = shifted_TV.mul_(coef_b_T.unsqueeze(1)).add_(coef_a_T.unsqueeze(1)).mul_(exp_TV)
    num_cols = grad_TV.shape[1]
    owned_T = (local_ids_T >= 0) & (local_ids_T < num_cols)
    grad_TV.scatter_add_(1, local_ids_T.clamp(0, num_cols - 1).unsqueeze(1), (coef_c_T * owned_T).unsqueeze(1))
    return grad_TV.mul_(inv_temperature)


def _stack_blocks(blocks):
    """Stack per-block 4-tuples of [T] partials into one 4-tuple of [S, T] (None stays None)."""
    return tuple(None if block[0] is None else torch.stack(block) for block in zip(*blocks, strict=True))


def _slice_rows(tensors, rows: slice):
    return tuple(None if tensor is None else tensor[rows] for tensor in tensors)


class _LinearPartials(torch.autograd.Function):
    """hidden [T, H], weight [V, H] -> partials, chunked over tokens and vocabulary, logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, target_ids_T, temperature, vocab_start, with_entropy, chunks):
        token_chunk, vocab_chunk = chunks
        inv_temperature = 1.0 / temperature
        local_ids_T = torch.where(target_ids_T >= 0, target_ids_T - vocab_start, -1)
        outputs = []
        for t0 in range(0, hidden_TH.shape[0], token_chunk):
            hidden_cH = hidden_TH[t0 : t0 + token_chunk].float()
            blocks = []
            for v0 in range(0, weight_VH.shape[0], vocab_chunk):
                scaled_cV = (hidden_cH @ weight_VH[v0 : v0 + vocab_chunk].float().T).mul_(inv_temperature)
                blocks.append(_block_partials(scaled_cV, local_ids_T[t0 : t0 + token_chunk] - v0, with_entropy))
            outputs.append(merge_stacked_partials(*_stack_blocks(blocks)))
        max_T, sum_exp_T, target_T = (torch.cat([out[i] for out in outputs]) for i in range(3))
        sum_exp_logit_T = torch.cat([out[3] for out in outputs]) if with_entropy else torch.zeros_like(sum_exp_T)
        ctx.save_for_backward(hidden_TH, weight_VH, local_ids_T, max_T)
        ctx.inv_temperature, ctx.chunks = inv_temperature, chunks
        ctx.mark_non_differentiable(max_T)
        ctx.set_materialize_grads(False)
        return max_T, sum_exp_T, target_T, sum_exp_logit_T

    @staticmethod
    def backward(ctx, _grad_max_T, grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T):
        hidden_TH, weight_VH, local_ids_T, max_T = ctx.saved_tensors
        coefs = dlogit_coefficients(grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T)
        token_chunk, vocab_chunk = ctx.chunks
        grad_hidden_TH = torch.zeros_like(hidden_TH, dtype=torch.float32)
        grad_weight_VH = torch.zeros_like(weight_VH, dtype=torch.float32)
        for t0 in range(0, hidden_TH.shape[0], token_chunk):
            rows = slice(t0, t0 + token_chunk)
            hidden_cH = hidden_TH[rows].float()
            for v0 in range(0, weight_VH.shape[0], vocab_chunk):
                weight_cH = weight_VH[v0 : v0 + vocab_chunk].float()
                scaled_cV = (hidden_cH @ weight_cH.T).mul_(ctx.inv_temperature)
                grad_cV = _block_dlogits_(
                    scaled_cV, local_ids_T[rows] - v0, max_T[rows], _slice_rows(coefs, rows), ctx.inv_temperature
                )
                if ctx.needs_input_grad[0]:
                    grad_hidden_TH[rows].addmm_(grad_cV, weight_cH)
                if ctx.needs_input_grad[1]:
                    grad_weight_VH[v0 : v0 + vocab_chunk].addmm_(grad_cV.T, hidden_cH)
        return grad_hidden_TH.to(hidden_TH.dtype), grad_weight_VH.to(weight_VH.dtype), None, None, None, None, None


class _LogitsPartials(torch.autograd.Function):
    """logits [T, V] -> partials, chunked over tokens; the backward writes grad_logits [T, V] chunk by chunk."""

    @staticmethod
    def forward(ctx, logits_TV, target_ids_T, temperature, vocab_start, with_entropy, token_chunk):
        inv_temperature = 1.0 / temperature
        local_ids_T = torch.where(target_ids_T >= 0, target_ids_T - vocab_start, -1)
        outputs = [
            _block_partials(
                logits_TV[t0 : t0 + token_chunk].float() * inv_temperature,
                local_ids_T[t0 : t0 + token_chunk],
                with_entropy,
            )
            for t0 in range(0, logits_TV.shape[0], token_chunk)
        ]
        max_T, sum_exp_T, target_T = (torch.cat([out[i] for out in outputs]) for i in range(3))
        sum_exp_logit_T = torch.cat([out[3] for out in outputs]) if with_entropy else torch.zeros_like(sum_exp_T)
        ctx.save_for_backward(logits_TV, local_ids_T, max_T)
        ctx.inv_temperature, ctx.token_chunk = inv_temperature, token_chunk
        ctx.mark_non_differentiable(max_T)
        ctx.set_materialize_grads(False)
        return max_T, sum_exp_T, target_T, sum_exp_logit_T

    @staticmethod
    def backward(ctx, _grad_max_T, grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T):
        logits_TV, local_ids_T, max_T = ctx.saved_tensors
        coefs = dlogit_coefficients(grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T)
        grad_logits_TV = torch.empty_like(logits_TV)
        for t0 in range(0, logits_TV.shape[0], ctx.token_chunk):
            rows = slice(t0, t0 + ctx.token_chunk)
            scaled_cV = logits_TV[rows].float() * ctx.inv_temperature
            grad_logits_TV[rows] = _block_dlogits_(
                scaled_cV, local_ids_T[rows], max_T[rows], _slice_rows(coefs, rows), ctx.inv_temperature
            )
        return grad_logits_TV, None, None, None, None, None


def logprob_partials_chunked(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> LogprobPartials:
    """Partials of the shard weight_VH [V_local, H] for hidden_TH [T, H] without materialising [T, V_local]."""
    outputs = _LinearPartials.apply(
        hidden_TH, weight_VH, target_ids_T, temperature, vocab_start, with_entropy, (token_chunk, vocab_chunk)
    )
    return LogprobPartials.from_outputs(outputs, with_entropy=with_entropy)


def logprob_partials_from_logits_chunked(
    logits_TV: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
    token_chunk: int = 256,
) -> LogprobPartials:
    """Partials of precomputed logits [T, V_local], upcasting one [token_chunk, V_local] block at a time."""
    outputs = _LogitsPartials.apply(logits_TV, target_ids_T, temperature, vocab_start, with_entropy, token_chunk)
    return LogprobPartials.from_outputs(outputs, with_entropy=with_entropy)

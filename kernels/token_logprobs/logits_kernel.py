"""Triton logprob partials from precomputed logits [T, V]: one streaming pass forward, one elementwise backward.

Shape legend: T tokens, V vocabulary entries of this shard. The epilogues (`online_update`, `tile_dlogits`) are
those of the fused LM-head kernels in `kernel.py`, so both variants share their numerics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel import FIRST_MAX, INTERPRETED, local_target_ids, online_update, tile_dlogits
from .partials import LogprobPartials, dlogit_coefficients


def _logits_config(device: torch.device) -> dict:
    if INTERPRETED or device.type != "cuda":
        return {"BLOCK_T": 16, "BLOCK_V": 64}
    return {"BLOCK_T": 4, "BLOCK_V": 2048, "num_warps": 8}


@triton.jit
def _logits_partials_kernel(
    logits_ptr,
    local_ids_ptr,
    out_ptr,
    T,
    V,
    stride_lt,
    inv_temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """Partials of BLOCK_T rows of precomputed logits, streamed once in BLOCK_V tiles; out is [4, T]."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    local_ids = tl.load(local_ids_ptr + offs_t, mask=mask_t, other=-1)
    run_max = tl.full((BLOCK_T,), FIRST_MAX, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    run_logit = tl.zeros((BLOCK_T,), dtype=tl.float32)
    run_target = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = tl.load(
            logits_ptr + offs_t.to(tl.int64)[:, None] * stride_lt + offs_v[None, :],
            mask=mask_t[:, None] & mask_v[None, :],
            other=0.0,
        )
        run_max, run_sum, run_logit, run_target = online_update(
            run_max,
            run_sum,
            run_logit,
            run_target,
            logits.to(tl.float32) * inv_temperature,
            offs_v,
            mask_v,
            local_ids,
            WITH_ENTROPY,
        )
    tl.store(out_ptr + offs_t, run_max, mask=mask_t)
    tl.store(out_ptr + T + offs_t, run_sum, mask=mask_t)
    tl.store(out_ptr + 2 * T + offs_t, run_target, mask=mask_t)
    tl.store(out_ptr + 3 * T + offs_t, run_logit, mask=mask_t)


@triton.jit
def _logits_dlogits_kernel(
    logits_ptr,
    local_ids_ptr,
    max_ptr,
    coef_a_ptr,
    coef_b_ptr,
    coef_c_ptr,
    grad_ptr,
    T,
    V,
    stride_lt,
    stride_gt,
    inv_temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """dL/dlogits of one [BLOCK_T, BLOCK_V] tile of precomputed logits."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (offs_t < T)[:, None] & (offs_v < V)[None, :]
    logits = tl.load(logits_ptr + offs_t.to(tl.int64)[:, None] * stride_lt + offs_v[None, :], mask=mask, other=0.0)
    mask_t = offs_t < T
    row_max = tl.load(max_ptr + offs_t, mask=mask_t, other=0.0)
    coef_a = tl.load(coef_a_ptr + offs_t, mask=mask_t, other=0.0)
    coef_b = tl.load(coef_b_ptr + offs_t, mask=mask_t, other=0.0)
    coef_c = tl.load(coef_c_ptr + offs_t, mask=mask_t, other=0.0)
    local_ids = tl.load(local_ids_ptr + offs_t, mask=mask_t, other=-1)
    grad = tile_dlogits(
        logits.to(tl.float32) * inv_temperature,
        offs_v,
        local_ids,
        row_max,
        coef_a,
        coef_b,
        coef_c,
        inv_temperature,
        WITH_ENTROPY,
    )
    tl.store(
        grad_ptr + offs_t.to(tl.int64)[:, None] * stride_gt + offs_v[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=mask,
    )


class _LogitsPartials(torch.autograd.Function):
    """logits [T, V] -> partials in one streaming pass; the backward writes grad_logits [T, V]."""

    @staticmethod
    def forward(ctx, logits_TV, target_ids_T, temperature, vocab_start, with_entropy):
        logits_TV = logits_TV.contiguous()
        local_ids_T = local_target_ids(target_ids_T, vocab_start)
        num_tokens, vocab_size = logits_TV.shape
        config = _logits_config(logits_TV.device)
        out_4T = torch.zeros(4, num_tokens, dtype=torch.float32, device=logits_TV.device)
        _logits_partials_kernel[(triton.cdiv(num_tokens, config["BLOCK_T"]),)](
            logits_TV,
            local_ids_T,
            out_4T,
            num_tokens,
            vocab_size,
            logits_TV.stride(0),
            1.0 / temperature,
            WITH_ENTROPY=with_entropy,
            **config,
        )
        max_T, sum_exp_T, target_T, sum_exp_logit_T = out_4T.unbind(0)
        ctx.save_for_backward(logits_TV, local_ids_T, max_T)
        ctx.inv_temperature = 1.0 / temperature
        ctx.mark_non_differentiable(max_T)
        ctx.set_materialize_grads(False)
        return max_T, sum_exp_T, target_T, sum_exp_logit_T

    @staticmethod
    def backward(ctx, _grad_max_T, grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T):
        logits_TV, local_ids_T, max_T = ctx.saved_tensors
        coef_a_T, coef_b_T, coef_c_T = dlogit_coefficients(grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T)
        num_tokens, vocab_size = logits_TV.shape
        config = _logits_config(logits_TV.device)
        grad_logits_TV = torch.empty_like(logits_TV)
        grid = (triton.cdiv(num_tokens, config["BLOCK_T"]), triton.cdiv(vocab_size, config["BLOCK_V"]))
        _logits_dlogits_kernel[grid](
            logits_TV,
            local_ids_T,
            max_T,
            coef_a_T,
            coef_a_T if coef_b_T is None else coef_b_T,
            coef_c_T,
            grad_logits_TV,
            num_tokens,
            vocab_size,
            logits_TV.stride(0),
            grad_logits_TV.stride(0),
            ctx.inv_temperature,
            WITH_ENTROPY=coef_b_T is not None,
            **config,
        )
        return grad_logits_TV, None, None, None, None


def logprob_partials_from_logits_triton(
    logits_TV: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
) -> LogprobPartials:
    """Partials of precomputed logits [T, V_local], read once in a streaming online log-sum-exp."""
    outputs = _LogitsPartials.apply(logits_TV, target_ids_T, temperature, vocab_start, with_entropy)
    return LogprobPartials.from_outputs(outputs, with_entropy=with_entropy)

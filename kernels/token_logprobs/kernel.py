"""Triton logprob partials: the LM-head matmul fused with an online log-sum-exp, and the matching backward.

Shape legend: T tokens, H hidden size, V vocabulary entries of this shard, S vocabulary splits, Tc a token chunk.

Forward (`_linear_partials_kernel`): program (token block, vocabulary split) walks its split in BLOCK_V tiles,
computes each [BLOCK_T, BLOCK_V] logits tile with tl.dot over H and folds it into running (max, sum-exp,
sum-exp-logit, target logit) registers; logits never reach memory. The S split partials [4, S, T] are merged
in torch. Backward: per token chunk, `_linear_dlogits_kernel` recomputes the logits tiles and writes
dL/dlogits [Tc, V] (input dtype), then two cuBLAS matmuls give grad_hidden[chunk] and add into an fp32
grad_weight; 8 T H V FLOPs in all (2 forward, 2 recompute, 4 backward GEMMs).
`online_update` and `tile_dlogits` are shared with the precomputed-logits kernels of `logits_kernel.py`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .partials import LogprobPartials, dlogit_coefficients, merge_stacked_partials

# The CPU interpreter computes tl.dot through numpy, which has no bfloat16: operands are upcast there. A bf16
# product is exact in fp32, so the result equals the GPU's bf16 tensor-core dot with fp32 accumulation.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Initial running max: finite, so that the first rescale exp(m - m_new) * s is 0 * 0 rather than NaN
# (a constexpr, since compiled Triton code may only read constexpr globals).
FIRST_MAX = tl.constexpr(-1.0e30)
# The dlogits workspace of the backward holds at most this many tokens (K3 target: one chunk x V_local).
_MAX_BACKWARD_TOKENS = 2048
_BACKWARD_BUDGET_BYTES = 1 << 30


def _linear_config(hidden_TH: torch.Tensor) -> dict:
    """Tile sizes: H100-sized tiles on GPU (a shorter K step for fp32, whose tiles take twice the shared memory),
    small ones under the interpreter (test shapes are tiny)."""
    if INTERPRETED or not hidden_TH.is_cuda:
        return {"BLOCK_T": 32, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_T": 2, "vocab_per_split": 128}
    return {
        "BLOCK_T": 128,
        "BLOCK_V": 128,
        "BLOCK_H": 32 if hidden_TH.dtype == torch.float32 else 64,
        "GROUP_T": 8,
        "vocab_per_split": 1024,
        "num_warps": 8,
        "num_stages": 3,
    }


@triton.jit
def _grouped_tile(pid, num_row_blocks, num_col_blocks, GROUP: tl.constexpr):
    """Map a 1D program id to (row block, col block), GROUP row blocks at a time, so neighbours share L2 tiles."""
    programs_per_group = GROUP * num_col_blocks
    first_row = (pid // programs_per_group) * GROUP
    group_rows = tl.minimum(num_row_blocks - first_row, GROUP)
    row = first_row + (pid % programs_per_group) % group_rows
    col = (pid % programs_per_group) // group_rows
    return row, col


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    offs_t,
    offs_v,
    mask_t,
    mask_v,
    H,
    stride_ht,
    stride_wv,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_T, BLOCK_V] tile of hidden @ weight^T, accumulated over H in BLOCK_H steps."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        hidden = tl.load(
            hidden_ptr + offs_t.to(tl.int64)[:, None] * stride_ht + offs_h[None, :],
            mask=mask_t[:, None] & mask_h[None, :],
            other=0.0,
        )
        weight = tl.load(
            weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + offs_h[None, :],
            mask=mask_v[:, None] & mask_h[None, :],
            other=0.0,
        )
        if UPCAST:
            hidden = hidden.to(tl.float32)
            weight = weight.to(tl.float32)
        acc = tl.dot(hidden, tl.trans(weight), acc, input_precision=PRECISION)
    return acc


@triton.jit
def online_update(
    run_max, run_sum, run_logit, run_target, scaled, offs_v, mask_v, local_ids, WITH_ENTROPY: tl.constexpr
):
    """Fold one tile of scaled logits into the running per-row (max, sum-exp, sum-exp-logit, target) state."""
    valid = mask_v[None, :]
    hit = (offs_v[None, :] == local_ids[:, None]) & valid
    run_target += tl.sum(tl.where(hit, scaled, 0.0), axis=1)
    new_max = tl.maximum(run_max, tl.max(tl.where(valid, scaled, float("-inf")), axis=1))
    rescale = tl.exp(run_max - new_max)
    shifted = scaled - new_max[:, None]
    exp_tile = tl.where(valid, tl.exp(shifted), 0.0)
    if WITH_ENTROPY:
        tile_logit = tl.sum(tl.where(valid, exp_tile * shifted, 0.0), axis=1)
        run_logit = rescale * (run_logit + (run_max - new_max) * run_sum) + tile_logit
    run_sum = rescale * run_sum + tl.sum(exp_tile, axis=1)
    return new_max, run_sum, run_logit, run_target


@triton.jit
def tile_dlogits(
    scaled, offs_v, local_ids, row_max, coef_a, coef_b, coef_c, inv_temperature, WITH_ENTROPY: tl.constexpr
):
    """dL/dlogits of a tile: (exp(z - m) (a + b (z - m)) + c [v == target]) / temperature."""
    shifted = scaled - row_max[:, None]
    if WITH_ENTROPY:
        grad = tl.exp(shifted) * (coef_a[:, None] + coef_b[:, None] * shifted)
    else:
        grad = tl.exp(shifted) * coef_a[:, None]
    grad += tl.where(offs_v[None, :] == local_ids[:, None], coef_c[:, None], 0.0)
    return grad * inv_temperature


@triton.jit
def _linear_partials_kernel(
    hidden_ptr,
    weight_ptr,
    local_ids_ptr,
    out_ptr,
    T,
    V,
    H,
    stride_ht,
    stride_wv,
    inv_temperature,
    vocab_per_split,
    num_splits,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_T: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partials of one (token block, vocabulary split), written to out[4, num_splits, T]."""
    pid_t, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), num_splits, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    local_ids = tl.load(local_ids_ptr + offs_t, mask=mask_t, other=-1)
    run_max = tl.full((BLOCK_T,), FIRST_MAX, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    run_logit = tl.zeros((BLOCK_T,), dtype=tl.float32)
    run_target = tl.zeros((BLOCK_T,), dtype=tl.float32)
    split_start = pid_s * vocab_per_split
    split_end = tl.minimum(split_start + vocab_per_split, V)
    for v0 in range(split_start, split_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < split_end
        acc = _logits_tile(
            hidden_ptr,
            weight_ptr,
            offs_t,
            offs_v,
            mask_t,
            mask_v,
            H,
            stride_ht,
            stride_wv,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
            UPCAST,
            PRECISION,
        )
        run_max, run_sum, run_logit, run_target = online_update(
            run_max, run_sum, run_logit, run_target, acc * inv_temperature, offs_v, mask_v, local_ids, WITH_ENTROPY
        )
    out = out_ptr + pid_s * T + offs_t
    plane = num_splits * T
    tl.store(out, run_max, mask=mask_t)
    tl.store(out + plane, run_sum, mask=mask_t)
    tl.store(out + 2 * plane, run_target, mask=mask_t)
    tl.store(out + 3 * plane, run_logit, mask=mask_t)


@triton.jit
def _linear_dlogits_kernel(
    hidden_ptr,
    weight_ptr,
    local_ids_ptr,
    max_ptr,
    coef_a_ptr,
    coef_b_ptr,
    coef_c_ptr,
    grad_ptr,
    T,
    V,
    H,
    stride_ht,
    stride_wv,
    stride_gt,
    inv_temperature,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_T: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Recompute one logits tile and write its dL/dlogits into grad[T, V] (the caller's token chunk)."""
    pid_t, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(V, BLOCK_V), GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_t, mask_v = offs_t < T, offs_v < V
    acc = _logits_tile(
        hidden_ptr,
        weight_ptr,
        offs_t,
        offs_v,
        mask_t,
        mask_v,
        H,
        stride_ht,
        stride_wv,
        BLOCK_T,
        BLOCK_V,
        BLOCK_H,
        UPCAST,
        PRECISION,
    )
    row_max = tl.load(max_ptr + offs_t, mask=mask_t, other=0.0)
    coef_a = tl.load(coef_a_ptr + offs_t, mask=mask_t, other=0.0)
    coef_b = tl.load(coef_b_ptr + offs_t, mask=mask_t, other=0.0)
    coef_c = tl.load(coef_c_ptr + offs_t, mask=mask_t, other=0.0)
    local_ids = tl.load(local_ids_ptr + offs_t, mask=mask_t, other=-1)
    grad = tile_dlogits(
        acc * inv_temperature, offs_v, local_ids, row_max, coef_a, coef_b, coef_c, inv_temperature, WITH_ENTROPY
    )
    tl.store(
        grad_ptr + offs_t.to(tl.int64)[:, None] * stride_gt + offs_v[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=mask_t[:, None] & mask_v[None, :],
    )


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 products, like torch's default fp32 matmul (TF32 off); 16-bit ones ignore it."""
    return "ieee" if dtype == torch.float32 or INTERPRETED else "tf32"


def local_target_ids(target_ids_T: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Shard-local target ids as int32; ignored rows (negative ids) become -1, which matches no column."""
    return torch.where(target_ids_T >= 0, target_ids_T - vocab_start, -1).to(torch.int32).contiguous()


def _linear_partials_forward(hidden_TH, weight_VH, local_ids_T, inv_temperature: float, with_entropy: bool):
    """Launch the fused forward and merge its vocabulary splits: (max, sum_exp, target, sum_exp_logit), each [T]."""
    (num_tokens, hidden_size), vocab_size = hidden_TH.shape, weight_VH.shape[0]
    config = _linear_config(hidden_TH)
    vocab_per_split = config.pop("vocab_per_split")
    num_splits = triton.cdiv(vocab_size, vocab_per_split)
    out_4ST = torch.zeros(4, num_splits, num_tokens, dtype=torch.float32, device=hidden_TH.device)
    grid = (triton.cdiv(num_tokens, config["BLOCK_T"]) * num_splits,)
    _linear_partials_kernel[grid](
        hidden_TH,
        weight_VH,
        local_ids_T,
        out_4ST,
        num_tokens,
        vocab_size,
        hidden_size,
        hidden_TH.stride(0),
        weight_VH.stride(0),
        inv_temperature,
        vocab_per_split,
        num_splits,
        WITH_ENTROPY=with_entropy,
        UPCAST=INTERPRETED,
        PRECISION=_dot_precision(hidden_TH.dtype),
        **config,
    )
    max_ST, sum_exp_ST, target_ST, sum_exp_logit_ST = out_4ST.unbind(0)
    return merge_stacked_partials(max_ST, sum_exp_ST, target_ST, sum_exp_logit_ST if with_entropy else None)


def _backward_token_chunk(num_tokens: int, vocab_size: int, element_size: int) -> int:
    """Tokens per dlogits workspace: bounded by _MAX_BACKWARD_TOKENS and by _BACKWARD_BUDGET_BYTES."""
    by_budget = max(128, _BACKWARD_BUDGET_BYTES // max(1, vocab_size * element_size) // 128 * 128)
    return max(1, min(num_tokens, _MAX_BACKWARD_TOKENS, by_budget))


def _add_matmul_fp32_(accumulator_f32: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """accumulator += left @ right with fp32 accumulation, without fp32 copies of 16-bit operands on CUDA."""
    if left.dtype == torch.float32:
        accumulator_f32.addmm_(left, right)
    elif left.is_cuda:
        torch.addmm(accumulator_f32, left, right, out_dtype=torch.float32, out=accumulator_f32)
    else:
        accumulator_f32.addmm_(left.float(), right.float())


def _linear_partials_backward(hidden_TH, weight_VH, local_ids_T, max_T, coefs, inv_temperature, needs_grad):
    """grad_hidden [T, H] and grad_weight [V, H] (None where not needed), one token chunk of dlogits at a time."""
    (num_tokens, hidden_size), vocab_size = hidden_TH.shape, weight_VH.shape[0]
    coef_a_T, coef_b_T, coef_c_T = coefs
    config = _linear_config(hidden_TH)
    config.pop("vocab_per_split")
    chunk = _backward_token_chunk(num_tokens, vocab_size, hidden_TH.element_size())
    workspace_cV = torch.empty(chunk, vocab_size, dtype=hidden_TH.dtype, device=hidden_TH.device)
    grad_hidden_TH = torch.empty_like(hidden_TH) if needs_grad[0] else None
    single_chunk = chunk >= num_tokens
    grad_weight_VH = None
    if needs_grad[1] and not single_chunk:
        grad_weight_VH = torch.zeros(vocab_size, hidden_size, dtype=torch.float32, device=weight_VH.device)
    for t0 in range(0, num_tokens, chunk):
        rows = slice(t0, min(t0 + chunk, num_tokens))
        hidden_cH, grad_cV = hidden_TH[rows], workspace_cV[: rows.stop - t0]
        grid = (triton.cdiv(grad_cV.shape[0], config["BLOCK_T"]) * triton.cdiv(vocab_size, config["BLOCK_V"]),)
        _linear_dlogits_kernel[grid](
            hidden_cH,
            weight_VH,
            local_ids_T[rows],
            max_T[rows],
            coef_a_T[rows],
            (coef_a_T if coef_b_T is None else coef_b_T)[rows],
            coef_c_T[rows],
            grad_cV,
            grad_cV.shape[0],
            vocab_size,
            hidden_size,
            hidden_TH.stride(0),
            weight_VH.stride(0),
            grad_cV.stride(0),
            inv_temperature,
            WITH_ENTROPY=coef_b_T is not None,
            UPCAST=INTERPRETED,
            PRECISION=_dot_precision(hidden_TH.dtype),
            **config,
        )
        if needs_grad[0]:
            torch.mm(grad_cV, weight_VH, out=grad_hidden_TH[rows])
        if needs_grad[1] and single_chunk:
            grad_weight_VH = grad_cV.T @ hidden_cH
        elif needs_grad[1]:
            _add_matmul_fp32_(grad_weight_VH, grad_cV.T, hidden_cH)
    return grad_hidden_TH, None if grad_weight_VH is None else grad_weight_VH.to(weight_VH.dtype)


class _LinearPartials(torch.autograd.Function):
    """hidden [T, H], weight [V, H] -> partials (max [T] non-differentiable), logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, target_ids_T, temperature, vocab_start, with_entropy):
        hidden_TH, weight_VH = hidden_TH.contiguous(), weight_VH.contiguous()
        local_ids_T = local_target_ids(target_ids_T, vocab_start)
        max_T, sum_exp_T, target_T, sum_exp_logit_T = _linear_partials_forward(
            hidden_TH, weight_VH, local_ids_T, 1.0 / temperature, with_entropy
        )
        ctx.save_for_backward(hidden_TH, weight_VH, local_ids_T, max_T)
        ctx.inv_temperature = 1.0 / temperature
        ctx.mark_non_differentiable(max_T)
        ctx.set_materialize_grads(False)
        return max_T, sum_exp_T, target_T, torch.zeros_like(sum_exp_T) if sum_exp_logit_T is None else sum_exp_logit_T

    @staticmethod
    def backward(ctx, _grad_max_T, grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T):
        hidden_TH, weight_VH, local_ids_T, max_T = ctx.saved_tensors
        coefs = dlogit_coefficients(grad_sum_exp_T, grad_target_T, grad_sum_exp_logit_T)
        grad_hidden_TH, grad_weight_VH = _linear_partials_backward(
            hidden_TH, weight_VH, local_ids_T, max_T, coefs, ctx.inv_temperature, ctx.needs_input_grad[:2]
        )
        return grad_hidden_TH, grad_weight_VH, None, None, None, None


def logprob_partials_triton(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
) -> LogprobPartials:
    """Partials of the shard weight_VH [V_local, H] for hidden_TH [T, H] (fp32/bf16/fp16), logits never stored."""
    outputs = _LinearPartials.apply(hidden_TH, weight_VH, target_ids_T, temperature, vocab_start, with_entropy)
    return LogprobPartials.from_outputs(outputs, with_entropy=with_entropy)

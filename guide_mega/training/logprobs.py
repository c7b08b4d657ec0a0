"""Per-token logprobs (and entropies) of response tokens from a Megatron stage's hidden states, vocabulary-parallel.

Shape legend: S sequence positions, B rows, H hidden size, N response tokens of a micro-batch, V_local the
vocabulary rows held by this tensor-parallel rank.

The fused LM-head kernel (`guide_mega.kernels.token_logprobs`) reduces this rank's vocabulary shard to per-token
partials, which `vocab_parallel.py` combines with two O(N) all-reduces over the tensor-parallel group, so [N, V]
logits never exist. Zero rows that pad the vocabulary are sliced off the weight first (every column enters the softmax).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

from guide_mega.kernels import TokenLogprobs
from guide_mega.training.micro_batches import MicroBatch
from guide_mega.training.vocab_parallel import vocab_parallel_token_logprobs


def lm_head_token_logprobs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_N: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    hidden_grad_summed: bool = False,
) -> TokenLogprobs:
    """fp32 logprobs [N] (and entropies [N]) of target_ids_N under softmax(hidden_NH @ W^T / temperature).

    weight_VH is this rank's vocabulary shard [V_padded / TP, H]; vocab_size is the real (unpadded) vocabulary.
    hidden_NH must be identical on every tensor-parallel rank; its gradient is summed over the group here, unless
    `hidden_grad_summed` says an earlier op's backward already does (the sequence-parallel all-gather).
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    rows_per_rank = weight_VH.shape[0]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * rows_per_rank
    real_rows = min(max(vocab_size - vocab_start, 0), rows_per_rank)
    if real_rows == 0:
        raise ValueError(f"tensor-parallel rank holds only vocabulary padding (vocab {vocab_size}, TP {tp_size})")
    group = None
    if tp_size > 1:
        if not hidden_grad_summed:
            hidden_NH = copy_to_tensor_model_parallel_region(hidden_NH)
        group = parallel_state.get_tensor_model_parallel_group()
    return vocab_parallel_token_logprobs(
        hidden_NH,
        weight_VH[:real_rows],
        target_ids_N,
        vocab_start=vocab_start,
        process_group=group,
        temperature=temperature,
        with_entropy=with_entropy,
    )


def response_hidden_states(hidden_SBH: torch.Tensor, micro_batch: MicroBatch, *, sequence_parallel: bool):
    """Hidden states [N, H] at the positions that predict the micro-batch's response tokens, and their targets [N].

    Under sequence parallelism the last stage holds [S / TP, B, H]; the all-gather's backward reduce-scatters,
    which also sums the vocabulary-shard contributions to the hidden gradient.
    """
    if sequence_parallel:
        hidden_SBH = gather_from_sequence_parallel_region(hidden_SBH, tensor_parallel_output_grad=True)
    hidden_XH = hidden_SBH.transpose(0, 1).reshape(-1, hidden_SBH.shape[-1])
    return hidden_XH[micro_batch.flat_index_N], micro_batch.target_ids_N


def micro_batch_logprobs(
    hidden_SBH: torch.Tensor,
    weight_VH: torch.Tensor,
    micro_batch: MicroBatch,
    *,
    vocab_size: int,
    sequence_parallel: bool,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """Logprobs [N] (and entropies [N]) of a micro-batch's response tokens from the last stage's hidden states."""
    hidden_NH, target_ids_N = response_hidden_states(hidden_SBH, micro_batch, sequence_parallel=sequence_parallel)
    return lm_head_token_logprobs(
        hidden_NH,
        weight_VH,
        target_ids_N,
        vocab_size=vocab_size,
        temperature=temperature,
        with_entropy=with_entropy,
        hidden_grad_summed=sequence_parallel,
    )

"""Vocabulary-parallel per-token logprobs: the kernels' shard partials merged by an all-reduce over the TP group.

Shape legend: T tokens, H hidden size, V_local vocabulary entries held by this rank.

`guide_mega.kernels` reduces one vocabulary shard to per-token partials (max, sum-exp, target logit, entropy term)
and merges partials with a pure function that takes the cross-shard reduction as an argument; it never touches
torch.distributed. The collective lives here, beside the process groups: two all-reduces of O(T) (a MAX of [T],
then one SUM of [3, T]). The merge's backward is local (every rank holds the same outputs and upstream gradient),
so no collective runs in the backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from guide_mega.kernels import TokenLogprobs, token_logprobs
from guide_mega.kernels.token_logprobs import ShardReduce
from guide_mega.kernels.token_logprobs.dispatch import Impl

_REDUCE_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def all_reduce_over(process_group: dist.ProcessGroup) -> ShardReduce:
    """The kernels' `reduce_shards` as an all-reduce over `process_group`: a reduced copy, the input untouched."""

    def reduce_shards(tensor: torch.Tensor, op: str) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=_REDUCE_OPS[op], group=process_group)
        return reduced

    return reduce_shards


def vocab_parallel_token_logprobs(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    vocab_start: int = 0,
    process_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: Impl = "auto",
) -> TokenLogprobs:
    """fp32 logprobs [T] (and entropies [T]) of target_ids_T over the vocabulary split across `process_group`.

    weight_VH [V_local, H] is this rank's shard, holding global ids [vocab_start, vocab_start + V_local);
    target_ids_T are global ids (negative: ignored row). Every rank of the group gets the same full result.
    Without a group, weight_VH is the whole vocabulary. grad_hidden_TH is this shard's contribution: the caller
    sums it over the group (Megatron's copy_to_tensor_model_parallel_region does, in its backward).
    """
    reduce_shards = None if process_group is None else all_reduce_over(process_group)
    return token_logprobs(
        hidden_TH,
        weight_VH,
        target_ids_T,
        temperature=temperature,
        with_entropy=with_entropy,
        vocab_start=vocab_start,
        reduce_shards=reduce_shards,
        impl=impl,
    )

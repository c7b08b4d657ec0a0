"""Data-parallel shards and micro-batches: complete, disjoint, within budget, with targets where they belong."""

import pytest
import torch
from tiny_models import make_train_batch

from guide_mega.training.micro_batches import (
    IGNORE_INDEX,
    build_micro_batch,
    sequence_lengths,
    shard_for_data_parallel,
    split_by_token_budget,
)


@pytest.mark.parametrize("data_parallel", [1, 2, 3])
def test_data_parallel_shards_partition_the_sequences(data_parallel):
    lengths = [13, 5, 3, 5, 4, 11, 8, 12]
    shards = [
        shard_for_data_parallel(list(range(8)), lengths, data_parallel=data_parallel, data_rank=rank)
        for rank in range(data_parallel)
    ]
    assert sorted(seq for shard in shards for seq in shard) == list(range(8))
    loads = [sum(lengths[seq] for seq in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(lengths)


@pytest.mark.parametrize("padded", [True, False])
def test_micro_batches_stay_within_the_budget(padded):
    lengths = [13, 5, 3, 5, 4, 11, 8, 12]
    groups = split_by_token_budget(list(range(8)), lengths, max_tokens=24, padded=padded)
    assert sorted(seq for group in groups for seq in group) == list(range(8))
    for group in groups:
        size = len(group) * max(lengths[s] for s in group) if padded else sum(lengths[s] for s in group)
        assert size <= 24 or len(group) == 1


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("context", ["train", "sampled"])
def test_targets_sit_where_response_tokens_are_predicted(packed, context):
    batch = make_train_batch()
    seqs = [0, 3, 5]
    micro_batch = build_micro_batch(
        batch, seqs, context=context, packed=packed, pad_multiple=4, device=torch.device("cpu")
    )
    prompts = batch.train_prompt_ids if context == "train" else batch.sampled_prompt_ids
    assert micro_batch.input_ids_BS.shape[1] % 4 == 0
    flat_inputs = micro_batch.input_ids_BS.reshape(-1)
    flat_targets = micro_batch.target_ids_BS.reshape(-1)
    expected_tokens = torch.cat(
        [batch.response_ids_T[batch.cu_seqlens_S1[s] : batch.cu_seqlens_S1[s + 1]] for s in seqs]
    )
    assert torch.equal(flat_targets[micro_batch.flat_index_N], expected_tokens)
    assert torch.equal(batch.response_ids_T[micro_batch.token_index_N], expected_tokens)
    assert int((flat_targets != IGNORE_INDEX).sum()) == expected_tokens.numel()
    # The input at the first prediction position is the prompt's last token.
    first = micro_batch.flat_index_N[micro_batch.seq_ids_N == 0][0]
    assert int(flat_inputs[first]) == prompts[seqs[0]][-1]
    assert (
        sequence_lengths(batch, context)[seqs[0]]
        == len(prompts[seqs[0]]) + int(batch.cu_seqlens_S1[seqs[0] + 1] - batch.cu_seqlens_S1[seqs[0]]) - 1
    )
    if packed:
        cu_seqlens = micro_batch.packed_seq_params.cu_seqlens_q
        assert int(cu_seqlens[-1]) == micro_batch.input_ids_BS.shape[1]
        assert torch.all(micro_batch.position_ids_BS[0, cu_seqlens[:-1].long()] == 0)

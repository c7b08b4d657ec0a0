"""Micro-batches: complete, disjoint, within budget, with targets where they belong."""

import pytest
import torch
from tiny_models import make_train_batch

from guide_mega.training.micro_batches import (
    build_micro_batch,
    plan_micro_batches,
    row_length,
    sequence_lengths,
    shared_prompt_rows,
    split_by_token_budget,
)


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
    batch = make_train_batch(shared_prompts=False)
    seqs = [0, 3, 5]
    micro_batch = build_micro_batch(
        batch, [[seq] for seq in seqs], context=context, packed=packed, pad_multiple=4, device=torch.device("cpu")
    )
    prompts = batch.train_prompt_ids if context == "train" else batch.sampled_prompt_ids
    assert micro_batch.input_ids_BS.shape[1] % 4 == 0 and micro_batch.attention_mask_B1SS is None
    flat_inputs = micro_batch.input_ids_BS.reshape(-1)
    expected_tokens = torch.cat(
        [batch.response_ids_T[batch.cu_seqlens_S1[s] : batch.cu_seqlens_S1[s + 1]] for s in seqs]
    )
    assert torch.equal(micro_batch.target_ids_N, expected_tokens)
    assert torch.equal(batch.response_ids_T[micro_batch.token_index_N], expected_tokens)
    # Each response token is predicted right after the token before it (the prompt's last token for the first).
    for local, seq in enumerate(seqs):
        positions = micro_batch.flat_index_N[micro_batch.seq_ids_N == local]
        assert int(flat_inputs[positions[0]]) == prompts[seq][-1]
        assert torch.equal(flat_inputs[positions[1:]], expected_tokens[micro_batch.seq_ids_N == local][:-1])
    assert (
        sequence_lengths(batch, context)[seqs[0]]
        == len(prompts[seqs[0]]) + int(batch.cu_seqlens_S1[seqs[0] + 1] - batch.cu_seqlens_S1[seqs[0]]) - 1
    )
    if packed:
        cu_seqlens = micro_batch.packed_seq_params.cu_seqlens_q
        assert int(cu_seqlens[-1]) == micro_batch.input_ids_BS.shape[1]
        assert torch.all(micro_batch.position_ids_BS[0, cu_seqlens[:-1].long()] == 0)
    else:
        assert torch.equal(micro_batch.position_ids_BS[0], torch.arange(micro_batch.input_ids_BS.shape[1]))


@pytest.mark.parametrize("context", ["train", "sampled"])
def test_shared_prompt_rows_show_each_prediction_exactly_its_own_sequence(context):
    """What the mask lets each prediction position see, in order, must be its prompt and its response so far,
    at positions 0, 1, ...: then attention computes what it would on the sequence alone."""
    batch = make_train_batch(num_groups=3, group_size=4, guided_groups=(1,))
    lengths = sequence_lengths(batch, context)
    rows = shared_prompt_rows(batch, list(range(batch.num_seqs)), context, max_tokens=10**6, lengths=lengths)
    assert sorted(len(row) for row in rows) == [4, 4, 4]
    micro_batch = build_micro_batch(
        batch, rows, context=context, packed=False, pad_multiple=1, device=torch.device("cpu")
    )
    prompts = batch.train_prompt_ids if context == "train" else batch.sampled_prompt_ids
    width = micro_batch.input_ids_BS.shape[1]
    order = [seq for row in rows for seq in row]
    for flat, local, token_index in zip(
        micro_batch.flat_index_N.tolist(),
        micro_batch.seq_ids_N.tolist(),
        micro_batch.token_index_N.tolist(),
        strict=True,
    ):
        seq = order[local]
        start = int(batch.cu_seqlens_S1[seq])
        row, query = divmod(flat, width)
        visible = (~micro_batch.attention_mask_B1SS[row, 0, query]).nonzero().squeeze(1)
        expected = prompts[seq] + batch.response_ids_T[start:token_index].tolist()
        assert micro_batch.input_ids_BS[row, visible].tolist() == expected
        assert micro_batch.position_ids_BS[row, visible].tolist() == list(range(len(expected)))
        assert int(micro_batch.target_ids_N[micro_batch.token_index_N == token_index]) == int(
            batch.response_ids_T[token_index]
        )
    assert sorted(micro_batch.token_index_N.tolist()) == list(range(batch.response_ids_T.numel()))


def test_shared_prompt_rows_partition_the_sequences_within_the_budget():
    batch = make_train_batch(num_groups=3, group_size=6)
    lengths = sequence_lengths(batch, "train")
    budget = max(lengths) + 8
    rows = shared_prompt_rows(batch, list(range(batch.num_seqs)), "train", max_tokens=budget, lengths=lengths)
    assert sorted(seq for row in rows for seq in row) == list(range(batch.num_seqs))
    for row in rows:
        assert len({tuple(batch.train_prompt_ids[seq]) for seq in row}) == 1
        assert row_length(batch, row, "train", lengths) <= budget or len(row) == 1
    assert len(rows) > 3, "the budget should split some groups"
    micro_batches = plan_micro_batches(
        batch,
        list(range(batch.num_seqs)),
        context="train",
        max_tokens=budget,
        packed=False,
        share_prompts=True,
        pad_multiple=1,
        device=torch.device("cpu"),
    )
    tokens = torch.cat([mb.token_index_N for mb in micro_batches])
    assert sorted(tokens.tolist()) == list(range(batch.response_ids_T.numel()))
    assert all(mb.num_tokens <= budget for mb in micro_batches)

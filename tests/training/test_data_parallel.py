"""Data-parallel shares of a step: planned by whole groups, balanced, complete, and sent as tensors intact."""

import dataclasses

import pytest
import torch
from tiny_models import make_train_batch

from guide_mega.training.data_parallel import (
    local_mini_batches,
    pack_share,
    plan_shares,
    select_sequences,
    token_positions,
    unpack_share,
)
from guide_mega.training.micro_batches import sequence_lengths


@pytest.mark.parametrize(("data_parallel", "mini_batches"), [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_shares_split_each_mini_batch_by_whole_groups(data_parallel, mini_batches):
    batch = make_train_batch(num_groups=6, group_size=3, guided_groups=(1, 4))
    shares = plan_shares(batch, num_mini_batches=mini_batches, data_parallel=data_parallel)
    assert sorted(seq for seqs, _ in shares for seq in seqs) == list(range(batch.num_seqs))
    groups = batch.group_ids_S.tolist()
    owners = {}
    for rank, (seqs, labels) in enumerate(shares):
        for seq, label in zip(seqs, labels, strict=True):
            assert owners.setdefault(groups[seq], (rank, label)) == (rank, label), "a group was split"
    whole = local_mini_batches(batch, mini_batches)
    for label, members in enumerate(whole):  # each rank's part of a mini-batch is from that mini-batch
        assert {seq for seqs, labels in shares for seq, lab in zip(seqs, labels, strict=True) if lab == label} == set(
            members
        )
        lengths = sequence_lengths(batch, "train")
        loads = [
            sum(lengths[s] for s, lab in zip(seqs, labels, strict=True) if lab == label) for seqs, labels in shares
        ]
        group_max = max(sum(lengths[s] for s in members if groups[s] == g) for g in {groups[s] for s in members})
        assert max(loads) - min(loads) <= group_max


def test_a_share_travels_as_two_tensors_and_comes_back_equal():
    batch = make_train_batch(num_groups=4, group_size=2, guided_groups=(2, 3))
    batch = dataclasses.replace(batch, behaviour_logprobs_T=-torch.rand(batch.num_tokens))
    seqs = [1, 2, 5, 6]
    share = select_sequences(batch, seqs, [0, 0, 1, 1])
    assert share.hint_level_S.tolist() == [-1, -1, 0, 1]  # group 2 at level 0, group 3 at level 1
    assert torch.equal(share.response_ids_T, batch.response_ids_T[token_positions(batch, seqs)])
    advantages_S = torch.randn(share.num_seqs)
    ints, floats = pack_share(share, advantages_S)
    assert ints.dtype == torch.int64 and floats.dtype == torch.float32
    padded = torch.nn.functional.pad(ints, (0, 7)), torch.nn.functional.pad(floats, (0, 3))
    back, back_advantages = unpack_share(*padded)
    names = ("response_ids_T", "cu_seqlens_S1", "is_guided_S", "rewards_S", "group_ids_S", "hint_level_S")
    for name in (*names, "mini_batch_S"):
        assert torch.equal(getattr(back, name), getattr(share, name)), name
    assert back.train_prompt_ids == share.train_prompt_ids and back.sampled_prompt_ids == share.sampled_prompt_ids
    assert torch.equal(back.behaviour_logprobs_T, share.behaviour_logprobs_T)
    assert torch.equal(back_advantages, advantages_S)
    without, _ = unpack_share(*pack_share(dataclasses.replace(share, behaviour_logprobs_T=None), None))
    assert without.behaviour_logprobs_T is None and without.num_tokens == share.num_tokens
    assert local_mini_batches(back, 2) == [[0, 1], [2, 3]]

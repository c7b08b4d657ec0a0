"""Each data-parallel rank's share of a step's sequences, planned on rank 0 and sent as tensors.

Shape legend: S sequences, T response tokens, M mini-batches, D data-parallel ranks.

Rank 0 plans the shares once: the step's mini-batches (whole groups, one optimizer step each), then within each
mini-batch its groups spread over the D ranks, balanced by model-input tokens. A rank receives only its own
sequences, as a TrainBatch whose `mini_batch_S` says which optimizer step each belongs to, packed into one int64
and one float32 tensor (not the whole batch as a pickle to every rank). The ranks of one model replica (tensor and
pipeline parallel) receive the same share. Whatever needs the whole step (loss normalisers, Guide's shaping gamma,
metrics) is reduced over the data-parallel group by the policy and critic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from guide_mega.training.micro_batches import sequence_lengths
from guide_mega.types import TrainBatch


def mini_batch_sequences(group_ids_S: torch.Tensor, num_mini_batches: int) -> list[list[int]]:
    """Split the sequences into mini-batches of whole groups (in order of first appearance)."""
    groups = list(dict.fromkeys(group_ids_S.tolist()))
    if len(groups) < num_mini_batches:
        raise ValueError(f"train.mini_batches_per_step={num_mini_batches} exceeds the batch's {len(groups)} groups")
    chunks = np.array_split(np.array(groups), num_mini_batches)
    members = [set(chunk.tolist()) for chunk in chunks]
    return [[seq for seq, group in enumerate(group_ids_S.tolist()) if group in chunk] for chunk in members]


def local_mini_batches(batch: TrainBatch, num_mini_batches: int) -> list[list[int]]:
    """This rank's sequences of each mini-batch: from the share's `mini_batch_S`, or for a whole batch (one
    data-parallel rank) from its groups. Every rank gets `num_mini_batches` lists, some maybe empty."""
    if batch.mini_batch_S is None:
        return mini_batch_sequences(batch.group_ids_S, num_mini_batches)
    return [torch.nonzero(batch.mini_batch_S == m).flatten().tolist() for m in range(num_mini_batches)]


def plan_shares(batch: TrainBatch, *, num_mini_batches: int, data_parallel: int) -> list[tuple[list[int], list[int]]]:
    """Per data-parallel rank: its sequences (increasing) and each one's mini-batch. Within a mini-batch, whole
    groups go to the rank with the fewest model-input tokens so far (longest group first)."""
    lengths = sequence_lengths(batch, "train")
    group_of = batch.group_ids_S.tolist()
    owned: list[dict[int, int]] = [{} for _ in range(data_parallel)]
    for mini_batch, seqs in enumerate(mini_batch_sequences(batch.group_ids_S, num_mini_batches)):
        groups: dict[int, list[int]] = {}
        for seq in seqs:
            groups.setdefault(group_of[seq], []).append(seq)
        loads = [0] * data_parallel
        for members in sorted(groups.values(), key=lambda m: (-sum(lengths[s] for s in m), m[0])):
            rank = min(range(data_parallel), key=lambda r: (loads[r], r))
            loads[rank] += sum(lengths[seq] for seq in members)
            owned[rank].update(dict.fromkeys(members, mini_batch))
    return [(sorted(share), [share[seq] for seq in sorted(share)]) for share in owned]


def select_sequences(batch: TrainBatch, seqs: list[int], mini_batch: list[int]) -> TrainBatch:
    """The TrainBatch of `seqs` alone (renumbered 0..), labelled with their mini-batches."""
    lengths_S = batch.lengths_S
    token_index_T = token_positions(batch, seqs)
    cu_seqlens_S1 = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    cu_seqlens_S1[1:] = lengths_S[seqs].cumsum(0)
    index_S = torch.tensor(seqs, dtype=torch.int64)
    behaviour_T = batch.behaviour_logprobs_T
    return TrainBatch(
        train_prompt_ids=[batch.train_prompt_ids[s] for s in seqs],
        sampled_prompt_ids=[batch.sampled_prompt_ids[s] for s in seqs],
        response_ids_T=batch.response_ids_T[token_index_T],
        cu_seqlens_S1=cu_seqlens_S1,
        is_guided_S=batch.is_guided_S[index_S],
        rewards_S=batch.rewards_S[index_S],
        group_ids_S=batch.group_ids_S[index_S],
        hint_level_S=batch.hint_level_S[index_S],
        behaviour_logprobs_T=None if behaviour_T is None else behaviour_T[token_index_T],
        mini_batch_S=torch.tensor(mini_batch, dtype=torch.int64),
    )


def token_positions(batch: TrainBatch, seqs: list[int]) -> torch.Tensor:
    """Indices [T_share] in the batch's T response tokens of the tokens of `seqs`, in order."""
    starts = batch.cu_seqlens_S1.tolist()
    return torch.tensor([t for s in seqs for t in range(starts[s], starts[s + 1])], dtype=torch.int64)


def pack_share(batch: TrainBatch, advantages_S: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One int64 tensor (counts, per-sequence integers, every prompt and response token) and one float32 tensor
    (rewards, the advantages if any, the behaviour logprobs if any) holding a share."""
    num_seqs, num_tokens = batch.num_seqs, batch.num_tokens
    flags = [int(batch.behaviour_logprobs_T is not None), int(advantages_S is not None)]
    mini_batch_S = batch.mini_batch_S if batch.mini_batch_S is not None else torch.zeros(num_seqs, dtype=torch.int64)
    ints = [
        torch.tensor([num_seqs, num_tokens, *flags]),
        torch.tensor([len(p) for p in batch.train_prompt_ids]),
        torch.tensor([len(p) for p in batch.sampled_prompt_ids]),
        batch.cu_seqlens_S1, batch.is_guided_S.long(), batch.group_ids_S, batch.hint_level_S, mini_batch_S,
        torch.tensor([t for p in batch.train_prompt_ids for t in p]),
        torch.tensor([t for p in batch.sampled_prompt_ids for t in p]),
        batch.response_ids_T,
    ]  # fmt: skip
    floats = [batch.rewards_S.float()]
    floats += [] if advantages_S is None else [advantages_S.float()]
    floats += [] if batch.behaviour_logprobs_T is None else [batch.behaviour_logprobs_T.float()]
    return torch.cat([t.to(torch.int64) for t in ints]), torch.cat(floats)


def unpack_share(ints: torch.Tensor, floats: torch.Tensor) -> tuple[TrainBatch, torch.Tensor | None]:
    """The share `pack_share` packed: (TrainBatch, advantages [S] or None). Trailing padding is ignored."""
    num_seqs, num_tokens, has_behaviour, has_advantages = ints[:4].tolist()
    cursor = 4

    def take(count: int) -> torch.Tensor:
        nonlocal cursor
        cursor += count
        return ints[cursor - count : cursor]

    train_lengths, sampled_lengths = take(num_seqs).tolist(), take(num_seqs).tolist()
    cu_seqlens_S1, is_guided_S, group_ids_S, hint_level_S, mini_batch_S = (
        take(n) for n in (num_seqs + 1, *[num_seqs] * 4)
    )
    train_ids, sampled_ids = take(sum(train_lengths)).tolist(), take(sum(sampled_lengths)).tolist()
    response_ids_T = take(num_tokens)
    rewards_S, rest = floats[:num_seqs], floats[num_seqs:]
    advantages_S = rest[:num_seqs] if has_advantages else None
    rest = rest[num_seqs:] if has_advantages else rest
    batch = TrainBatch(
        train_prompt_ids=_split(train_ids, train_lengths),
        sampled_prompt_ids=_split(sampled_ids, sampled_lengths),
        response_ids_T=response_ids_T.clone(),
        cu_seqlens_S1=cu_seqlens_S1.clone(),
        is_guided_S=is_guided_S.bool(),
        rewards_S=rewards_S.clone(),
        group_ids_S=group_ids_S.clone(),
        hint_level_S=hint_level_S.clone(),
        behaviour_logprobs_T=rest[:num_tokens].clone() if has_behaviour else None,
        mini_batch_S=mini_batch_S.clone(),
    )
    return batch, None if advantages_S is None else advantages_S.clone()


def _split(flat: list[int], lengths: list[int]) -> list[list[int]]:
    offsets = np.cumsum([0, *lengths]).tolist()
    return [flat[start:end] for start, end in zip(offsets, offsets[1:], strict=False)]


def scatter_shares(packed: list[tuple[torch.Tensor, torch.Tensor]] | None, *, group) -> tuple:
    """Rank 0 sends rank r the packed share packed[r] over the gloo `group` of every rank (two scatters of padded
    tensors, sizes first); every rank returns its own (TrainBatch, advantages [S] or None)."""
    if packed is not None and len(packed) != dist.get_world_size(group):
        raise ValueError(f"{len(packed)} shares for {dist.get_world_size(group)} ranks")
    sizes = torch.zeros(2, dtype=torch.int64)
    size_list = [torch.tensor([i.numel(), f.numel()]) for i, f in packed] if packed is not None else None
    dist.scatter(sizes, size_list, src=0, group=group)
    widths = torch.stack(size_list).amax(0) if packed is not None else None
    widths = _broadcast_widths(widths, group)
    ints, floats = torch.zeros(int(widths[0]), dtype=torch.int64), torch.zeros(int(widths[1]), dtype=torch.float32)
    int_list = [_pad(i, ints.numel()) for i, _ in packed] if packed is not None else None
    float_list = [_pad(f, floats.numel()) for _, f in packed] if packed is not None else None
    dist.scatter(ints, int_list, src=0, group=group)
    dist.scatter(floats, float_list, src=0, group=group)
    return unpack_share(ints[: int(sizes[0])], floats[: int(sizes[1])])


def _broadcast_widths(widths: torch.Tensor | None, group) -> torch.Tensor:
    holder = widths if widths is not None else torch.zeros(2, dtype=torch.int64)
    dist.broadcast(holder, src=0, group=group)
    return holder


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.numel()))


def data_parallel_group():
    """This rank's data-parallel process group (None in a world of one)."""
    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return None
    return parallel_state.get_data_parallel_group()


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """Where the data-parallel group's collectives run: the current GPU under NCCL, else the tensor's device."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else tensor.device


def sum_over_data_parallel(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the data-parallel ranks (a copy; the tensor itself where there is one rank)."""
    group = data_parallel_group()
    if group is None:
        return values
    summed = values.to(_collective_device(values), copy=True)
    dist.all_reduce(summed, group=group)
    return summed.to(values.device)


def max_over_data_parallel(values: torch.Tensor) -> torch.Tensor:
    """`values`' element-wise maximum over the data-parallel ranks."""
    group = data_parallel_group()
    if group is None:
        return values
    reduced = values.to(_collective_device(values), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    return reduced.to(values.device)


def gather_over_data_parallel(values_N: torch.Tensor) -> torch.Tensor:
    """The concatenation over data-parallel ranks (in rank order) of each rank's 1-D `values_N`, any lengths."""
    group = data_parallel_group()
    if group is None:
        return values_N
    device, world = _collective_device(values_N), dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([values_N.numel()], device=device), group=group)
    width = int(max(int(size) for size in sizes))
    padded = torch.zeros(width, dtype=values_N.dtype, device=device)
    padded[: values_N.numel()] = values_N.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[: int(size)] for part, size in zip(gathered, sizes, strict=True)]).to(values_N.device)


def token_statistics(values_T: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation (population) and maximum of per-token values over every data-parallel rank's
    share; empty when no rank has a token."""
    values = values_T.double()
    totals = sum_over_data_parallel(torch.stack([values.sum(), values.square().sum(), torch.tensor(values.numel())]))
    peak = max_over_data_parallel(values.max() if values.numel() else torch.tensor(-torch.inf, dtype=torch.float64))
    count = float(totals[2])
    if count == 0:
        return {}
    mean = float(totals[0]) / count
    return {"mean": mean, "std": max(float(totals[1]) / count - mean * mean, 0.0) ** 0.5, "max": float(peak)}


def world_data_ranks(group) -> list[int]:
    """Every global rank's data-parallel rank, in global rank order (a collective over `group`, every rank)."""
    ranks: list[int | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, parallel_state.get_data_parallel_rank(), group=group)
    return [int(rank) for rank in ranks]

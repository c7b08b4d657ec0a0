"""Cut a TrainBatch into data-parallel shards and token-budgeted micro-batches of model inputs.

Shape legend: S sequence positions of a micro-batch row, B rows, N response tokens in the micro-batch, T response
tokens of the whole batch.

Sequence s is its context prompt (hint-free `train_prompt_ids` for the current policy, `sampled_prompt_ids` for
old logprobs) followed by its response; the model reads tokens[:-1], and response token j is predicted at
position len(prompt) - 1 + j. Two layouts:
  padded: one sequence per row, right-padded to the longest row (causal attention keeps pads out of real
          tokens); works with every layer spec, so it is the CPU layout.
  packed: every sequence end to end in one row with cu_seqlens (THD), for Transformer Engine's attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from guide_mega.types import TrainBatch

Context = Literal["train", "sampled"]
# Target id of positions that predict no response token (prompt, padding): logprob 0, no gradient.
IGNORE_INDEX = -100


@dataclass(kw_only=True)
class MicroBatch:
    """Model inputs for one forward pass and where its response tokens sit in the batch."""

    input_ids_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    target_ids_BS: torch.Tensor
    """Response token predicted at each position, IGNORE_INDEX elsewhere."""
    flat_index_N: torch.Tensor
    """Positions in the flattened [B * S] inputs that predict response tokens, in batch token order."""
    token_index_N: torch.Tensor
    """Index of each of those tokens in the batch's T response tokens."""
    seq_ids_N: torch.Tensor
    """Micro-batch-local sequence index (0..) of each response token, for per-sequence aggregation."""
    packed_seq_params: PackedSeqParams | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_BS.numel())


def _sequence(batch: TrainBatch, seq: int, context: Context) -> tuple[list[int], int]:
    """(prompt + response token ids, prompt length) of sequence `seq` under the chosen context."""
    prompt = batch.train_prompt_ids[seq] if context == "train" else batch.sampled_prompt_ids[seq]
    if not prompt:
        raise ValueError(f"TrainBatch sequence {seq} has an empty {context} prompt")
    start, end = int(batch.cu_seqlens_S1[seq]), int(batch.cu_seqlens_S1[seq + 1])
    return list(prompt) + batch.response_ids_T[start:end].tolist(), len(prompt)


def sequence_lengths(batch: TrainBatch, context: Context) -> list[int]:
    """Model input length (prompt + response - 1) of every sequence."""
    prompts = batch.train_prompt_ids if context == "train" else batch.sampled_prompt_ids
    responses_S = (batch.cu_seqlens_S1[1:] - batch.cu_seqlens_S1[:-1]).tolist()
    return [len(prompt) + response - 1 for prompt, response in zip(prompts, responses_S, strict=True)]


def shard_for_data_parallel(seqs: list[int], lengths: list[int], *, data_parallel: int, data_rank: int) -> list[int]:
    """This rank's share of `seqs`: longest first, each to the least-loaded rank (the same plan on every rank)."""
    loads = [0] * data_parallel
    owned: list[list[int]] = [[] for _ in range(data_parallel)]
    for seq in sorted(seqs, key=lambda index: (-lengths[index], index)):
        rank = min(range(data_parallel), key=lambda candidate: (loads[candidate], candidate))
        loads[rank] += lengths[seq]
        owned[rank].append(seq)
    return sorted(owned[data_rank])


def split_by_token_budget(seqs: list[int], lengths: list[int], *, max_tokens: int, padded: bool) -> list[list[int]]:
    """Group sequences (longest first) so that each micro-batch's input size stays within max_tokens.

    The size of a padded micro-batch is rows x longest row, of a packed one the sum of lengths; a sequence longer
    than the budget gets a micro-batch of its own.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for seq in sorted(seqs, key=lambda index: (-lengths[index], index)):
        candidate = current + [seq]
        size = len(candidate) * max(lengths[i] for i in candidate) if padded else sum(lengths[i] for i in candidate)
        if current and size > max_tokens:
            groups.append(current)
            candidate = [seq]
        current = candidate
    if current:
        groups.append(current)
    return groups


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def build_micro_batch(
    batch: TrainBatch, seqs: list[int], *, context: Context, packed: bool, pad_multiple: int, device: torch.device
) -> MicroBatch:
    """Inputs for sequences `seqs`; every row (padded) or every sequence (packed) is padded to pad_multiple."""
    rows = [_sequence(batch, seq, context) for seq in seqs]
    lengths = [_round_up(len(tokens) - 1, pad_multiple) for tokens, _ in rows]
    width = sum(lengths) if packed else max(lengths)
    num_rows = 1 if packed else len(rows)
    input_ids_BS = torch.zeros(num_rows, width, dtype=torch.long)
    position_ids_BS = torch.zeros(num_rows, width, dtype=torch.long)
    target_ids_BS = torch.full((num_rows, width), IGNORE_INDEX, dtype=torch.long)
    flat_index, token_index, seq_ids = [], [], []
    offset = 0
    for local, ((tokens, prompt_len), length, seq) in enumerate(zip(rows, lengths, seqs, strict=True)):
        row, start = (0, offset) if packed else (local, 0)
        num_inputs = len(tokens) - 1
        input_ids_BS[row, start : start + num_inputs] = torch.tensor(tokens[:-1])
        position_ids_BS[row, start : start + length] = torch.arange(length)
        first = start + prompt_len - 1
        responses = tokens[prompt_len:]
        target_ids_BS[row, first : first + len(responses)] = torch.tensor(responses, dtype=torch.long)
        flat_index.append(row * width + torch.arange(first, first + len(responses)))
        token_start = int(batch.cu_seqlens_S1[seq])
        token_index.append(torch.arange(token_start, token_start + len(responses)))
        seq_ids.append(torch.full((len(responses),), local, dtype=torch.long))
        offset += length
    packed_seq_params = _packed_seq_params(lengths, device) if packed else None
    return MicroBatch(
        input_ids_BS=input_ids_BS.to(device),
        position_ids_BS=position_ids_BS.to(device),
        target_ids_BS=target_ids_BS.to(device),
        flat_index_N=torch.cat(flat_index).to(device),
        token_index_N=torch.cat(token_index),
        seq_ids_N=torch.cat(seq_ids).to(device),
        packed_seq_params=packed_seq_params,
    )


def _packed_seq_params(lengths: list[int], device: torch.device) -> PackedSeqParams:
    cu_seqlens_S1 = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens_S1[1:] = torch.cumsum(torch.tensor(lengths), dim=0)
    cu_seqlens_S1 = cu_seqlens_S1.to(device)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens_S1,
        cu_seqlens_kv=cu_seqlens_S1,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )


def plan_micro_batches(
    batch: TrainBatch,
    seqs: list[int],
    *,
    context: Context,
    max_tokens: int,
    packed: bool,
    pad_multiple: int,
    device: torch.device,
) -> list[MicroBatch]:
    """This rank's micro-batches over sequences `seqs` (already this data-parallel rank's share)."""
    lengths = sequence_lengths(batch, context)
    groups = split_by_token_budget(seqs, lengths, max_tokens=max_tokens, padded=not packed)
    return [
        build_micro_batch(batch, group, context=context, packed=packed, pad_multiple=pad_multiple, device=device)
        for group in groups
    ]

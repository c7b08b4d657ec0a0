"""Cut a TrainBatch (a data-parallel rank's share of a step) into token-budgeted micro-batches of model inputs.

Shape legend: S sequence positions of a micro-batch row, B rows, N response tokens in the micro-batch, T response
tokens of the whole batch.

Sequence s is its context prompt (hint-free `train_prompt_ids` for the current policy, `sampled_prompt_ids` for
old logprobs) followed by its response; the model reads tokens[:-1], and response token j is predicted at
position len(prompt) - 1 + j. Three layouts:
  padded: one sequence per row, right-padded to the longest row (causal attention keeps pads out of real
          tokens); works with every layer spec.
  shared prompt: padded, but the sequences of a row share one copy of their prompt. The G samples of a group have
          the same prompt, so a row holds the prompt once and then each response (all but its last token), each
          attending to the prompt and to itself only (an explicit [B, 1, S, S] mask) and positioned as if it
          followed the prompt alone. The last prompt position predicts every response's first token. Outputs and
          gradients equal the padded layout's, for about G times fewer prompt tokens. Needs an arbitrary mask, so
          it is the local spec's (CPU) layout.
  packed: every sequence end to end in one row with cu_seqlens (THD), for Transformer Engine's attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from guide_mega.types import TrainBatch

Context = Literal["train", "sampled"]


@dataclass(kw_only=True)
class MicroBatch:
    """Model inputs for one forward pass and where its response tokens sit in the batch."""

    input_ids_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    flat_index_N: torch.Tensor
    """Positions in the flattened [B * S] inputs that predict response tokens, in batch token order (a shared
    prompt's last position appears once per response)."""
    target_ids_N: torch.Tensor
    """The response token predicted at each of those positions."""
    token_index_N: torch.Tensor
    """Index of each of those tokens in the batch's T response tokens."""
    seq_ids_N: torch.Tensor
    """Micro-batch-local sequence index (0..) of each response token, for per-sequence aggregation."""
    attention_mask_B1SS: torch.Tensor | None = None
    """True where attention is masked, for rows of shared-prompt sequences; None means plain causal attention."""
    packed_seq_params: PackedSeqParams | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_BS.numel())


def _prompt(batch: TrainBatch, seq: int, context: Context) -> list[int]:
    prompt = batch.train_prompt_ids[seq] if context == "train" else batch.sampled_prompt_ids[seq]
    if not prompt:
        raise ValueError(f"TrainBatch sequence {seq} has an empty {context} prompt")
    return list(prompt)


def _response(batch: TrainBatch, seq: int) -> list[int]:
    return batch.response_ids_T[int(batch.cu_seqlens_S1[seq]) : int(batch.cu_seqlens_S1[seq + 1])].tolist()


def sequence_lengths(batch: TrainBatch, context: Context) -> list[int]:
    """Model input length (prompt + response - 1) of every sequence."""
    prompts = batch.train_prompt_ids if context == "train" else batch.sampled_prompt_ids
    responses_S = (batch.cu_seqlens_S1[1:] - batch.cu_seqlens_S1[:-1]).tolist()
    return [len(prompt) + response - 1 for prompt, response in zip(prompts, responses_S, strict=True)]


def row_length(batch: TrainBatch, row: list[int], context: Context, lengths: list[int]) -> int:
    """Input length of a row holding one prompt and the responses of sequences `row` (which share that prompt);
    `lengths` are the sequence_lengths."""
    return sum(lengths[seq] for seq in row) - (len(row) - 1) * len(_prompt(batch, row[0], context))


def shared_prompt_rows(
    batch: TrainBatch, seqs: list[int], context: Context, *, max_tokens: int, lengths: list[int]
) -> list[list[int]]:
    """`seqs` grouped by identical context prompt, each group cut so that its row stays within max_tokens;
    `lengths` are the sequence_lengths."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for seq in seqs:
        by_prompt.setdefault(tuple(_prompt(batch, seq, context)), []).append(seq)
    rows: list[list[int]] = []
    for prompt, group in by_prompt.items():
        row, size = [], len(prompt)
        for seq in group:
            extra = lengths[seq] - len(prompt)
            if row and size + extra > max_tokens:
                rows.append(row)
                row, size = [], len(prompt)
            row.append(seq)
            size += extra
        rows.append(row)
    return rows


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


@dataclass
class _Row:
    """One row's (or, packed, one sequence's) inputs and the response tokens it predicts."""

    inputs: list[int]
    positions: list[int]
    segments: list[int]
    """-1 on the prompt, k on the k-th response's positions."""
    predictions: list[tuple[int, int, int, int]]
    """(position in the row, target token, index in the batch's T tokens, sequence) per response token."""


def _build_row(batch: TrainBatch, seqs: list[int], context: Context) -> _Row:
    """A prompt (shared by `seqs`) followed by each response but its last token, positioned after the prompt."""
    prompt = _prompt(batch, seqs[0], context)
    row = _Row(list(prompt), list(range(len(prompt))), [-1] * len(prompt), [])
    for segment, seq in enumerate(seqs):
        response, start = _response(batch, seq), len(row.inputs)
        first_token = int(batch.cu_seqlens_S1[seq])
        for j, token in enumerate(response):
            position = len(prompt) - 1 if j == 0 else start + j - 1
            row.predictions.append((position, token, first_token + j, seq))
        row.inputs += response[:-1]
        row.positions += range(len(prompt), len(prompt) + len(response) - 1)
        row.segments += [segment] * max(len(response) - 1, 0)
    return row


def _shared_prompt_mask(segments_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S], True where masked: each response sees its prompt and itself causally; pads (segment -2) see
    only pads, so no softmax row is empty."""
    length = segments_BS.shape[1]
    causal_SS = torch.ones(length, length, dtype=torch.bool).tril()
    query_BS1, key_B1S = segments_BS[:, :, None], segments_BS[:, None, :]
    sees_prompt = (key_B1S == -1) & (query_BS1 != -2)
    allowed_BSS = causal_SS & (sees_prompt | (key_B1S == query_BS1))
    return ~allowed_BSS[:, None]


def build_micro_batch(
    batch: TrainBatch, rows: list[list[int]], *, context: Context, packed: bool, pad_multiple: int, device: torch.device
) -> MicroBatch:
    """Inputs for `rows` (each a list of sequences sharing a prompt; one sequence each when packed); every row
    (padded) or every sequence (packed) is padded to pad_multiple."""
    built = [_build_row(batch, seqs, context) for seqs in rows]
    shared = any(len(seqs) > 1 for seqs in rows)
    if packed and shared:
        raise ValueError("packed (THD) micro-batches hold one sequence per prompt; shared prompts need padded rows")
    lengths = [_round_up(len(row.inputs), pad_multiple) for row in built]
    width, num_rows = (sum(lengths), 1) if packed else (max(lengths), len(built))
    input_ids_BS = torch.zeros(num_rows, width, dtype=torch.long)
    position_ids_BS = torch.zeros(num_rows, width, dtype=torch.long)
    segments_BS = torch.full((num_rows, width), -2, dtype=torch.long)
    predictions: list[tuple[int, int, int, int]] = []
    offset = 0
    for index, (row, length) in enumerate(zip(built, lengths, strict=True)):
        row_index, start = (0, offset) if packed else (index, 0)
        input_ids_BS[row_index, start : start + len(row.inputs)] = torch.tensor(row.inputs)
        # Pads continue the row's count (to the row's end when padded), so plain rows keep positions 0..S-1.
        end = start + length if packed else width
        position_ids_BS[row_index, start:end] = torch.tensor(
            row.positions + list(range(len(row.positions), end - start))
        )
        segments_BS[row_index, start : start + len(row.inputs)] = torch.tensor(row.segments)
        predictions += [(row_index * width + start + p, *rest) for p, *rest in row.predictions]
        offset += length
    local = {seq: index for index, seq in enumerate(seq for seqs in rows for seq in seqs)}
    flat, targets, tokens, seqs_N = zip(*predictions, strict=True) if predictions else ((), (), (), ())
    return MicroBatch(
        input_ids_BS=input_ids_BS.to(device),
        position_ids_BS=position_ids_BS.to(device),
        flat_index_N=torch.tensor(flat, dtype=torch.long, device=device),
        target_ids_N=torch.tensor(targets, dtype=torch.long, device=device),
        token_index_N=torch.tensor(tokens, dtype=torch.long),
        seq_ids_N=torch.tensor([local[seq] for seq in seqs_N], dtype=torch.long, device=device),
        attention_mask_B1SS=_shared_prompt_mask(segments_BS).to(device) if shared else None,
        packed_seq_params=_packed_seq_params(lengths, device) if packed else None,
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
    share_prompts: bool,
    pad_multiple: int,
    device: torch.device,
) -> list[MicroBatch]:
    """Micro-batches over sequences `seqs` (this data-parallel rank's: `data_parallel.plan_shares` gave each rank
    its own): rows (one prompt and its sequences, or one sequence) cut into micro-batches of at most max_tokens."""
    seq_lengths = sequence_lengths(batch, context)
    if share_prompts:
        if packed:
            raise ValueError("shared-prompt rows need padded micro-batches, not packed (THD) ones")
        rows = shared_prompt_rows(batch, seqs, context, max_tokens=max_tokens, lengths=seq_lengths)
    else:
        rows = [[seq] for seq in seqs]
    lengths = [row_length(batch, row, context, seq_lengths) for row in rows]
    groups = split_by_token_budget(list(range(len(rows))), lengths, max_tokens=max_tokens, padded=not packed)
    return [
        build_micro_batch(
            batch,
            [rows[index] for index in group],
            context=context,
            packed=packed,
            pad_multiple=pad_multiple,
            device=device,
        )
        for group in groups
    ]

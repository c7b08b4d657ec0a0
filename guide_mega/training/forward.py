"""Run micro-batches through a (pipelined) Megatron model with Megatron's forward-backward schedule.

Shape legend: S sequence positions, B rows, N response tokens of a micro-batch, T response tokens of the batch.

Each stage's forward reads the next micro-batch from the shared iterator (every stage builds the same
micro-batches, so shapes agree); the last stage hands its output to `loss_fn(output, micro_batch)`, which returns
(loss, outputs). Forward-only runs collect the outputs; training runs backpropagate the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from guide_mega.training.micro_batches import MicroBatch

LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@lru_cache(maxsize=8)
def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, S], True above the diagonal (masked), for the local attention spec."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def stage_forward(model: torch.nn.Module, micro_batch: MicroBatch, *, explicit_causal_mask: bool) -> torch.Tensor:
    """This stage's output: hidden states [S, B, H] (values [S, B] for the critic) on the last stage."""
    input_ids_BS = micro_batch.input_ids_BS
    mask = micro_batch.attention_mask_B1SS
    if mask is None and explicit_causal_mask:
        mask = _causal_mask(input_ids_BS.shape[1], input_ids_BS.device)
    return model(
        input_ids=input_ids_BS,
        position_ids=micro_batch.position_ids_BS,
        attention_mask=mask,
        packed_seq_params=micro_batch.packed_seq_params,
    )


def run_schedule(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    loss_fn: LossFn,
    *,
    forward_only: bool,
    explicit_causal_mask: bool,
) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward) over the micro-batches; returns loss_fn's outputs per micro-batch (last stage only).

    loss_fn's loss must already carry its global normalisation: the schedule neither divides by the number of
    micro-batches nor by a token count (`calculate_per_token_loss` with a count of 1).
    """
    data: Iterator[MicroBatch] = iter(micro_batches)

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        output = stage_forward(model, micro_batch, explicit_causal_mask=explicit_causal_mask)

        def loss_func(output_tensor):
            loss, outputs = loss_fn(output_tensor, micro_batch)
            return loss, torch.ones((), dtype=torch.int, device=loss.device), outputs

        return output, loss_func

    max_length = max(micro_batch.input_ids_BS.shape[1] for micro_batch in micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=max_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )


def broadcast_from_last_stage(tensor: torch.Tensor | None, *, shape, dtype, device) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage of this pipeline group."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    group = parallel_state.get_pipeline_model_parallel_group()
    if not parallel_state.is_pipeline_last_stage():
        tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return tensor


def broadcast_object_from_last_stage(value):
    """The last pipeline stage's picklable value on every stage of this pipeline group."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    holder = [value]
    group = parallel_state.get_pipeline_model_parallel_group()
    dist.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return holder[0]

"""Process groups for training: torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's TP/PP/DP groups.

Under torchrun the rank and world size come from the environment; a plain `python` process becomes a world of
one. The data-parallel size is what remains: world_size / (tensor * pipeline * context).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from guide_mega.training.cpu_compat import apply_cpu_shims


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """This rank's place in the parallel layout."""

    tensor: int
    pipeline: int
    context: int
    data: int
    tensor_rank: int
    pipeline_rank: int
    data_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.pipeline - 1


def _init_process_group(backend: str, timeout: datetime.timedelta | None) -> None:
    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    # A single process outside torchrun: an in-memory store is enough for a world of one.
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def init_parallel(
    *, tensor: int = 1, pipeline: int = 1, context: int = 1, seed: int = 1, timeout: datetime.timedelta | None = None
) -> ParallelLayout:
    """Initialise torch.distributed and Megatron's model-parallel groups (idempotent for the same layout; a
    different layout in the same process raises: call `destroy_parallel` first).

    `timeout` bounds every collective (the NCCL watchdog included): ranks wait in one while rank 0 samples, scores or
    evaluates, so the run's parallel.timeout_minutes replaces torch's 10-minute default. None keeps the default."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        apply_cpu_shims()
    _init_process_group("nccl" if on_gpu else "gloo", timeout)
    world_size = dist.get_world_size()
    model_parallel = tensor * pipeline * context
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tensor * pipeline * context = {model_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        existing = current_layout()
        existing_sizes = (existing.tensor, existing.pipeline, existing.context)
        if existing_sizes != (tensor, pipeline, context):
            requested = (tensor, pipeline, context)
            raise ValueError(f"Megatron is already initialised with (TP, PP, CP) = {existing_sizes}, not {requested}")
    else:
        minutes = {} if timeout is None else {"distributed_timeout_minutes": int(timeout.total_seconds() // 60)}
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor,
            pipeline_model_parallel_size=pipeline,
            context_parallel_size=context,
            **minutes,
        )
    if on_gpu:
        # Megatron's CUDA RNG streams (weight init, dropout); on CPU the shimmed tracker needs none.
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> ParallelLayout:
    """The layout of the initialised Megatron groups."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelLayout(
        tensor=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline=parallel_state.get_pipeline_model_parallel_world_size(),
        context=parallel_state.get_context_parallel_world_size(),
        data=parallel_state.get_data_parallel_world_size(),
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""The weight group: a torch.distributed group from the trainer's rank 0 to separate rollout servers.

Rank 0 is this process; the tensor-parallel workers of every SGLang server join it after the server is asked to
(`/init_weights_update_group`): server i's workers take ranks `rank_offsets(tp_sizes)[i] + tp_rank`. Each weight
bucket is then one broadcast from rank 0 that reaches every server at once (slime's `UpdateWeightFromDistributed`
does the same per pipeline stage). The group is built the way SGLang builds its side (`init_custom_process_group`:
a tcp:// rendezvous hosted by rank 0, a store prefixed by the group name), apart from any default group the trainer
has. Two details that only show on a cluster:

- NCCL moves CUDA tensors only: broadcasts go from the current CUDA device on NCCL and from CPU memory on gloo.
- torchrun exports TORCHELASTIC_USE_AGENT_STORE=True, which turns every tcp:// rendezvous of the process into a
  client of a store that torchrun's agent is assumed to host on that port. Nobody hosts one on the weight group's
  port, so rank 0 would wait for its own store until the timeout. Rank 0 builds the group with it set to False (as
  slime's and verl's SGLang weight sync do), restoring it afterwards.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

_AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def rank_offsets(tp_sizes: Sequence[int]) -> list[int]:
    """First rank of each server's workers in the weight group: rank 0 is the trainer, then the servers in order."""
    offsets, next_rank = [], 1
    for tp_size in tp_sizes:
        offsets.append(next_rank)
        next_rank += tp_size
    return offsets


@contextmanager
def own_rendezvous_store() -> Iterator[None]:
    """Within the block, a tcp:// rendezvous at rank 0 hosts its own store even under torchrun (see module doc)."""
    saved = os.environ.get(_AGENT_STORE_ENV)
    os.environ[_AGENT_STORE_ENV] = str(False)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_AGENT_STORE_ENV, None)
        else:
            os.environ[_AGENT_STORE_ENV] = saved


def new_weight_group(
    *, backend: str, master_address: str, master_port: int, world_size: int, group_name: str, timeout_s: float
) -> Any:
    """Rank 0 of the weight group; returns once all `world_size` ranks joined (or raises after `timeout_s`).

    `timeout_s` bounds the rendezvous and every later collective of the group (the NCCL watchdog, gloo's waits).
    """
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    with own_rendezvous_store():
        rendezvous = distributed_c10d.rendezvous(
            f"tcp://{master_address}:{master_port}", 0, world_size, timeout=timeout
        )
        store, _, _ = next(rendezvous)
    store.set_timeout(timeout)
    group, _ = distributed_c10d._new_process_group_helper(
        world_size,
        0,
        [],
        distributed_c10d.Backend(backend),
        distributed_c10d.PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    # Group ranks are global ranks here, as torch.distributed's collectives (and destroy_process_group) look up.
    distributed_c10d._world.pg_group_ranks[group] = {rank: rank for rank in range(world_size)}
    return group


def destroy_weight_group(group: Any) -> None:
    """Release the group and its name (a later group may reuse it)."""
    import torch.distributed as dist

    dist.destroy_process_group(group)


def tensors_for_broadcast(tensors: Sequence[torch.Tensor], backend: str) -> list[torch.Tensor]:
    """The tensors where `backend` can send them, contiguous: on the current CUDA device for NCCL (which rejects CPU
    tensors), in CPU memory for gloo. On NCCL this waits for the current stream, since the broadcast is issued from
    another thread, whose stream does not wait for this one's work (the export, the copies)."""
    placed = []
    for tensor in tensors:
        tensor = tensor.detach()
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
            if tensor.device != device:
                tensor = tensor.to(device)
        elif tensor.device.type != "cpu":
            tensor = tensor.cpu()
        placed.append(tensor.contiguous())
    if backend == "nccl":
        torch.cuda.current_stream().synchronize()
    return placed


def broadcast_from_rank0(group: Any, tensors: Sequence[torch.Tensor]) -> None:
    """Broadcast every tensor from rank 0 (this process) over the group, all in flight at once, and wait for them
    (on NCCL: until the current stream waits for them). The group's own collectives are called: a default process
    group of the trainer does not hold the servers. The tensors' CUDA device is made current, as a new thread
    starts on device 0."""
    on_cuda = bool(tensors) and tensors[0].device.type == "cuda"
    with torch.cuda.device(tensors[0].device) if on_cuda else nullcontext():
        works = [group.broadcast(tensor, 0) for tensor in tensors]
        for work in works:
            work.wait()

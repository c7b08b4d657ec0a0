"""Rollout engines on every GPU group, and one front on rank 0 that spreads each call over all of them.

Colocated with training, every group of `rollout.tensor_parallel` GPUs on a node runs one engine, owned by the
group's first local rank. Rank 0 runs the RL loop; while it samples, the other owners serve: rank 0 scatters each
owner its share of the requests (balanced by expected tokens), every owner generates with its own engine, and rank
0 gathers the completions back in request order. Requests carry their own seeds, so the samples do not depend on
how they were spread. Requests and completions travel over a gloo group of the owners (token ids and logprobs are
small next to a step's compute); weights never do: each owner updates its own engine from the trainer ranks on its
GPUs.

Shape legend: none (token-id lists).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from guide_mega.rollout.engine import WAKE_PARTS, Completion, RolloutEngine, SamplingParams

_GENERATE, _STOP = "generate", "stop"


@dataclass(frozen=True)
class EngineLayout:
    """Which ranks own a rollout engine: the first local rank of every group of `tensor_parallel` ranks."""

    world_size: int
    local_world_size: int
    tensor_parallel: int

    def __post_init__(self) -> None:
        if self.local_world_size % self.tensor_parallel or self.world_size % self.local_world_size:
            raise ValueError(
                f"rollout.tensor_parallel={self.tensor_parallel} must divide the {self.local_world_size} ranks per "
                f"node (world size {self.world_size})"
            )

    @property
    def owners(self) -> list[int]:
        """Global ranks that own an engine, in rank order (rank 0 first)."""
        return [rank for rank in range(self.world_size) if self.local_rank(rank) % self.tensor_parallel == 0]

    def local_rank(self, rank: int) -> int:
        """The rank's index on its node: also the first GPU of the engine it owns (`base_gpu_id`)."""
        return rank % self.local_world_size


def split_by_expected_tokens(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Request indices per shard, balancing the sum of `lengths` (expected tokens): longest first, each to the
    lightest shard so far. Every shard's indices are in increasing order."""
    heap = [(0, shard) for shard in range(num_shards)]
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, shard = heapq.heappop(heap)
        shards[shard].append(index)
        heapq.heappush(heap, (load + lengths[index], shard))
    return [sorted(shard) for shard in shards]


class EngineFleet:
    """Rank 0's `RolloutEngine` over every owner's engine; weights, sleep and wake act on rank 0's own engine (each
    owner looks after its own)."""

    def __init__(self, local_engine: RolloutEngine, *, owners: Sequence[int], group: Any) -> None:
        self.local_engine, self.owners, self.group = local_engine, list(owners), group

    @property
    def num_engines(self) -> int:
        return len(self.owners)

    def generate(
        self, requests: Sequence[Sequence[int]], sampling: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        """Completions in request order, each tagged with the index of the engine that made it
        (`metadata['engine']`)."""
        expected = [len(ids) + sampling.max_new_tokens for ids in requests]
        shards = split_by_expected_tokens(expected, len(self.owners))
        commands = []
        for shard in shards:
            shard_seeds = None if seeds is None else [seeds[i] for i in shard]
            commands.append((_GENERATE, sampling, [list(requests[i]) for i in shard], shard_seeds))
        completions = _run_share(self.local_engine, _scatter(commands, self.group))
        gathered = _gather(completions, self.group, root=True)
        ordered: list[Completion | None] = [None] * len(requests)
        for engine, (shard, outputs) in enumerate(zip(shards, gathered, strict=True)):
            for index, completion in zip(shard, outputs, strict=True):
                completion.metadata["engine"] = engine
                ordered[index] = completion
        return ordered

    def stop_serving(self) -> None:
        """Release the other owners from `serve`: rank 0 will not sample again until the next call."""
        _scatter([(_STOP,)] * len(self.owners), self.group)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.local_engine.update_weights(named_tensors)

    def sleep(self) -> None:
        self.local_engine.sleep()

    def wake(self, *, parts: Sequence[str] = WAKE_PARTS) -> None:
        self.local_engine.wake(parts=parts)

    def close(self) -> None:
        self.local_engine.close()


def serve(local_engine: RolloutEngine, *, group: Any) -> int:
    """An owner other than rank 0: generate the shares rank 0 sends until it says stop; returns the number of
    generate calls served. Collective with rank 0's `EngineFleet` calls."""
    calls = 0
    while True:
        command = _scatter(None, group)
        if command[0] == _STOP:
            return calls
        _gather(_run_share(local_engine, command), group, root=False)
        calls += 1


def _run_share(engine: RolloutEngine, command: tuple) -> list[Completion]:
    _, sampling, requests, seeds = command
    return engine.generate(requests, sampling, seeds=seeds) if requests else []


def _scatter(commands: list | None, group: Any) -> Any:
    received: list[Any] = [None]
    dist.scatter_object_list(received, commands, src=0, group=group)
    return received[0]


def _gather(value: Any, group: Any, *, root: bool) -> list | None:
    gathered = [None] * dist.get_world_size(group) if root else None
    dist.gather_object(value, gathered, dst=0, group=group)
    return gathered

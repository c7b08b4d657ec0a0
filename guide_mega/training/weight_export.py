"""Export a Megatron model as full HF-named tensors, in size-bounded buckets, for rollout engines and HF saves.

Each parameter's tensor-parallel shards are all-gathered, converted to HF layout (`weight_conversion.py`) and
collected into buckets of at most `bucket_bytes` (a single larger tensor is a bucket of its own), so no more than
one bucket of gathered tensors exists at a time. Each pipeline stage converts its own layers; with
`gather_pipeline` the stages broadcast their buckets in order over the pipeline group, so every rank yields the
whole model (what a colocated engine or a single-file save needs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from guide_mega.training.architecture import ModelArchitecture
from guide_mega.training.distributed import ParallelLayout
from guide_mega.training.weight_conversion import from_megatron, weight_rule
from guide_mega.training.weight_loading import stage_layer_offset

HFBucket = list[tuple[str, torch.Tensor]]


def _gather_tensor_parallel(local: torch.Tensor, tp_dim: int | None, layout: ParallelLayout) -> torch.Tensor:
    if tp_dim is None or layout.tensor == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(layout.tensor)]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=tp_dim)


def _stage_buckets(
    model: torch.nn.Module, arch: ModelArchitecture, layout: ParallelLayout, *, bucket_bytes: int, gradients: bool
) -> Iterator[HFBucket]:
    """This stage's HF tensors in buckets; tied output layers under PP are skipped (the embedding is exported)."""
    offset = stage_layer_offset(model)
    bucket: HFBucket = []
    size = 0
    for name, param in model.named_parameters():
        rule = weight_rule(name, arch, layer_offset=offset)
        if rule is None or (name == "output_layer.weight" and arch.tie_word_embeddings):
            continue
        local = param.main_grad if gradients else param.detach()
        full = _gather_tensor_parallel(local, rule.tp_dim, layout)
        for hf_name, tensor in zip(
            rule.hf_names, from_megatron(rule, full, arch, tensor_parallel=layout.tensor), strict=True
        ):
            tensor = tensor.contiguous()
            if bucket and size + tensor.nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((hf_name, tensor))
            size += tensor.nbytes
    if bucket:
        yield bucket


def _broadcast_bucket(bucket: HFBucket | None, source_stage: int, layout: ParallelLayout) -> HFBucket | None:
    """Send the source stage's next bucket (None: it has no more) to the other stages of this pipeline group."""
    group = parallel_state.get_pipeline_model_parallel_group()
    source = dist.get_global_rank(group, source_stage)
    is_source = layout.pipeline_rank == source_stage
    meta = [[(name, tensor.shape, tensor.dtype) for name, tensor in bucket] if is_source and bucket else None]
    dist.broadcast_object_list(meta, src=source, group=group)
    if meta[0] is None:
        return None
    received: HFBucket = []
    for index, (name, shape, dtype) in enumerate(meta[0]):
        tensor = bucket[index][1] if is_source else torch.empty(shape, dtype=dtype, device=layout.device)
        dist.broadcast(tensor, src=source, group=group)
        received.append((name, tensor))
    return received


def iter_hf_weight_buckets(
    model: torch.nn.Module,
    arch: ModelArchitecture,
    layout: ParallelLayout,
    *,
    bucket_bytes: int = 512 << 20,
    gather_pipeline: bool = True,
    gradients: bool = False,
) -> Iterator[HFBucket]:
    """Buckets of (hf_name, full tensor) pairs. Every rank of a stage must iterate (TP all-gathers are collective);
    with gather_pipeline every rank of the pipeline group must iterate too, and all of them yield every bucket.
    gradients=True exports the data-parallel-reduced gradients (Megatron DDP's main_grad) in the same layout."""
    if not gather_pipeline or layout.pipeline == 1:
        yield from _stage_buckets(model, arch, layout, bucket_bytes=bucket_bytes, gradients=gradients)
        return
    for source_stage in range(layout.pipeline):
        own = _stage_buckets(model, arch, layout, bucket_bytes=bucket_bytes, gradients=gradients)
        while True:
            bucket = next(own, None) if layout.pipeline_rank == source_stage else None
            bucket = _broadcast_bucket(bucket, source_stage, layout)
            if bucket is None:
                break
            yield bucket


def export_hf_weights(
    model: torch.nn.Module,
    arch: ModelArchitecture,
    layout: ParallelLayout,
    *,
    bucket_bytes: int = 512 << 20,
    gather_pipeline: bool = True,
    gradients: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, full tensor) pairs, produced bucket by bucket (see `iter_hf_weight_buckets`)."""
    for bucket in iter_hf_weight_buckets(
        model, arch, layout, bucket_bytes=bucket_bytes, gather_pipeline=gather_pipeline, gradients=gradients
    ):
        yield from bucket

"""Per-GPU memory of one RL step, phase by phase, for a config on its cluster (the `cluster` section).

Trainer (every GPU; the pipeline stage that needs the most, per phase):
  weights      P_stage x dtype bytes, P_stage = the stage's parameters / TP (norms replicated)
  gradients    4 P_stage: Megatron DDP's fp32 gradient buffer (`grad_reduce_in_fp32`, training/optimizer.py)
  optimizer    (4 + 8) P_stage / DP: the distributed optimizer's shard of fp32 main weights (16-bit models only)
               and Adam's two fp32 moments
  activations  `activations.py`, for the micro-batches in flight: 1F1B keeps PP - stage of them on stage `stage`
A critic (estimator gae) adds its own weights, gradients and optimizer shards (its LM head frozen); a reference
model (kl_coef > 0) its weights.

Rollout engines, SGLang: weights at the engine's TP (KV heads replicated past kv_heads), and a KV-cache pool of
    mem_fraction x capacity - weights
per GPU, SGLang's rule (`mem_fraction_static` of the memory free when the engine starts) for an engine started
before the trainer allocates. HF engines hold the whole model and the KV cache of `rollout.batch_size` sequences.

Colocated (no rollout.sglang_urls), the step's phases on a GPU are generation (engine awake; the trainer's
weights, gradients and optimizer state resident), weight sync (engine weights resumed, KV cache still released,
the export's buckets) and training (engine asleep, trainer activations). With separate servers the trainer GPUs
train and export, and each server GPU holds an engine. Every phase also carries a runtime reserve per process
(CUDA context, NCCL communicators, CUDA graphs, allocator fragmentation), an assumption the plan cannot derive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from guide_mega.config import Config
from guide_mega.planning import activations as act
from guide_mega.planning.architectures import ModelShape, kv_heads_per_gpu

GIB = float(1 << 30)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ENGINE_DTYPE_BYTES = 2  # SGLang and GPU HF engines run in bf16 (KV cache too)


@dataclass(frozen=True, kw_only=True)
class Reserves:
    """Per-GPU memory outside the plan's formulas (GiB)."""

    trainer_gib: float = 5.0
    """Trainer process: CUDA context (~0.5), NCCL communicators of the TP, PP, DP and embedding groups, allocator
    fragmentation."""
    engine_gib: float = 3.0
    """Engine process: CUDA context, its TP communicator, CUDA graphs and decode activations outside the static
    pool; kept while the engine sleeps (the memory saver releases weights and KV cache only)."""


@dataclass(kw_only=True)
class Phase:
    """One phase of a step on one GPU: components (bytes) against the capacity."""

    name: str
    where: str
    capacity: float
    components: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.components.values())

    @property
    def headroom(self) -> float:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0


@dataclass(frozen=True, kw_only=True)
class EnginePlan:
    """The rollout engines: how many, where, and what fits in their KV cache."""

    kind: str
    placement: str
    tensor_parallel: int
    count: int | None
    gpus: int | None
    weights: float
    kv_cache: float
    kv_tokens_per_engine: int
    sequence_tokens: int
    kv_cache_if_started_after_trainer: float | None = None

    @property
    def sequences_per_engine(self) -> int:
        return self.kv_tokens_per_engine // self.sequence_tokens


@dataclass(kw_only=True)
class MemoryPlan:
    """Everything `guide-mega plan` prints."""

    shape: ModelShape
    layout: act.TrainerLayout
    world_size: int
    gpus_per_node: int
    capacity: float
    micro_batch_tokens: int
    engine: EnginePlan
    phases: list[Phase]
    step_sequences: int
    notes: list[str] = field(default_factory=list)


def stage_params(shape: ModelShape, layout: act.TrainerLayout, stage: int, *, critic: bool = False) -> dict[str, int]:
    """Parameters one GPU of pipeline stage `stage` holds: {'trained': ..., 'frozen': ...} (the critic's LM head is
    frozen; its value head is trained)."""
    tp, pp = layout.tensor, layout.pipeline
    layers = shape.layers // pp
    trained = layers * (shape.layer_sharded_params() // tp + shape.layer_replicated_params())
    vocab_rows = shape.padded_vocab(tp) // tp * shape.hidden
    frozen = 0
    if stage == 0:
        trained += vocab_rows
    if stage == pp - 1:
        trained += shape.hidden  # final norm
        if critic:
            frozen += vocab_rows
            trained += shape.hidden + 1
        elif not shape.tied or pp > 1:  # a tied LM head under PP is a copy of the embedding on the last stage
            trained += vocab_rows
    return {"trained": trained, "frozen": frozen}


def model_state_bytes(params: dict[str, int], layout: act.TrainerLayout) -> dict[str, float]:
    """Weights, fp32 gradient buffer and distributed-optimizer shards of one model on one GPU."""
    b, trained = layout.dtype_bytes, params["trained"]
    main_params = act.FP32 if b < act.FP32 else 0  # an fp32 model's main weights are its own parameters
    return {
        "weights": (trained + params["frozen"]) * b,
        "gradients": trained * act.FP32,
        "optimizer": trained * (main_params + 2 * act.FP32) / layout.data,
    }


def trainer_layout(config: Config, world_size: int) -> act.TrainerLayout:
    """The policy's layout, or ValueError naming what the cluster or the model cannot split."""
    parallel = config.parallel
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if parallel.context > 1:
        raise ValueError("parallel.context > 1: the Megatron backend does not support context parallelism yet")
    if world_size % model_parallel:
        raise ValueError(
            f"parallel.tensor x pipeline = {model_parallel} does not divide the cluster's {world_size} GPUs "
            f"(cluster.nodes x cluster.gpus_per_node)"
        )
    return act.TrainerLayout(
        tensor=parallel.tensor,
        pipeline=parallel.pipeline,
        data=world_size // model_parallel,
        sequence_parallel=parallel.sequence_parallel,
        dtype_bytes=DTYPE_BYTES[config.model.dtype],
        recompute=config.model.recompute,
    )


def check_splits(shape: ModelShape, layout: act.TrainerLayout, engine_tp: int) -> None:
    """ValueError when Megatron or SGLang cannot split the model as asked."""
    if shape.heads % layout.tensor or shape.kv_heads % layout.tensor:
        raise ValueError(
            f"parallel.tensor={layout.tensor} must divide {shape.name}'s {shape.heads} attention heads and "
            f"{shape.kv_heads} KV heads"
        )
    if shape.layers % layout.pipeline:
        raise ValueError(f"parallel.pipeline={layout.pipeline} does not divide {shape.name}'s {shape.layers} layers")
    if shape.heads % engine_tp:
        raise ValueError(f"rollout.tensor_parallel={engine_tp} does not divide {shape.name}'s {shape.heads} heads")
    kv_heads_per_gpu(shape, engine_tp)


def engine_weight_bytes(shape: ModelShape, tensor_parallel: int, dtype_bytes: int = ENGINE_DTYPE_BYTES) -> float:
    """One GPU's share of an engine's weights: sharded over TP, KV projections replicated past kv_heads."""
    query_width = shape.heads * shape.head_dim / tensor_parallel
    kv_width = 2 * kv_heads_per_gpu(shape, tensor_parallel) * shape.head_dim
    attention = shape.hidden * (2 * query_width + kv_width) + ((query_width + kv_width) if shape.qkv_bias else 0)
    layer = attention + 3 * shape.hidden * shape.intermediate / tensor_parallel + shape.layer_replicated_params()
    vocab = shape.vocab * shape.hidden * (1 if shape.tied else 2) / tensor_parallel
    return (shape.layers * layer + vocab + shape.hidden) * dtype_bytes


def _engine_count(config: Config, world_size: int) -> tuple[str, int | None, int | None]:
    """(placement, engines, GPUs that generate)."""
    rollout, cluster = config.rollout, config.cluster
    if rollout.engine == "sglang" and rollout.sglang_urls:
        count = len(rollout.sglang_urls)
        return (
            f"separate servers ({count} URLs, each TP {rollout.tensor_parallel})",
            count,
            count * rollout.tensor_parallel,
        )
    if cluster.gpus_per_node % rollout.tensor_parallel:
        raise ValueError(
            f"rollout.tensor_parallel={rollout.tensor_parallel} does not divide cluster.gpus_per_node="
            f"{cluster.gpus_per_node}: colocated engines are groups of GPUs within a node"
        )
    count = world_size // rollout.tensor_parallel
    per_node = cluster.gpus_per_node // rollout.tensor_parallel
    sleeps = "sleeps while training" if config.train.colocate else "stays awake while training"
    # An HF engine is not tensor-parallel: its group's first GPU holds it whole.
    return f"colocated, {per_node} per node, {sleeps}", count, count if rollout.engine == "hf" else world_size


def plan_engine(config: Config, shape: ModelShape, world_size: int, capacity: float) -> EnginePlan:
    """The engines' layout and per-GPU weights and KV cache (see the module docstring)."""
    rollout = config.rollout
    placement, count, gpus = _engine_count(config, world_size)
    sequence_tokens = config.data.max_prompt_tokens + rollout.max_new_tokens
    if rollout.engine == "hf":
        weights = engine_weight_bytes(shape, 1)
        kv_tokens = rollout.batch_size * sequence_tokens
        kv = kv_tokens * shape.kv_bytes_per_token(1, ENGINE_DTYPE_BYTES)
        return EnginePlan(kind="HF", placement=placement, tensor_parallel=1, count=count, gpus=gpus,
                          weights=weights, kv_cache=kv, kv_tokens_per_engine=kv_tokens,
                          sequence_tokens=sequence_tokens)  # fmt: skip
    weights = engine_weight_bytes(shape, rollout.tensor_parallel)
    kv = rollout.sglang_mem_fraction * capacity - weights
    per_token = shape.kv_bytes_per_token(rollout.tensor_parallel, ENGINE_DTYPE_BYTES)
    return EnginePlan(kind="SGLang", placement=placement, tensor_parallel=rollout.tensor_parallel, count=count,
                      gpus=gpus, weights=weights, kv_cache=kv, kv_tokens_per_engine=max(0, math.floor(kv / per_token)),
                      sequence_tokens=sequence_tokens)  # fmt: skip


def resident_bytes(config: Config, shape: ModelShape, layout: act.TrainerLayout, stage: int) -> dict[str, float]:
    """What stays on a GPU of `stage` for the whole step: each model's weights, gradients and optimizer shards."""
    dtype = config.model.dtype
    policy = model_state_bytes(stage_params(shape, layout, stage), layout)
    parts = {
        f"policy weights ({dtype})": policy["weights"],
        "policy gradients (fp32 buffer)": policy["gradients"],
        f"policy optimizer shards (fp32 main + Adam m, v; / DP {layout.data})": policy["optimizer"],
    }
    if config.algorithm.estimator == "gae":
        critic = model_state_bytes(stage_params(shape, layout, stage, critic=True), layout)
        parts["critic weights, gradients, optimizer shards"] = sum(critic.values())
    if config.algorithm.kl_coef > 0:
        parts[f"reference weights ({dtype})"] = policy["weights"]
    return parts


def training_bytes(
    shape: ModelShape, layout: act.TrainerLayout, stage: int, micro_batch: act.MicroBatchShape
) -> dict[str, float]:
    """The training peak's activations on `stage`: 1F1B keeps PP - stage micro-batches in flight; the backward adds
    one layer's working set or, on the last stage, the LM-head logprob backward (whichever is larger)."""
    in_flight = layout.pipeline - stage
    last = stage == layout.pipeline - 1
    per_micro_batch = shape.layers // layout.pipeline * act.saved_per_layer(shape, layout, micro_batch)
    if last:
        per_micro_batch += act.head_saved_bytes(shape, layout, micro_batch)
    transient = act.backward_transient_bytes(shape, layout, micro_batch)
    workspace = act.logprob_workspace_bytes(shape, layout, micro_batch) if last else 0.0
    name = (
        f"activations ({in_flight} micro-batch{'es' if in_flight > 1 else ''} in flight, recompute {layout.recompute})"
    )
    if workspace > transient:
        return {name: in_flight * per_micro_batch, "LM-head logprob backward (one [chunk, V/TP] block)": workspace}
    return {name: in_flight * per_micro_batch, "backward working set (one layer)": transient}


def export_bytes(config: Config, shape: ModelShape, layout: act.TrainerLayout) -> float:
    """Weight export's peak: one bucket, plus the largest tensor gathered over TP (shards and the concatenation)."""
    largest = max(shape.vocab, 2 * shape.intermediate, (shape.heads + 2 * shape.kv_heads) * shape.head_dim)
    return config.rollout.weight_bucket_mb * 2**20 + 2 * largest * shape.hidden * layout.dtype_bytes


def _stage_name(layout: act.TrainerLayout, stage: int) -> str:
    return "every GPU" if layout.pipeline == 1 else f"stage {stage} of {layout.pipeline}"


def _worst(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda phase: phase.total)


def _phase(name: str, where: str, capacity: float, *parts: dict[str, float]) -> Phase:
    components: dict[str, float] = {}
    for part in parts:
        components.update(part)
    return Phase(name=name, where=where, capacity=capacity, components=components)


def step_phases(
    config: Config,
    shape: ModelShape,
    layout: act.TrainerLayout,
    engine: EnginePlan,
    capacity: float,
    reserves: Reserves,
) -> list[Phase]:
    """The step's phases, each at the GPU (pipeline stage) where it needs the most."""
    micro_batch = micro_batch_shape(config)
    trainer = {"trainer runtime reserve": reserves.trainer_gib * GIB}
    awake = {
        f"engine weights (TP {engine.tensor_parallel})": engine.weights,
        "engine runtime reserve": reserves.engine_gib * GIB,
    }
    kv = {"engine KV cache": max(0.0, engine.kv_cache)}
    asleep = {"engine runtime reserve (asleep)": reserves.engine_gib * GIB}
    export = {"weight export (bucket + largest gathered tensor)": export_bytes(config, shape, layout)}
    separate = config.rollout.engine == "sglang" and bool(config.rollout.sglang_urls)
    during_training = asleep if config.train.colocate else {**awake, **kv}
    phases = []
    for name, parts in _phase_parts(separate, trainer, awake, kv, export, during_training):
        candidates = []
        for stage in range(layout.pipeline):
            stage_parts = [resident_bytes(config, shape, layout, stage), *parts]
            if name.startswith("training"):
                stage_parts.insert(1, training_bytes(shape, layout, stage, micro_batch))
            candidates.append(_phase(name, _stage_name(layout, stage), capacity, *stage_parts))
        phases.append(_worst(candidates))
    if separate:
        phases.append(_phase("generation", "server GPU", capacity, awake, kv))
    return phases


def _phase_parts(separate: bool, trainer: dict, awake: dict, kv: dict, export: dict, during_training: dict):
    """(phase name, components besides the trainer's resident state) in step order."""
    if separate:
        return [("weight sync", [trainer, export]), ("training", [trainer])]
    return [
        ("generation", [trainer, awake, kv]),
        ("weight sync", [trainer, awake, export]),
        ("training", [trainer, during_training]),
    ]


def micro_batch_shape(config: Config) -> act.MicroBatchShape:
    """The planned micro-batch: one packed row of train.micro_batch_tokens (at least one whole sequence, which is
    never split), every token a response token (the upper bound for the LM head's share)."""
    tokens = max(config.train.micro_batch_tokens, config.data.max_prompt_tokens + config.rollout.max_new_tokens)
    return act.MicroBatchShape(rows=1, row_length=tokens, response_tokens=tokens)


def plan_memory(config: Config, shape: ModelShape, reserves: Reserves = Reserves()) -> MemoryPlan:
    """The memory plan of `config` on `config.cluster` (ValueError for a layout the cluster or model cannot take)."""
    cluster = config.cluster
    world_size = cluster.nodes * cluster.gpus_per_node
    capacity = cluster.gpu_memory_gib * GIB
    layout = trainer_layout(config, world_size)
    check_splits(shape, layout, config.rollout.tensor_parallel if config.rollout.engine == "sglang" else 1)
    engine = plan_engine(config, shape, world_size, capacity)
    phases = step_phases(config, shape, layout, engine, capacity, reserves)
    plan = MemoryPlan(
        shape=shape,
        layout=layout,
        world_size=world_size,
        gpus_per_node=cluster.gpus_per_node,
        capacity=capacity,
        micro_batch_tokens=micro_batch_shape(config).tokens,
        engine=engine,
        phases=phases,
        step_sequences=config.train.prompts_per_step * config.rollout.group_size,
    )
    plan.notes.extend(_notes(config, plan, reserves))
    return plan


def _notes(config: Config, plan: MemoryPlan, reserves: Reserves) -> list[str]:
    """What the table does not show: an engine started after the trainer allocates gets a smaller pool."""
    engine = plan.engine
    if engine.kind != "SGLang" or config.rollout.sglang_urls:
        return []
    generation = next(phase for phase in plan.phases if phase.name == "generation")
    resident = sum(v for k, v in generation.components.items() if k.startswith(("policy", "critic", "reference")))
    free = plan.capacity - resident - reserves.trainer_gib * GIB
    after = config.rollout.sglang_mem_fraction * free - engine.weights
    verdict = "SGLang refuses to start" if after <= 0 else f"{after / GIB:.1f} GiB"
    return [
        f"engines must start before the trainer allocates: started after it, SGLang sizes the KV pool from the free "
        f"memory (mem_fraction x {free / GIB:.1f} GiB - weights): {verdict}"
    ]

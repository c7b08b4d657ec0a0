"""The memory plan as text: a header, one markdown table (components x phases, GiB per GPU), the rollout line, and
the one-line verdict when something does not fit (`guide-mega plan` prints it last)."""

from __future__ import annotations

import math

from guide_mega.planning.memory import GIB, MemoryPlan, Phase


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _header(plan: MemoryPlan, source: str) -> list[str]:
    shape, layout = plan.shape, plan.layout
    nodes = plan.world_size // plan.gpus_per_node
    params = shape.num_params() / 1e9
    return [
        f"plan: {source} on {nodes} node{'s' if nodes > 1 else ''} x {plan.gpus_per_node} GPUs "
        f"({plan.capacity / GIB:.1f} GiB each)",
        f"model: {shape.name} ({shape.source}): {params:.2f} B parameters, {shape.layers} layers, hidden "
        f"{shape.hidden}, {shape.heads} heads / {shape.kv_heads} KV heads, MLP {shape.intermediate}, vocab "
        f"{shape.vocab} (padded to {shape.padded_vocab(layout.tensor)} at TP {layout.tensor})",
        f"trainer: TP {layout.tensor} x PP {layout.pipeline} x DP {layout.data}, sequence parallel "
        f"{'on' if layout.sequence_parallel else 'off'}, recompute {layout.recompute}, micro-batches of "
        f"{plan.micro_batch_tokens} tokens, {shape.layers // layout.pipeline} layers per stage",
    ]


def _rollout_lines(plan: MemoryPlan) -> list[str]:
    engine = plan.engine
    count = "?" if engine.count is None else str(engine.count)
    lines = [
        f"rollout: {count} {engine.kind} engine{'s' if engine.count != 1 else ''} x TP {engine.tensor_parallel} "
        f"({engine.placement}); {engine.gpus} GPU{' generates' if engine.gpus == 1 else 's generate'}"
    ]
    share = "" if not engine.count else f", {math.ceil(plan.step_sequences / engine.count)} per engine"
    lines.append(
        f"  per engine GPU: weights {_gib(engine.weights)} GiB, KV cache {_gib(engine.kv_cache)} GiB = "
        f"{engine.kv_tokens_per_engine:,} tokens per engine = {engine.sequences_per_engine} sequences of "
        f"{engine.sequence_tokens} tokens (prompt + max_new_tokens) at once; a step samples "
        f"{plan.step_sequences} sequences{share}"
    )
    return lines


def phase_table(phases: list[Phase]) -> list[str]:
    """Markdown: one row per component (GiB per GPU), one column per phase, then total, capacity, headroom."""
    rows: list[str] = []
    for phase in phases:
        rows.extend(name for name in phase.components if name not in rows)
    header = "| GiB per GPU | " + " | ".join(f"{phase.name} ({phase.where})" for phase in phases) + " |"
    lines = [header, "|---|" + "---:|" * len(phases)]
    for name in rows:
        cells = [_gib(phase.components[name]) if name in phase.components else "" for phase in phases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, value in (("**total**", "total"), ("capacity", "capacity"), ("headroom", "headroom")):
        cells = [_gib(getattr(phase, value)) for phase in phases]
        lines.append(f"| {label} | " + " | ".join(f"**{cell}**" if label == "**total**" else cell for cell in cells))
        lines[-1] += " |"
    return lines


def format_plan(plan: MemoryPlan, source: str) -> str:
    """Everything `guide-mega plan` prints for a config that `source` names."""
    lines = _header(plan, source) + _rollout_lines(plan) + [""] + phase_table(plan.phases)
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def overflow_message(plan: MemoryPlan) -> str | None:
    """One line naming the phase that does not fit and its largest components; None when everything fits."""
    mode = plan.engine.placement.split(",")[0].split(" (")[0]
    for phase in plan.phases:
        if not phase.fits:
            largest = sorted(phase.components.items(), key=lambda item: -item[1])[:3]
            parts = ", ".join(f"{name} {_gib(value)} GiB" for name, value in largest)
            return (
                f"plan: {mode} {phase.name} phase ({phase.where}) needs {_gib(phase.total)} GiB per GPU, "
                f"{_gib(phase.capacity)} available ({parts})"
            )
    engine = plan.engine
    if engine.kv_tokens_per_engine < engine.sequence_tokens:
        return (
            f"plan: {mode} generation phase: the KV cache gets {_gib(engine.kv_cache)} GiB per GPU, less than one "
            f"sequence of {engine.sequence_tokens} tokens (engine weights {_gib(engine.weights)} GiB at TP "
            f"{engine.tensor_parallel}): raise rollout.tensor_parallel or rollout.sglang_mem_fraction"
        )
    return None

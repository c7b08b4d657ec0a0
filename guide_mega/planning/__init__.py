"""What fits on the GPUs: per-GPU memory of the trainer and the rollout engines for a config (`guide-mega plan`).

`architectures` gives a model's shape (from its config.json, or a table of the models the shipped configs name),
`memory` the bytes per GPU per phase of a step, `report` the table and the one-line verdict. Nothing here imports
torch, megatron or sglang: planning a 72B run needs neither the weights nor a GPU.
"""

from guide_mega.planning.architectures import KNOWN_MODELS, ModelShape, model_shape
from guide_mega.planning.memory import MemoryPlan, Phase, plan_memory
from guide_mega.planning.report import format_plan, overflow_message

__all__ = [
    "KNOWN_MODELS",
    "MemoryPlan",
    "ModelShape",
    "Phase",
    "format_plan",
    "model_shape",
    "overflow_message",
    "plan_memory",
]

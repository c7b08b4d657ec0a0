"""`guide-mega convert`: HF <-> Megatron checkpoints. The command's arguments map onto
`guide_mega.training.checkpoint_conversion` (the Megatron backend owns the checkpoint format), which does the work:

    guide-mega convert hf-to-megatron /models/Qwen2.5-Math-7B /ckpt/qwen-megatron
    torchrun --nproc-per-node 2 -m guide_mega.cli convert hf-to-megatron SRC OUT --tensor 2
    guide-mega convert megatron-to-hf runs/x/checkpoints/step_100 /models/x-step100 --hf-config /models/Qwen2.5-Math-7B

Both directions are collective: under torchrun every rank converts its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from guide_mega.config import ParallelConfig
from guide_mega.training.checkpoint_conversion import Dtype, hf_to_megatron, megatron_to_hf

Direction = Literal["hf-to-megatron", "megatron-to-hf"]
DIRECTIONS: tuple[str, ...] = ("hf-to-megatron", "megatron-to-hf")


def convert(
    direction: Direction,
    source: str | Path,
    output: str | Path,
    *,
    hf_config: str | Path | None = None,
    tensor: int | None = None,
    pipeline: int | None = None,
    dtype: Dtype | None = None,
) -> Path:
    """Convert `source` into `output` (written atomically) and return it.

    hf_config: megatron-to-hf of a trainer checkpoint, the HF model directory it was trained from. tensor /
    pipeline: the parallel layout to build (default: one process, or the checkpoint's layout when reading one).
    dtype: default the source's (float32 for anything but bfloat16).
    """
    parallel = None
    if tensor or pipeline:
        parallel = ParallelConfig(tensor=tensor or 1, pipeline=pipeline or 1)
    if direction == "hf-to-megatron":
        return hf_to_megatron(source, output, parallel=parallel, dtype=dtype)
    if direction == "megatron-to-hf":
        return megatron_to_hf(source, output, hf_config_dir=hf_config, parallel=parallel, dtype=dtype)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

"""`guide-mega convert`: HF <-> Megatron checkpoints. The command's arguments map onto
`guide_mega.training.checkpoint_conversion` (the Megatron backend owns the checkpoint format), which does the work:

    guide-mega convert hf-to-megatron /models/Qwen2.5-Math-7B /ckpt/qwen-megatron
    torchrun --nproc-per-node 2 -m guide_mega.cli convert hf-to-megatron SRC OUT --tensor 2
    guide-mega convert megatron-to-hf runs/x/checkpoints/step_100 /models/x-step100

A trainer checkpoint holds no HF config: its base model is `--hf-config` when given, else the model.path of the
run's own resolved `config.yaml` (beside `checkpoints/`). Model paths may be `embedded:NAME` or a hub id in the
local HF cache. Both directions are collective: under torchrun every rank converts its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from guide_mega.config import ParallelConfig, load_config
from guide_mega.data.embedded_model import resolve_model_path

if TYPE_CHECKING:
    from guide_mega.training.checkpoint_conversion import Dtype

Direction = Literal["hf-to-megatron", "megatron-to-hf"]
DIRECTIONS: tuple[str, ...] = ("hf-to-megatron", "megatron-to-hf")
# The resolved config every run writes into its run directory (run_log.RunLog).
RUN_CONFIG_FILE = "config.yaml"


def find_run_config(checkpoint: str | Path) -> Path | None:
    """The `config.yaml` of the run that wrote trainer checkpoint `checkpoint` (`<run_dir>/checkpoints/step_<n>`,
    so the run directory is its grandparent; a checkpoint.dir of its own puts it in the parent); None if neither."""
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_dir():  # embedded:NAME, a hub id: no run of ours
        return None
    for directory in (checkpoint.parent.parent, checkpoint.parent):
        if (directory / RUN_CONFIG_FILE).is_file():
            return directory / RUN_CONFIG_FILE
    return None


def base_model_dir(checkpoint: str | Path, hf_config: str | None = None) -> Path | None:
    """The HF directory whose config (and tokenizer) a Megatron checkpoint needs: `hf_config` when given, None when
    the checkpoint stored its own (a converted one), else the model.path of its run's config.yaml."""
    from guide_mega.training.checkpoint_conversion import HF_CONFIG_DIR

    if hf_config is not None:
        return resolve_model_path(hf_config)
    if (Path(checkpoint) / HF_CONFIG_DIR / "config.json").is_file():
        return None
    run_config = find_run_config(checkpoint)
    if run_config is None:
        raise ValueError(
            f"{checkpoint}: a trainer checkpoint without its run's {RUN_CONFIG_FILE} two levels up; pass "
            "--hf-config BASE_MODEL (the run's model.path: a directory, embedded:NAME or a cached hub id)"
        )
    return resolve_model_path(load_config(run_config).model.path)


def convert(
    direction: Direction,
    source: str | Path,
    output: str | Path,
    *,
    hf_config: str | None = None,
    tensor: int | None = None,
    pipeline: int | None = None,
    dtype: Dtype | None = None,
) -> Path:
    """Convert `source` into `output` (written atomically) and return it.

    hf_config: megatron-to-hf of a trainer checkpoint, the HF model it was trained from (default: from its run's
    config.yaml). tensor / pipeline: the parallel layout to build (default: one process, or the checkpoint's
    layout when reading one). dtype: default the source's (float32 for anything but bfloat16).
    """
    from guide_mega.preflight import check_model_dir
    from guide_mega.training.checkpoint import METADATA_FILE
    from guide_mega.training.checkpoint_conversion import hf_to_megatron, megatron_to_hf

    parallel = None
    if tensor or pipeline:
        parallel = ParallelConfig(tensor=tensor or 1, pipeline=pipeline or 1)
    if direction == "hf-to-megatron":
        model_dir = resolve_model_path(str(source))
        check_model_dir(model_dir, key="source")
        return hf_to_megatron(model_dir, output, parallel=parallel, dtype=dtype)
    if direction == "megatron-to-hf":
        if not (Path(source) / METADATA_FILE).is_file():
            raise ValueError(f"source: {source} is not a Megatron checkpoint (no {METADATA_FILE})")
        base = base_model_dir(source, hf_config)
        return megatron_to_hf(source, output, hf_config_dir=base, parallel=parallel, dtype=dtype)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

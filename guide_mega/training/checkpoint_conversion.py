"""HF <-> Megatron checkpoints, through the weight conversion the trainer itself uses (`guide-mega convert`).

A converted Megatron checkpoint is a directory with the model's sharded weights (Megatron `dist_checkpointing`,
key "model", no optimizer state), `hf_config/` (the HF config, tokenizer and generation files: what rebuilds the
architecture and what an HF export needs beside the weights) and `guide_mega.json` (layout, dtype, layer spec,
weight fingerprint and a file manifest, as in the trainer's checkpoints). `megatron_to_hf` also reads the trainer's
resume checkpoints (`<root>/step_<n>`), which hold no HF files: their HF config comes from `hf_config_dir` (the
run's model.path).

Both directions are collective: run them in one process, or under torchrun with tensor x pipeline processes to
shard a large model (every rank builds only its own shard). The command-line layer is `guide_mega/convert.py`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from guide_mega.config import ParallelConfig
from guide_mega.training.architecture import ModelArchitecture, read_architecture, transformer_config
from guide_mega.training.checkpoint import (
    FINGERPRINT_RTOL,
    HF_WEIGHT_SUFFIXES,
    MANIFEST_KEY,
    METADATA_FILE,
    CheckpointError,
    checkpoint_failures_as_errors,
    file_manifest,
    save_hf_checkpoint,
    single_threaded_cpu_ops,
    verify_checkpoint,
    weight_fingerprint,
)
from guide_mega.training.distributed import ParallelLayout, init_parallel
from guide_mega.training.model import HiddenStatesGPTModel, build_gpt_model, transformer_engine_available
from guide_mega.training.weight_loading import load_hf_weights

Dtype = Literal["float32", "bfloat16"]
HF_CONFIG_DIR = "hf_config"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layer_spec() -> str:
    """Which Megatron layer spec this machine builds; its parameter names (hence checkpoint keys) differ."""
    return "transformer_engine" if transformer_engine_available() else "local"


def _hf_dtype(hf_dir: Path) -> Dtype:
    """The HF checkpoint's own dtype when we train in it (bfloat16), else float32, which holds fp16 exactly."""
    hf = json.loads((hf_dir / "config.json").read_text())
    return "bfloat16" if (hf.get("torch_dtype") or hf.get("dtype")) == "bfloat16" else "float32"


def _build_model(
    arch: ModelArchitecture, parallel: ParallelConfig, dtype: Dtype
) -> tuple[HiddenStatesGPTModel, ParallelLayout]:
    """This rank's stage of the policy architecture, with untrained weights (loaded by the caller)."""
    layout = init_parallel(tensor=parallel.tensor, pipeline=parallel.pipeline)
    config = transformer_config(
        arch,
        tensor_parallel=parallel.tensor,
        pipeline_parallel=parallel.pipeline,
        sequence_parallel=False,
        dtype=_DTYPES[dtype],
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    module = build_gpt_model(arch, config, layout)
    module.requires_grad_(False)
    return module, layout


def _copy_hf_config(hf_dir: Path, destination: Path) -> None:
    destination.mkdir(parents=True)
    for source in hf_dir.iterdir():
        if source.is_file() and not source.name.endswith(HF_WEIGHT_SUFFIXES):
            shutil.copy2(source, destination / source.name)


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    parallel: ParallelConfig | None = None,
    dtype: Dtype | None = None,
) -> Path:
    """Write the HF checkpoint `hf_dir` as a Megatron checkpoint `out_dir` (atomically: built in a temporary
    sibling and renamed). dtype None keeps bfloat16 checkpoints in bfloat16 and stores anything else in float32."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    parallel = parallel or ParallelConfig()
    dtype = dtype or _hf_dtype(hf_dir)
    arch = read_architecture(hf_dir)
    module, layout = _build_model(arch, parallel, dtype)
    load_hf_weights(module, hf_dir, arch, layout)
    temporary = out_dir.with_name(f".tmp_{out_dir.name}")
    if _is_writer():
        shutil.rmtree(temporary, ignore_errors=True)
        _copy_hf_config(hf_dir, temporary / HF_CONFIG_DIR)
    _barrier()
    with single_threaded_cpu_ops(), checkpoint_failures_as_errors(temporary, "saving"):
        dist_checkpointing.save({"model": module.sharded_state_dict()}, str(temporary))
    fingerprint = weight_fingerprint(module)
    _barrier()
    files = file_manifest(temporary)
    if _is_writer():
        metadata = {
            "contents": "model",
            "tensor_parallel": layout.tensor,
            "pipeline_parallel": layout.pipeline,
            "dtype": dtype,
            "layer_spec": _layer_spec(),
            "weight_fingerprint": fingerprint,
            MANIFEST_KEY: files,
        }
        (temporary / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        temporary.rename(out_dir)
    _barrier()
    return out_dir


def _hf_config_source(checkpoint_dir: Path, hf_config_dir: str | Path | None) -> Path:
    """Where the checkpoint's HF config lives: the given directory, else the one a conversion stored."""
    if hf_config_dir is not None:
        return Path(hf_config_dir)
    stored = checkpoint_dir / HF_CONFIG_DIR
    if (stored / "config.json").is_file():
        return stored
    raise ValueError(
        f"{checkpoint_dir} holds no {HF_CONFIG_DIR}/config.json (a trainer checkpoint): pass the HF model directory "
        "it was trained from (the run's model.path) as hf_config_dir / --hf-config"
    )


def load_megatron_checkpoint(
    checkpoint_dir: str | Path,
    *,
    hf_config_dir: str | Path | None = None,
    parallel: ParallelConfig | None = None,
    dtype: Dtype | None = None,
) -> tuple[HiddenStatesGPTModel, ModelArchitecture, ParallelLayout, Path]:
    """This rank's model stage loaded from a converted or trainer checkpoint: (module, arch, layout, HF config dir).

    parallel None uses the layout the checkpoint was written with; dtype None the recorded dtype (float32 when
    none is recorded: a trainer's bfloat16 weights load into it exactly). Raises CheckpointError for a missing,
    truncated or corrupt file, a checkpoint of the other layer spec, or weights that do not match the fingerprint.
    """
    checkpoint_dir = Path(checkpoint_dir)
    metadata = verify_checkpoint(checkpoint_dir)
    recorded_spec = metadata.get("layer_spec", _layer_spec())
    if recorded_spec != _layer_spec():
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} was written with the {recorded_spec} layer spec; this machine builds the "
            f"{_layer_spec()} one, whose parameter names differ"
        )
    config_dir = _hf_config_source(checkpoint_dir, hf_config_dir)
    arch = read_architecture(config_dir)
    parallel = parallel or ParallelConfig(tensor=metadata["tensor_parallel"], pipeline=metadata["pipeline_parallel"])
    requested = dtype or metadata.get("dtype", "float32")
    module, layout = _build_model(arch, parallel, requested)
    with checkpoint_failures_as_errors(checkpoint_dir, "loading"):
        loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(checkpoint_dir))
    with torch.no_grad():
        module.load_state_dict(loaded["model"])
    fingerprint, expected = weight_fingerprint(module), metadata["weight_fingerprint"]
    # A narrower dtype than the one written rounds the weights: the fingerprint only holds without a cast.
    is_exact = dtype is None or dtype == metadata.get("dtype")
    if is_exact and abs(fingerprint - expected) > FINGERPRINT_RTOL * max(abs(expected), 1.0):
        raise CheckpointError(
            f"checkpoint {checkpoint_dir}: loaded weights' fingerprint {fingerprint!r} != recorded {expected!r}"
        )
    return module, arch, layout, config_dir


def megatron_to_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config_dir: str | Path | None = None,
    parallel: ParallelConfig | None = None,
    dtype: Dtype | None = None,
) -> Path:
    """Write a converted or trainer Megatron checkpoint as an HF safetensors checkpoint `out_dir` that transformers
    loads (atomically), with the config and tokenizer files of its HF config directory. Options as in
    `load_megatron_checkpoint`."""
    module, arch, layout, config_dir = load_megatron_checkpoint(
        checkpoint_dir, hf_config_dir=hf_config_dir, parallel=parallel, dtype=dtype
    )
    return save_hf_checkpoint(out_dir, module=module, arch=arch, layout=layout, source_dir=config_dir)

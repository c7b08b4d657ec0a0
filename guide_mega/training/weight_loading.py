"""Load an HF safetensors checkpoint into this rank's tensor- and pipeline-parallel shard of a Megatron model.

Every rank opens the safetensors files lazily and reads only the tensors its own parameters need; each parameter
is converted to the full Megatron layout (`weight_conversion.py`) and sliced to this rank's tensor-parallel shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from guide_mega.training.architecture import ModelArchitecture
from guide_mega.training.distributed import ParallelLayout
from guide_mega.training.weight_conversion import shard, to_megatron, weight_rule

# Buffers some checkpoints store that have no parameter counterpart (RoPE frequencies are recomputed).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_index(checkpoint_dir: str | Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (sharded checkpoints have an index json)."""
    directory = Path(checkpoint_dir)
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {name: directory / file_name for name, file_name in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def stage_layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first decoder layer (Megatron's layer_number is 1-based and global)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def load_hf_weights(
    model: torch.nn.Module,
    checkpoint_dir: str | Path,
    arch: ModelArchitecture,
    layout: ParallelLayout,
    *,
    critic: bool = False,
) -> None:
    """Copy the HF checkpoint's tensors into `model` (an unwrapped GPTModel stage), converting and sharding them.

    Raises KeyError naming the missing tensor, ValueError naming a parameter whose shape does not match, and
    (on every rank) ValueError listing HF tensors that no parameter of any rank consumed.
    """
    index = safetensors_index(checkpoint_dir)
    offset = stage_layer_offset(model)
    used: set[str] = set()
    with ExitStack() as stack, torch.no_grad():
        handles = {path: stack.enter_context(safe_open(path, framework="pt")) for path in set(index.values())}
        for name, param in model.named_parameters():
            rule = weight_rule(name, arch, layer_offset=offset, critic=critic)
            if rule is None:
                continue
            missing = [hf_name for hf_name in rule.hf_names if hf_name not in index]
            if missing:
                raise KeyError(f"{checkpoint_dir}: tensor {missing[0]!r} (for Megatron {name!r}) is missing")
            hf_tensors = [handles[index[hf_name]].get_tensor(hf_name).float() for hf_name in rule.hf_names]
            full = to_megatron(rule, hf_tensors, arch, tensor_parallel=layout.tensor)
            local = shard(full, rule, tensor_parallel=layout.tensor, tensor_rank=layout.tensor_rank)
            if local.shape != param.shape:
                raise ValueError(
                    f"{checkpoint_dir}: {rule.hf_names} give {tuple(local.shape)} for Megatron {name!r} "
                    f"of shape {tuple(param.shape)}"
                )
            param.copy_(local)
            used.update(rule.hf_names)
    _check_all_consumed(index, used, checkpoint_dir, critic=critic)


def _check_all_consumed(index: dict[str, Path], used: Iterable[str], checkpoint_dir, *, critic: bool) -> None:
    """Every HF tensor must feed some rank's parameter; a leftover means a conversion rule is missing."""
    everything = set(used)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[set[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, everything)
        everything = set().union(*gathered)
    leftover = sorted(name for name in index if name not in everything and not name.endswith(_IGNORED_HF_SUFFIXES))
    if critic:
        # The critic has no LM head; a tied checkpoint's lm_head (if stored) or an untied one is not needed.
        leftover = [name for name in leftover if name != "lm_head.weight"]
    if leftover:
        raise ValueError(f"{checkpoint_dir}: {len(leftover)} tensors have no Megatron parameter, e.g. {leftover[:3]}")

"""HF <-> Megatron parameter names and layouts for the Llama-3 / Qwen2 / Qwen3 decoders (pure tensor code).

Shape legend: H hidden size, F MLP intermediate size, V vocabulary (Vp padded), D head dim, Q query heads,
K key/value heads (query groups), G = Q / K query heads per group, P tensor-parallel size.

A Megatron parameter has a "full" layout (what one rank would hold at TP=1, except for the gate/up fusion, whose
full layout depends on P, see below) that is sharded along `tp_dim` into P equal slices:

    linear_qkv.weight  [K (G + 2) D, H]  per query group g: its G query heads, then its key head, then its value
                                         head. Sharding dim 0 hands each rank K / P whole groups, as Megatron's
                                         attention expects. The qkv bias [K (G + 2) D] is interleaved the same way.
    linear_fc1.weight  [2 F, H]          the concatenation over ranks p of [gate_p; up_p], where gate_p and up_p
                                         are rank p's slices of gate_proj and up_proj (Megatron's SwiGLU splits
                                         each local shard in half), so that sharding dim 0 yields [gate_p; up_p].
    word embeddings / output layer [Vp, H]   rows V..Vp-1 are zero padding.
    linear_proj.weight [H, Q D] and linear_fc2.weight [H, F]  are row-parallel (sharded on dim 1); norms are
                                         replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from guide_mega.training.architecture import ModelArchitecture

Transform = Literal["copy", "qkv", "gate_up", "vocab"]


@dataclass(frozen=True, kw_only=True)
class WeightRule:
    """How one Megatron parameter is made from (and turned back into) HF tensors."""

    hf_names: tuple[str, ...]
    transform: Transform
    tp_dim: int | None
    """Dimension along which the full tensor is split over tensor-parallel ranks; None when replicated."""


# Per-layer parameters: Megatron suffix -> (HF suffixes, transform, tp_dim). Both layer specs are listed: the local
# spec keeps norms as separate modules, Transformer Engine fuses them into the following linear layer.
_LAYER_RULES: dict[str, tuple[tuple[str, ...], Transform, int | None]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "copy", None),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "copy", None),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
        0,
    ),
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
        0,
    ),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "copy", None),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "copy", None),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "copy", 1),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "copy", None),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "copy", None),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up", 0),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "copy", 1),
}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def weight_rule(
    megatron_name: str, arch: ModelArchitecture, *, layer_offset: int = 0, critic: bool = False
) -> WeightRule | None:
    """The rule for a Megatron parameter name, or None for parameters with no HF counterpart (the critic's head).

    `layer_offset` is the global index of this pipeline stage's first layer (names carry local indices).
    Raises KeyError naming the parameter when it is unknown.
    """
    if megatron_name == "embedding.word_embeddings.weight":
        return WeightRule(hf_names=("model.embed_tokens.weight",), transform="vocab", tp_dim=0)
    if megatron_name == "decoder.final_layernorm.weight":
        return WeightRule(hf_names=("model.norm.weight",), transform="copy", tp_dim=None)
    if megatron_name == "output_layer.weight":
        if critic:
            return None
        # A tied model's last stage under PP keeps its own copy of the embedding as the output layer.
        source = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return WeightRule(hf_names=(source,), transform="vocab", tp_dim=0)
    if megatron_name.startswith("value_head."):
        return None
    match = _LAYER_NAME.match(megatron_name)
    if match is None or match.group(2) not in _LAYER_RULES:
        raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")
    layer = int(match.group(1)) + layer_offset
    hf_suffixes, transform, tp_dim = _LAYER_RULES[match.group(2)]
    return WeightRule(
        hf_names=tuple(f"model.layers.{layer}.{suffix}" for suffix in hf_suffixes), transform=transform, tp_dim=tp_dim
    )


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArchitecture) -> torch.Tensor:
    """q [Q D, ...], k, v [K D, ...] -> [K (G + 2) D, ...] grouped per query group."""
    groups, head_dim = arch.num_key_value_heads, arch.head_dim
    rest = q.shape[1:]
    q_K = q.reshape(groups, -1, *rest)
    k_K = k.reshape(groups, head_dim, *rest)
    v_K = v.reshape(groups, head_dim, *rest)
    return torch.cat([q_K, k_K, v_K], dim=1).reshape(-1, *rest)


def _split_qkv(qkv: torch.Tensor, arch: ModelArchitecture) -> list[torch.Tensor]:
    """Inverse of `_interleave_qkv`: [K (G + 2) D, ...] -> q [Q D, ...], k [K D, ...], v [K D, ...]."""
    groups, head_dim = arch.num_key_value_heads, arch.head_dim
    q_per_group = arch.num_attention_heads // groups * head_dim
    rest = qkv.shape[1:]
    q_K, k_K, v_K = qkv.reshape(groups, -1, *rest).split([q_per_group, head_dim, head_dim], dim=1)
    return [part.reshape(-1, *rest) for part in (q_K, k_K, v_K)]


def to_megatron(
    rule: WeightRule, hf_tensors: list[torch.Tensor], arch: ModelArchitecture, *, tensor_parallel: int
) -> torch.Tensor:
    """The full Megatron tensor from the rule's HF tensors (in `rule.hf_names` order)."""
    if rule.transform == "copy":
        return hf_tensors[0]
    if rule.transform == "qkv":
        return _interleave_qkv(*hf_tensors, arch)
    if rule.transform == "gate_up":
        gate_chunks = hf_tensors[0].chunk(tensor_parallel, dim=0)
        up_chunks = hf_tensors[1].chunk(tensor_parallel, dim=0)
        return torch.cat([part for pair in zip(gate_chunks, up_chunks, strict=True) for part in pair], dim=0)
    if rule.transform == "vocab":
        table_VH = hf_tensors[0]
        padding = arch.padded_vocab_size(tensor_parallel) - table_VH.shape[0]
        return torch.cat([table_VH, table_VH.new_zeros(padding, *table_VH.shape[1:])], dim=0)
    raise ValueError(f"unknown transform {rule.transform!r}")


def from_megatron(
    rule: WeightRule, full: torch.Tensor, arch: ModelArchitecture, *, tensor_parallel: int
) -> list[torch.Tensor]:
    """The rule's HF tensors (in `rule.hf_names` order) from the full Megatron tensor."""
    if rule.transform == "copy":
        return [full]
    if rule.transform == "qkv":
        return _split_qkv(full, arch)
    if rule.transform == "gate_up":
        pairs = [chunk.chunk(2, dim=0) for chunk in full.chunk(tensor_parallel, dim=0)]
        return [torch.cat([pair[0] for pair in pairs]), torch.cat([pair[1] for pair in pairs])]
    if rule.transform == "vocab":
        return [full[: arch.vocab_size]]
    raise ValueError(f"unknown transform {rule.transform!r}")


def shard(full: torch.Tensor, rule: WeightRule, *, tensor_parallel: int, tensor_rank: int) -> torch.Tensor:
    """This rank's slice of a full tensor."""
    if rule.tp_dim is None:
        return full
    return full.chunk(tensor_parallel, dim=rule.tp_dim)[tensor_rank]

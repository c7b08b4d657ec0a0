"""The dense decoder architectures we train, read from an HF checkpoint's config.json, and their Megatron config.

Supported families: Llama-3 (model_type "llama"), Qwen2 / Qwen2.5 ("qwen2": bias on q/k/v) and Qwen3 ("qwen3":
RMSNorm on each query and key head). All are pre-norm RMSNorm decoders with GQA, a SwiGLU MLP and rotate-half
RoPE, which Megatron's GPTModel expresses with the settings in `transformer_config`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Megatron pads the vocabulary of the embedding and output layer to a multiple of this (times TP) so that the
# shards have GEMM-friendly sizes; the padded rows are zero and never enter a softmax.
VOCAB_PAD_MULTIPLE = 128
# Llama-3.1 RoPE scaling constants that Megatron's RotaryEmbedding hard-codes (only `factor` is configurable).
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True, kw_only=True)
class ModelArchitecture:
    """What Megatron needs to know about an HF decoder checkpoint."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    """Llama-3.1 style RoPE scaling factor; None when the checkpoint uses plain RoPE."""
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        multiple = VOCAB_PAD_MULTIPLE * tensor_parallel
        return math.ceil(self.vocab_size / multiple) * multiple


def _rope_settings(hf: dict, source: str) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None) from the rope fields (transformers 4.x and 5.x spellings)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported (only default and llama3)")
    for key, expected in _MEGATRON_LLAMA3_ROPE.items():
        if float(scaling.get(key, expected)) != expected:
            raise ValueError(f"{source}: rope_scaling.{key}={scaling[key]} differs from Megatron's fixed {expected}")
    return theta, float(scaling["factor"])


def read_architecture(checkpoint_dir: str | Path) -> ModelArchitecture:
    """Parse `checkpoint_dir/config.json`; raises ValueError naming the file and the unsupported key."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in HF checkpoint directory {checkpoint_dir}")
    hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError(f"{path}: llama attention_bias / mlp_bias are not supported")
    rope_theta, rope_scaling_factor = _rope_settings(hf, str(path))
    num_heads = hf["num_attention_heads"]
    return ModelArchitecture(
        model_type=model_type,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=num_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling_factor=rope_scaling_factor,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
    )


_RECOMPUTE = {"none": {}, "selective": {"recompute_granularity": "selective"}}
_RECOMPUTE["full"] = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def fusion_options(fused: bool) -> dict[str, bool]:
    """Megatron's RoPE, SwiGLU and gradient-accumulation fusions: on with Transformer Engine (which Megatron's
    config checks for them), off without."""
    return {"apply_rope_fusion": fused, "bias_activation_fusion": fused, "gradient_accumulation_fusion": fused}


def transformer_config(
    arch: ModelArchitecture,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    sequence_parallel: bool,
    dtype: torch.dtype,
    recompute: str = "none",
    use_cpu_initialization: bool,
    fused: bool = False,
) -> TransformerConfig:
    """The Megatron TransformerConfig equivalent to the HF architecture, for the given parallel layout.

    fused=True (Transformer Engine present: its layer spec, packed sequences) turns on Megatron's fusions: the fused
    RoPE (the unfused one takes a Python path with a host sync per layer on packed sequences), the fused SwiGLU
    and gradient accumulation into the main gradients inside TE's linear layers. Without TE they stay off: they
    need Apex or TE. Dropout is 0 as in the HF checkpoints; losses are normalised by us
    (`calculate_per_token_loss`), see `train_step.py`.
    """
    if recompute not in _RECOMPUTE:
        raise ValueError(f"model.recompute must be one of {list(_RECOMPUTE)}, got {recompute!r}")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **fusion_options(fused),
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        # The HF weights overwrite the random init, but Megatron only tags weights as tensor-parallel (which the
        # gradient norm and clipping rely on) inside its init functions.
        perform_initialization=True,
        calculate_per_token_loss=True,
        # Micro-batches have different lengths, so pipeline stages exchange shapes before activations; Megatron
        # rejects that combination for the (unused, dense model) MoE allgather dispatcher, hence alltoall.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        deallocate_pipeline_outputs=True,
        **_RECOMPUTE[recompute],
    )

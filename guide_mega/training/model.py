"""Megatron GPTModel construction for the policy and the critic, on the local (CPU) or Transformer-Engine (GPU) spec.

Shape legend: S sequence positions, B rows of a micro-batch, H hidden size.

The last pipeline stage returns the final normalised hidden states [S, B, H] rather than logits: the policy
turns them into per-token logprobs with the fused LM-head kernel (`logprobs.py`), so the [tokens, vocab] logits
are never materialised, and the critic maps them to values with its scalar head.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig

from guide_mega.training.architecture import ModelArchitecture
from guide_mega.training.distributed import ParallelLayout


def transformer_engine_available() -> bool:
    """Transformer Engine needs CUDA; on CPU machines the local spec is used."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def transformer_engine_version() -> str:
    """The installed Transformer Engine's version ('' when it is not installed)."""
    try:
        return importlib.metadata.version("transformer_engine")
    except importlib.metadata.PackageNotFoundError:
        return ""


# Transformer Engine up to 2.10 has no attention backend for fp32 packed (THD) sequences.
_FIRST_TE_WITH_FP32_THD = (2, 11)


def check_packed_attention_dtype(dtype: torch.dtype, te_version: str) -> None:
    """Refuse an fp32 model with packed sequences on a Transformer Engine that cannot attend over them in fp32,
    with a message that says what to change (rather than TE's own failure deep inside the first forward)."""
    if dtype != torch.float32:
        return
    release = tuple(int(part) for part in te_version.split("+")[0].split(".")[:2] if part.isdigit())
    if release < _FIRST_TE_WITH_FP32_THD:
        raise ValueError(
            f"model.dtype=float32 with Transformer Engine {te_version or '(unknown version)'}: TE before "
            f"{'.'.join(map(str, _FIRST_TE_WITH_FP32_THD))} has no fp32 attention for packed sequences; "
            "use model.dtype=bfloat16 or a newer Transformer Engine"
        )


class HiddenStatesGPTModel(GPTModel):
    """GPTModel whose last stage returns the final-norm hidden states [S, B, H] instead of logits.

    The output layer keeps its (vocabulary-parallel) weight, read by `output_weight()` for the fused LM head.
    """

    def _postprocess(self, hidden_states, *args, **kwargs):
        return hidden_states

    def _preprocess(self, input_ids, position_ids, *args, packed_seq_params=None, **kwargs):
        """GPTModel's, with RoPE at each row's own position ids when they are not 0..S-1 (shared-prompt rows,
        where a response is positioned right after its prompt wherever it sits in the row).

        GPTModel ignores position_ids for RoPE and rotates position s of every row by s; the rotary frequencies
        [S, 1, 1, D] are re-indexed here to [S, B, 1, D], which the unfused rotary path broadcasts per row.
        """
        output = super()._preprocess(input_ids, position_ids, *args, packed_seq_params=packed_seq_params, **kwargs)
        freqs_S11D = output[1]
        if freqs_S11D is None or position_ids is None or packed_seq_params is not None:
            return output
        positions_S = torch.arange(position_ids.shape[1], device=position_ids.device)
        if torch.equal(position_ids, positions_S.expand_as(position_ids)):
            return output
        if self.config.context_parallel_size > 1 or self.config.apply_rope_fusion:
            raise ValueError("per-row position ids need context_parallel_size 1 and the unfused rotary embedding")
        freqs_SB1D = freqs_S11D[:, 0, 0][position_ids.transpose(0, 1)].unsqueeze(2)
        return (output[0], freqs_SB1D, *output[2:])

    def output_weight(self) -> torch.Tensor:
        """The local vocabulary shard of the LM-head weight [V_padded / TP, H] (the embedding when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


class CriticGPTModel(HiddenStatesGPTModel):
    """The value model: the policy's decoder with a scalar head on the last stage (returns values [S, B]).

    The head is replicated over tensor-parallel ranks; under sequence parallelism its gradient is partial per
    rank, which the `sequence_parallel` attribute tells Megatron to all-reduce.
    """

    def __init__(self, config: TransformerConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        if self.post_process:
            self.value_head = torch.nn.Linear(config.hidden_size, 1, bias=True, dtype=config.params_dtype)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            for param in self.value_head.parameters():
                param.sequence_parallel = config.sequence_parallel
            # The LM head is unused by the critic: keep it out of the optimizer and the gradient buffers.
            if self.output_layer.weight is not None:
                self.output_layer.weight.requires_grad_(False)

    def _postprocess(self, hidden_states, *args, **kwargs):
        if not self.post_process:
            return hidden_states
        return self.value_head(hidden_states).squeeze(-1)


def build_gpt_model(
    arch: ModelArchitecture,
    config: TransformerConfig,
    layout: ParallelLayout,
    *,
    critic: bool = False,
) -> HiddenStatesGPTModel:
    """This rank's pipeline stage of the policy (or critic) model, uninitialised: load weights with weight_loading."""
    if transformer_engine_available():
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    model_cls = CriticGPTModel if critic else HiddenStatesGPTModel
    model = model_cls(
        config,
        transformer_layer_spec=spec,
        vocab_size=arch.padded_vocab_size(layout.tensor),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and not critic,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    # The local spec's torch norms ignore params_dtype and stay fp32: in a bf16 model their inputs are bf16, so
    # torch cannot use its fused RMSNorm (measured on an H200, where it warned at every layer). HF keeps them in
    # the model dtype too.
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != config.params_dtype:
            param.data = param.data.to(config.params_dtype)
    return model.to(layout.device)

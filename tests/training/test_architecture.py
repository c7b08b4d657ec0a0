"""HF config.json -> ModelArchitecture -> Megatron TransformerConfig."""

import json

import pytest
import torch

from guide_mega.training.architecture import read_architecture, transformer_config


def test_families_are_read_with_their_features(tiny_checkpoints):
    llama = read_architecture(tiny_checkpoints["llama"])
    qwen2 = read_architecture(tiny_checkpoints["qwen2"])
    qwen3 = read_architecture(tiny_checkpoints["qwen3"])
    assert (llama.rope_scaling_factor, llama.rope_theta, llama.tie_word_embeddings) == (8.0, 500000.0, False)
    assert qwen2.qkv_bias and qwen2.tie_word_embeddings and not qwen2.qk_norm
    assert qwen3.qk_norm and qwen3.head_dim == 24 and not qwen3.qkv_bias
    assert qwen3.num_key_value_heads == 2 and qwen3.num_attention_heads == 4
    assert llama.padded_vocab_size(1) == 384 and llama.padded_vocab_size(2) == 512


def test_transformer_config_mirrors_the_architecture(tiny_checkpoints):
    arch = read_architecture(tiny_checkpoints["qwen3"])
    config = transformer_config(
        arch, tensor_parallel=1, pipeline_parallel=1, sequence_parallel=False, dtype=torch.float32,
        recompute="full", use_cpu_initialization=True,
    )  # fmt: skip
    assert (config.kv_channels, config.num_query_groups, config.qk_layernorm) == (24, 2, True)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and not config.add_bias_linear
    assert config.recompute_granularity == "full" and config.calculate_per_token_loss


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
    ],
)
def test_unsupported_configs_name_the_file_and_key(tiny_checkpoints, tmp_path, fields, message):
    config = json.loads((tiny_checkpoints["qwen2"] / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(ValueError, match=message) as error:
        read_architecture(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)


def test_missing_config_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_architecture(tmp_path)


def test_sequence_parallel_without_transformer_engine_is_refused(tiny_checkpoints, single_process_megatron):
    from guide_mega.config import ModelConfig, ParallelConfig
    from guide_mega.training.distributed import init_parallel
    from guide_mega.training.model import transformer_engine_available
    from guide_mega.training.model_runner import ModelRunner

    if transformer_engine_available():
        pytest.skip("Transformer Engine supports sequence parallelism")
    arch = read_architecture(tiny_checkpoints["qwen2"])
    with pytest.raises(ValueError, match="sequence_parallel needs Transformer Engine"):
        ModelRunner(
            tiny_checkpoints["qwen2"], arch, init_parallel(), model=ModelConfig(dtype="float32"),
            parallel=ParallelConfig(tensor=2, sequence_parallel=True), micro_batch_tokens=64,
        )  # fmt: skip


def test_fusions_follow_transformer_engine(tiny_checkpoints):
    """With TE the fusions are on (Megatron refuses them without TE, so only their absence is built here)."""
    from guide_mega.training.architecture import fusion_options

    assert fusion_options(True) == dict.fromkeys(fusion_options(False), True)
    names = ("apply_rope_fusion", "bias_activation_fusion", "gradient_accumulation_fusion")
    assert set(fusion_options(True)) == set(names)
    arch = read_architecture(tiny_checkpoints["llama"])
    plain = transformer_config(arch, tensor_parallel=1, pipeline_parallel=1, sequence_parallel=False,
                               dtype=torch.bfloat16, use_cpu_initialization=True)  # fmt: skip
    assert not any(getattr(plain, name) for name in names)


@pytest.mark.parametrize(
    ("dtype", "version", "refused"),
    [(torch.float32, "2.10.0", True), (torch.float32, "2.8.0+cu12", True), (torch.float32, "2.11.0", False),
     (torch.bfloat16, "2.8.0", False), (torch.float32, "", True)],
)  # fmt: skip
def test_fp32_packed_attention_needs_a_recent_transformer_engine(dtype, version, refused):
    from guide_mega.training.model import check_packed_attention_dtype

    if refused:
        with pytest.raises(ValueError, match="model.dtype=float32 with Transformer Engine .*use model.dtype=bfloat16"):
            check_packed_attention_dtype(dtype, version)
    else:
        check_packed_attention_dtype(dtype, version)

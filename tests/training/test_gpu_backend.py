"""GPU-only checks of the backend: the Transformer Engine layer spec with THD packing, in fp32 and bf16.

Run by scripts/gpu_check.sh (pytest -m gpu). Shapes stay tiny: these test wiring and numerics, not speed.
"""

import pytest
import torch
from tiny_models import hf_response_logprobs, make_train_batch
from transformers import AutoModelForCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
FAMILIES = ("llama", "qwen2", "qwen3")


@pytest.fixture
def no_tf32():
    """fp32 parity needs true fp32 GEMMs on both sides."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def test_transformer_engine_spec_and_packing_are_used(tiny_checkpoints, single_process_megatron):
    pytest.importorskip("transformer_engine")
    from policy_probes import make_policy

    policy = make_policy(tiny_checkpoints["qwen3"])
    assert policy.runner.packed
    names = [name for name, _ in policy.module.named_parameters()]
    assert any(name.endswith("linear_qkv.layer_norm_weight") for name in names), names
    micro_batch = policy.runner.micro_batches(make_train_batch(), [0, 1, 2], "train")[0]
    assert micro_batch.packed_seq_params is not None and micro_batch.input_ids_BS.shape[0] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logprobs_match_transformers_on_gpu(family, tiny_checkpoints, single_process_megatron, no_tf32):
    from policy_probes import make_policy

    batch = make_train_batch()
    logprobs_T = make_policy(tiny_checkpoints[family]).compute_logprobs(batch, context="sampled")
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family]).cuda().eval()
    hf_T = hf_response_logprobs(hf_model, batch, context="sampled").cpu()
    assert (logprobs_T - hf_T).abs().max() <= 1e-3


def test_micro_batch_split_invariance_with_packing(tiny_checkpoints, single_process_megatron, no_tf32):
    from policy_probes import FOUR_MICRO_BATCH_TOKENS, loss_and_gradients, make_policy

    loss, gradients = loss_and_gradients(make_policy(tiny_checkpoints["qwen2"]), make_train_batch())
    split = make_policy(tiny_checkpoints["qwen2"], micro_batch_tokens=FOUR_MICRO_BATCH_TOKENS)
    split_loss, split_gradients = loss_and_gradients(split, make_train_batch())
    assert split_loss == pytest.approx(loss, rel=1e-5)
    for name, tensor in gradients.items():
        torch.testing.assert_close(split_gradients[name], tensor, atol=1e-5, rtol=1e-3, msg=name)


def test_bf16_guide_steps_decrease_the_loss(tiny_checkpoints, single_process_megatron):
    from guide_mega.config import (
        AlgorithmConfig,
        GuideConfig,
        ModelConfig,
        OptimizerConfig,
        ParallelConfig,
        TrainConfig,
    )
    from guide_mega.training.policy import MegatronPolicy

    policy = MegatronPolicy(
        model=ModelConfig(path=str(tiny_checkpoints["llama"]), dtype="bfloat16"),
        parallel=ParallelConfig(),
        algorithm=AlgorithmConfig(guide=GuideConfig(enabled=True)),
        optimizer=OptimizerConfig(lr=1e-3),
        train=TrainConfig(micro_batch_tokens=64, prompts_per_step=1),
        total_optimizer_steps=10,
    )
    from policy_probes import train_step

    batch = make_train_batch()
    old_logprobs_T = policy.compute_old_logprobs(batch)
    losses = [train_step(policy, batch, old_logprobs_T=old_logprobs_T)["loss"] for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_bf16_logprobs_and_loss_are_within_tolerance_of_fp32(tiny_checkpoints, single_process_megatron, no_tf32):
    """The same Guide step in bf16 and in fp32 on one GPU, both against the fp32 policy's old logprobs: the bf16
    logprobs and loss agree with fp32 to bf16 precision (2^-8 per rounded value, compounded over the layers)."""
    from policy_probes import make_policy, train_step

    batch = make_train_batch()
    fp32, bf16 = make_policy(tiny_checkpoints["qwen2"]), make_policy(tiny_checkpoints["qwen2"], dtype="bfloat16")
    fp32_T, bf16_T = fp32.compute_logprobs(batch), bf16.compute_logprobs(batch)
    assert (bf16_T - fp32_T).abs().mean() < 3e-2 and (bf16_T - fp32_T).abs().max() < 0.25
    old_T = fp32.compute_old_logprobs(batch)
    fp32_loss = train_step(fp32, batch, old_logprobs_T=old_T)["loss"]
    bf16_loss = train_step(bf16, batch, old_logprobs_T=old_T)["loss"]
    assert bf16_loss == pytest.approx(fp32_loss, rel=5e-2, abs=5e-3)

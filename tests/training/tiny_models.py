"""Tiny random HF checkpoints (Llama-3, Qwen2, Qwen3) written with save_pretrained, for CPU tests (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

# Vocabulary size deliberately not a multiple of TP * 128, so padding of the vocabulary is exercised.
TINY_VOCAB = 301
_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_config(family: str, *, tied: bool, num_layers: int = 2):
    """An HF config of the family ('llama', 'qwen2', 'qwen3') with tiny sizes."""
    common = {**_COMMON, "num_hidden_layers": num_layers, "tie_word_embeddings": tied}
    if family == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        rope |= {"original_max_position_embeddings": 8192, "rope_theta": 500000.0}
        return LlamaConfig(**{**common, "max_position_embeddings": 16384}, rope_parameters=rope)
    if family == "qwen2":
        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen3":
        rope = {"rope_type": "default", "rope_theta": 1000000.0}
        return Qwen3Config(**common, head_dim=24, rope_parameters=rope)
    raise ValueError(f"unknown tiny model family {family!r}")


def save_tiny_model(directory: str | Path, family: str, *, tied: bool = False, num_layers: int = 2, seed: int = 0):
    """Random weights (non-zero biases and norm weights, so every tensor matters) saved as safetensors."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied=tied, num_layers=num_layers))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return model.eval()


def make_train_batch(
    *,
    num_groups: int = 4,
    group_size: int = 2,
    guided_groups: tuple[int, ...] = (1,),
    seed: int = 0,
    shared_prompts: bool = True,
):
    """A deterministic TrainBatch: random prompts and responses; guided groups get a longer (hinted) sampled prompt,
    at hint level group index % 2.
    The sequences of a group share their prompt, as in RL (so training rows share it), unless shared_prompts=False
    gives every sequence its own."""
    from guide_mega.types import TrainBatch

    generator = torch.Generator().manual_seed(seed)
    num_seqs = num_groups * group_size
    group_ids_S = torch.arange(num_groups).repeat_interleave(group_size)
    is_guided_S = torch.tensor([int(group) in guided_groups for group in group_ids_S], dtype=torch.bool)
    num_prompts = num_groups if shared_prompts else num_seqs
    prompt_lengths = torch.randint(2, 9, (num_prompts,), generator=generator).tolist()
    prompts = [torch.randint(0, TINY_VOCAB, (length,), generator=generator).tolist() for length in prompt_lengths]
    train_prompts = [prompts[group if shared_prompts else seq] for seq, group in enumerate(group_ids_S.tolist())]
    hint = torch.randint(0, TINY_VOCAB, (4,), generator=generator).tolist()
    sampled_prompts = [
        prompt + hint if guided else prompt for prompt, guided in zip(train_prompts, is_guided_S.tolist(), strict=True)
    ]
    response_lengths_S = torch.randint(1, 9, (num_seqs,), generator=generator)
    cu_seqlens_S1 = torch.zeros(num_seqs + 1, dtype=torch.long)
    cu_seqlens_S1[1:] = torch.cumsum(response_lengths_S, dim=0)
    num_tokens = int(cu_seqlens_S1[-1])
    rewards_S = torch.randint(0, 2, (num_seqs,), generator=generator).float()
    return TrainBatch(
        train_prompt_ids=train_prompts,
        sampled_prompt_ids=sampled_prompts,
        response_ids_T=torch.randint(0, TINY_VOCAB, (num_tokens,), generator=generator),
        cu_seqlens_S1=cu_seqlens_S1,
        is_guided_S=is_guided_S,
        rewards_S=rewards_S,
        group_ids_S=group_ids_S,
        hint_level_S=torch.where(is_guided_S, group_ids_S % 2, -1),
    )


def tiny_advantages_T(batch, *, seed: int = 0) -> torch.Tensor:
    """Deterministic random advantages [T] for `batch`: one value per sequence, repeated over its tokens."""
    return batch.per_token(torch.randn(batch.num_seqs, generator=torch.Generator().manual_seed(seed)))


def hf_response_logprobs(model, batch, *, context: str = "train") -> torch.Tensor:
    """Reference logprobs [T] of the batch's response tokens from a transformers model (fp32, one row at a time)."""
    prompts = batch.train_prompt_ids if context == "train" else batch.sampled_prompt_ids
    logprobs = []
    for seq, prompt in enumerate(prompts):
        response = batch.response_ids_T[batch.cu_seqlens_S1[seq] : batch.cu_seqlens_S1[seq + 1]]
        input_ids = torch.tensor([prompt + response.tolist()], device=model.device)
        with torch.no_grad():
            log_probs_SV = torch.log_softmax(model(input_ids).logits[0].float(), dim=-1).cpu()
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
        logprobs.append(log_probs_SV[positions, response])
    return torch.cat(logprobs)

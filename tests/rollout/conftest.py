"""Rollout-test fixtures: a tiny random Llama with the SmolLM2 tokenizer, saved locally (no hub access)."""

import pytest
import torch

from guide_mega.data.chat import render_prompt_ids
from guide_mega.data.embedded_model import ensure_embedded_model

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def make_tiny_llama(tokenizer, *, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    # A larger init than the default 0.02 gives peaked next-token distributions, so greedy decoding and top-k
    # are well separated from ties.
    config.initializer_range = 0.5
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_embedded_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A saved tiny random LlamaForCausalLM (~3.2M parameters, mostly the 49152 x 64 embedding) + tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(smollm2_tokenizer, seed=0).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def prompt_ids(smollm2_tokenizer):
    """Four chat prompts of different lengths, as token ids (so batches need padding)."""
    texts = ["What is 2 + 3?", "Count the legs of 3 spiders, then add 4.", "Name a color.", "Hello"]
    return [render_prompt_ids(smollm2_tokenizer, text, system_prompt="Be brief.") for text in texts]

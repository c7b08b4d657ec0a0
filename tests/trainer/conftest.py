"""A tiny real policy for trainer tests: a Llama whose output ignores its context (a fixed unigram distribution).

Every token embeds to the same vector and every attention/MLP output projection starts at zero, so the first
policy samples i.i.d. tokens: mostly spaces and the digits 1 and 2, sometimes end-of-sequence. With answer "1"
and lenient extraction (the last number), about a quarter of responses are correct: groups have reward
variance, some are unsolved, and GRPO has signal, all without any pretrained weights. Training moves the zero
projections, so the policy does change.
"""

import json
import math

import pytest
import torch

from guide_mega.data.embedded_model import ensure_embedded_model

# Token ids in the SmolLM2 tokenizer: 216 is a space, 33 and 34 the digits 1 and 2.
UNIGRAM = {216: 0.5, 33: 0.25, 34: 0.2}
EOS_PROBABILITY = 0.05


def _make_unigram_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.ones_like(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # With a constant hidden state the normalised final hidden is all ones: logit = row sum of lm_head.
        logits = torch.full((len(tokenizer),), -30.0)
        for token, probability in {**UNIGRAM, tokenizer.eos_token_id: EOS_PROBABILITY}.items():
            logits[token] = math.log(probability)
        model.lm_head.weight.copy_(logits[:, None].expand(-1, config.hidden_size) / config.hidden_size)
    return model


@pytest.fixture(scope="session")
def unigram_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model("smollm2-135m-instruct"))
    directory = tmp_path_factory.mktemp("unigram_llama")
    _make_unigram_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def say_one_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "say_one.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Say one ({i}).", "answer": "1", "hint": "It is small."} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def tiny_run_config(unigram_model_dir, say_one_prompts, tmp_path):
    """make(run_name, **overrides) -> Config: a few-second Guide run of the unigram model under tmp_path/run_name."""
    from guide_mega.config import load_config

    def make(run_name: str, **overrides):
        values = {
            "model.path": str(unigram_model_dir), "model.dtype": "float32",
            "rollout.group_size": 4, "rollout.max_new_tokens": 6, "rollout.temperature": 1.0,
            "algorithm.guide.enabled": True, "algorithm.guide.drop_equal_rewards": False,
            "optimizer.lr": 0.05, "data.source": str(say_one_prompts), "data.max_prompt_tokens": 128,
            # A loaded 2-core machine can starve the reward worker for seconds; a timeout would score 0.
            "reward.name": "exact_match", "reward.lenient": True, "reward.num_workers": 1, "reward.timeout_s": 60.0,
            "train.steps": 2, "train.prompts_per_step": 2, "train.micro_batch_tokens": 512,
            "logging.run_dir": str(tmp_path / run_name), "logging.progress_bar": False, "logging.tensorboard": False,
            "checkpoint.every": 1, "checkpoint.keep_last": 5,
            **overrides,
        }  # fmt: skip
        return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])

    return make

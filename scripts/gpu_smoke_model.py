"""Write the GPU smoke run's inputs: a Llama with SmolLM2-135M's shapes whose samples carry reward signal, and data.

No pretrained weights travel to the GPU machine (the kit holds only SmolLM2-135M's config and tokenizer), yet a
random model would score 0 everywhere and a Guide step would train nothing. So the model is built to sample
i.i.d. tokens from a fixed unigram (mostly spaces and the digits 1 and 2, sometimes end-of-sequence): every token
embeds to the same vector and every attention/MLP output projection starts at zero, so the final hidden state is
constant and the LM head alone sets the distribution. With answer "1" and lenient extraction about a quarter of
samples are right: groups have variance, some are unsolved and go to Guide's hinted wave, and training moves the
zero projections. The shapes (30 layers, hidden 576, vocabulary 49152) are the real model's.

Usage: python scripts/gpu_smoke_model.py KIT_MODEL_DIR OUTPUT_DIR
Writes OUTPUT_DIR/model (HF safetensors + tokenizer) and OUTPUT_DIR/say_one.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

# Token ids in the SmolLM2 tokenizer: 216 is a space, 33 and 34 the digits 1 and 2.
UNIGRAM = {216: 0.5, 33: 0.25, 34: 0.2}
EOS_PROBABILITY = 0.05
NUM_PROMPTS = 32


def unigram_llama(config, eos_token_id: int) -> LlamaForCausalLM:
    """A LlamaForCausalLM of `config`'s shapes whose next-token distribution is UNIGRAM whatever the context."""
    torch.manual_seed(0)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # A constant hidden state normalises to all ones, so a token's logit is the row sum of its lm_head row.
        logits_V = torch.full((config.vocab_size,), -30.0)
        for token, probability in {**UNIGRAM, eos_token_id: EOS_PROBABILITY}.items():
            logits_V[token] = math.log(probability)
        model.lm_head.weight.copy_(logits_V[:, None].expand(-1, config.hidden_size) / config.hidden_size)
    return model


def main(kit_model_dir: Path, output_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(kit_model_dir)
    config = AutoConfig.from_pretrained(kit_model_dir)
    model = unigram_llama(config, tokenizer.eos_token_id)
    model.save_pretrained(output_dir / "model")
    tokenizer.save_pretrained(output_dir / "model")
    rows = [
        {"id": f"q{i}", "prompt": f"Say one ({i}).", "answer": "1", "hint": "It is small."} for i in range(NUM_PROMPTS)
    ]
    (output_dir / "say_one.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    parameters = sum(p.numel() for p in model.parameters())
    print(f"gpu_smoke_model: {parameters / 1e6:.1f}M parameters, {config.num_hidden_layers} layers -> {output_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

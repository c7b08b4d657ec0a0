"""Chat templates through the tokenizer, and the loader: shuffling, resume, and the prompt-length limit."""

import json
import logging

import pytest

from guide_mega.config import DataConfig
from guide_mega.data.chat import render_prompt, render_prompt_ids, to_messages
from guide_mega.data.loader import PromptLoader
from guide_mega.types import Prompt


def test_chat_template_uses_the_default_system_prompt(smollm2_tokenizer):
    text = render_prompt(smollm2_tokenizer, "What is 17 + 25?")
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = render_prompt_ids(smollm2_tokenizer, "What is 17 + 25?")
    assert smollm2_tokenizer.decode(ids) == text
    assert ids.count(smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_system_prompt_override_and_chat_messages(smollm2_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    assert to_messages(messages, system_prompt="Be terse.")[0] == {"role": "system", "content": "Be terse."}
    assert to_messages([{"role": "system", "content": "own"}, *messages], system_prompt="x")[0]["content"] == "own"
    assert render_prompt(smollm2_tokenizer, messages, system_prompt="Be terse.").startswith(
        "<|im_start|>system\nBe terse.<|im_end|>"
    )


def test_tokenizer_without_chat_template_gets_plain_text(smollm2_tokenizer):
    plain = type("Plain", (), {"chat_template": None})()
    assert render_prompt(plain, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]) == "a\n\nb"


def make_prompts(count, *, long_ids=(), long_hint_ids=()):
    prompts = []
    for index in range(count):
        text = "word " * 400 if index in long_ids else f"problem {index}"
        hint = "hint " * 400 if index in long_hint_ids else f"hint {index}"
        prompts.append(Prompt(id=f"p{index}", prompt=text, answer=str(index), hint=hint))
    return prompts


def ids_of(batch):
    return [prompt.id for prompt in batch]


def test_shuffle_is_deterministic_and_covers_each_epoch():
    prompts = make_prompts(10)
    first = PromptLoader(prompts, seed=3)
    batches = [ids_of(first.next_batch(5)) for _ in range(4)]
    again = PromptLoader(prompts, seed=3)
    assert [ids_of(again.next_batch(5)) for _ in range(4)] == batches
    assert sorted(batches[0] + batches[1]) == sorted(ids_of(prompts))
    assert sorted(batches[2] + batches[3]) == sorted(ids_of(prompts))
    assert batches[0] + batches[1] != batches[2] + batches[3]
    assert ids_of(PromptLoader(prompts, seed=4).next_batch(10)) != batches[0] + batches[1]
    assert ids_of(PromptLoader(prompts, seed=3, shuffle=False).next_batch(3)) == ["p0", "p1", "p2"]


def test_resume_continues_exactly():
    prompts = make_prompts(7)
    loader = PromptLoader(prompts, seed=11)
    loader.next_batch(4)
    loader.next_batch(4)
    state = loader.state_dict()
    expected = [ids_of(loader.next_batch(3)) for _ in range(3)]
    resumed = PromptLoader(prompts, seed=11)
    resumed.load_state_dict(state)
    assert [ids_of(resumed.next_batch(3)) for _ in range(3)] == expected
    with pytest.raises(ValueError, match="seed is 11 in the checkpoint but 12 now"):
        PromptLoader(prompts, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="num_prompts is 7 in the checkpoint but 6 now"):
        PromptLoader(prompts[:6], seed=11).load_state_dict(state)


def test_overlong_prompts_are_counted_and_reported(smollm2_tokenizer, caplog):
    prompts = make_prompts(6, long_ids={1, 4}, long_hint_ids={2})
    config = DataConfig(max_prompt_tokens=100, seed=0)
    loader = PromptLoader.from_config(prompts, config, tokenizer=smollm2_tokenizer)
    with caplog.at_level(logging.WARNING):
        batch = loader.next_batch(8)
    assert len(batch) == 8 and not {"p1", "p4"} & set(ids_of(batch))
    assert all(not prompt.has_hint for prompt in batch if prompt.id == "p2")
    assert all(prompt.has_hint for prompt in batch if prompt.id != "p2")
    assert loader.metrics["data/num_overlong_prompts"] == 2.0
    assert loader.metrics["data/num_hints_removed_for_length"] == 1.0
    assert "prompt p1 is longer than 100 tokens" in caplog.text
    assert "hinted prompt p2 is longer than 100 tokens; trained without its hint" in caplog.text


def test_every_prompt_too_long_is_an_error(smollm2_tokenizer):
    loader = PromptLoader(make_prompts(2, long_ids={0, 1}), seed=0, tokenizer=smollm2_tokenizer, max_prompt_tokens=50)
    with pytest.raises(ValueError, match="every prompt is longer than data.max_prompt_tokens=50"):
        loader.next_batch(1)


def test_hint_levels_are_loader_state_and_resume_exactly():
    prompts = make_prompts(5)
    loader = PromptLoader(prompts, seed=2)
    loader.next_batch(3)
    loader.update_hint_levels({"p1": 2, "p3": 1})
    loader.update_hint_levels({"p3": 0})  # back at level 0: no entry kept
    state = loader.state_dict()
    assert state["hint_levels"] == {"p1": 2} and dict(loader.hint_levels) == {"p1": 2}
    resumed = PromptLoader(prompts, seed=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the checkpoint's metadata is JSON
    assert dict(resumed.hint_levels) == {"p1": 2}
    assert ids_of(resumed.next_batch(4)) == ids_of(loader.next_batch(4))
    older = {key: value for key, value in state.items() if key != "hint_levels"}  # a checkpoint from before levels
    resumed.load_state_dict(older)
    assert dict(resumed.hint_levels) == {}


def test_graded_hint_levels_too_long_are_removed_and_counted(smollm2_tokenizer):
    graded = Prompt(id="g", prompt="problem", answer="1", hint=["short hint", "hint " * 400, "another short one"])
    loader = PromptLoader([graded], seed=0, tokenizer=smollm2_tokenizer, max_prompt_tokens=100)
    (prompt,) = loader.next_batch(1)
    assert prompt.hint == ["short hint", "another short one"]
    assert loader.metrics["data/num_hint_levels_removed_for_length"] == 1.0
    assert loader.metrics["data/num_hints_removed_for_length"] == 0.0

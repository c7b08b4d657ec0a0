"""Prompts -> token ids through the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any

from guide_mega.types import ChatMessage, PromptContent


def to_messages(content: PromptContent, *, system_prompt: str | None = None) -> list[ChatMessage]:
    """Chat messages for a prompt: text becomes one user turn; `system_prompt` is prepended unless one exists.

    With no `system_prompt`, the tokenizer's template adds its own default (if it has one).
    """
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else [dict(m) for m in content]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_prompt(tokenizer: Any, content: PromptContent, *, system_prompt: str | None = None) -> str:
    """The prompt text the model sees, ending with the assistant turn's opening (generation prompt).

    A tokenizer without a chat template (a base model) gets the messages' contents joined by blank lines.
    """
    messages = to_messages(content, system_prompt=system_prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n\n".join(message["content"] for message in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_prompt_ids(tokenizer: Any, content: PromptContent, *, system_prompt: str | None = None) -> list[int]:
    """Token ids of `render_prompt` (the template already holds the special tokens, so none are added)."""
    text = render_prompt(tokenizer, content, system_prompt=system_prompt)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    return list(tokenizer(text, add_special_tokens=not has_template)["input_ids"])

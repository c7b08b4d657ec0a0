"""Prompt data: files (our schema and the Guide authors'), generators with hints, chat templates, the loader,
and the embedded default model."""

from guide_mega.data.chat import render_prompt, render_prompt_ids, to_messages
from guide_mega.data.embedded_model import ensure_embedded_model, resolve_model_path
from guide_mega.data.files import PromptSet, load_prompt_file
from guide_mega.data.loader import PromptLoader
from guide_mega.data.rows import RowError
from guide_mega.data.sources import load_prompt_source

__all__ = [
    "PromptLoader",
    "PromptSet",
    "RowError",
    "ensure_embedded_model",
    "load_prompt_file",
    "load_prompt_source",
    "render_prompt",
    "render_prompt_ids",
    "resolve_model_path",
    "to_messages",
]

"""`DataConfig.source` -> a PromptSet: a JSONL/Parquet file, or a generator ('reasoning_gym:<task>', 'champ')."""

from __future__ import annotations

from guide_mega.config import DataConfig
from guide_mega.data.champ_source import load_champ
from guide_mega.data.files import PROMPT_FILE_SUFFIXES, PromptSet, load_prompt_file
from guide_mega.data.reasoning_gym_source import load_reasoning_gym

REASONING_GYM_PREFIX = "reasoning_gym:"
CHAMP_SOURCE = "champ"


def load_prompt_source(source: str, config: DataConfig) -> PromptSet:
    """The prompts of `source` (config.source or config.eval_source), read with the config's schema and error
    policy; generator sources take `config.source_options` as keyword arguments."""
    options = dict(config.source_options)
    if source.startswith(REASONING_GYM_PREFIX):
        return load_reasoning_gym(source.removeprefix(REASONING_GYM_PREFIX), **options)
    if source == CHAMP_SOURCE:
        return load_champ(**options)
    if source.endswith(PROMPT_FILE_SUFFIXES):
        if options:
            raise ValueError(f"data.source_options: a prompt file takes no options, got {sorted(options)}")
        return load_prompt_file(source, schema=config.schema, on_error=config.on_error)
    raise ValueError(
        f"data.source: {source!r} is not a {'/'.join(PROMPT_FILE_SUFFIXES)} file, "
        f"'{REASONING_GYM_PREFIX}<task>' or '{CHAMP_SOURCE}'"
    )

"""`DataConfig.source` -> a PromptSet: a JSONL/Parquet file, or a generator ('reasoning_gym:<task>', 'champ')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guide_mega.config import DataConfig
from guide_mega.data.champ_source import load_champ
from guide_mega.data.files import PROMPT_FILE_SUFFIXES, PromptSet, load_prompt_file
from guide_mega.data.reasoning_gym_source import load_reasoning_gym

REASONING_GYM_PREFIX = "reasoning_gym:"
CHAMP_SOURCE = "champ"
# The packages the generators import; the 'data' extra installs them.
_GENERATOR_PACKAGES = ("reasoning_gym", "champ_dataset")


def is_prompt_file(source: str) -> bool:
    return source.endswith(PROMPT_FILE_SUFFIXES)


def check_prompt_file(source: str, options: dict[str, Any], *, key: str = "data.source") -> None:
    """Raise a ValueError naming `key` when prompt file `source` does not exist or is given generator options (the
    message says what to override). Reads nothing."""
    if options:
        raise ValueError(
            f"{key}_options: {source} is a prompt file, which takes no generator options (got {sorted(options)}); "
            f"remove them: {key}_options={{}} on the command line, or delete {key}_options from the YAML"
        )
    if not Path(source).is_file():
        raise ValueError(f"{key}: no such prompt file: {source}")


def load_prompt_source(source: str, config: DataConfig, *, key: str = "data.source") -> PromptSet:
    """The prompts of `source` (config.source or config.eval_source, named by `key` in errors), read with the
    config's schema and error policy; generator sources take `config.source_options` as keyword arguments.
    A ValueError names the key for an unknown form, a missing file, options a file or a generator does not take,
    and a generator whose package is not installed."""
    options = dict(config.source_options)
    if is_prompt_file(source):
        check_prompt_file(source, options, key=key)
        return load_prompt_file(source, schema=config.schema, on_error=config.on_error)
    if source.startswith(REASONING_GYM_PREFIX):
        generate = lambda: load_reasoning_gym(source.removeprefix(REASONING_GYM_PREFIX), **options)  # noqa: E731
    elif source == CHAMP_SOURCE:
        generate = lambda: load_champ(**options)  # noqa: E731
    else:
        raise ValueError(
            f"{key}: {source!r} is not a {'/'.join(PROMPT_FILE_SUFFIXES)} file, "
            f"'{REASONING_GYM_PREFIX}<task>' or '{CHAMP_SOURCE}'"
        )
    try:
        return generate()
    except ModuleNotFoundError as exc:
        if exc.name not in _GENERATOR_PACKAGES:
            raise
        raise ValueError(f"{key}: {source} needs the {exc.name} package: pip install 'guide-mega[data]'") from None
    except (TypeError, ValueError, AssertionError) as exc:  # the generator's own check of the user's options
        raise ValueError(f"{key}: {source} with {key}_options {options}: {exc}") from None

"""Rows of a prompt file -> `Prompt` records, for our schema and for the Guide authors' dataset schema.

Our schema (`native`): `prompt` (text or chat messages), `answer` (string, number or list of strings), and the
optional `hint` (a string, or a list of graded hints from weakest to strongest), `id`, `source` and `metadata`. An
unknown field is an error, so a typo such as `hints` is caught.

The authors' schema (`guide_rl`, their verl parquet files): `prompt` and `hint` are chat-message lists, and
`hint[-1].content` is the FULL hinted problem text (problem and hint together), so it becomes
`Prompt.hinted_prompt`: the prompt's messages with the last one's content replaced, exactly the text their code
samples under. `reward_model.ground_truth` is the answer, `data_source` the source and `extra_info.index` the id;
`ability` and `extra_info` are kept in `metadata`, and the columns their code leaves unused here (`cot`,
`ref_prompt`) are not read.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from guide_mega.algorithms.guide import MAX_HINT_LEVELS
from guide_mega.types import ChatMessage, Prompt, PromptContent

NATIVE_FIELDS = ("prompt", "answer", "hint", "id", "source", "metadata")
_CHAT_ROLES = ("system", "user", "assistant")
_GUIDE_RL_METADATA_FIELDS = ("ability", "extra_info")


class RowError(ValueError):
    """A malformed row; the message starts with its location (file:line or file row N) and names the field."""


def _fail(where: str, field: str, problem: str) -> RowError:
    return RowError(f"{where}: field {field!r}: {problem}")


class WrittenFloat(float):
    """A number read from JSON that remembers how it was written, so that an answer `1.50` stays "1.50"."""

    def __new__(cls, text: str) -> WrittenFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


def _plain_numbers(value: Any) -> Any:
    """`value` with every WrittenFloat a plain float again: only an answer keeps its written text."""
    if isinstance(value, WrittenFloat):
        return float(value)
    if isinstance(value, Mapping):
        return {key: _plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(item) for item in value]
    return value


# Lists of the code reward's `metadata["tests"]` (rewards/code.py reads them); a string there would be read one
# character per test.
_CODE_TEST_LISTS = ("inputs", "outputs", "asserts")


def _check_code_tests(metadata: Mapping[str, Any], *, where: str) -> None:
    tests = metadata.get("tests")
    if tests is None:
        return
    if not isinstance(tests, Mapping):
        problem = f"expected an object of {_CODE_TEST_LISTS} lists, got {type(tests).__name__}"
        raise _fail(where, "metadata.tests", problem)
    for name in _CODE_TEST_LISTS:
        value = tests.get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise _fail(where, f"metadata.tests.{name}", f"expected a list of strings, got {type(value).__name__}")


def _chat_messages(value: Any, *, where: str, field: str) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise _fail(where, field, f"expected a non-empty list of chat messages, got {type(value).__name__}")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise _fail(where, f"{field}[{index}]", "expected {role, content} with string content")
        if message.get("role") not in _CHAT_ROLES:
            raise _fail(where, f"{field}[{index}].role", f"must be one of {_CHAT_ROLES}, got {message.get('role')!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt_content(value: Any, *, where: str, field: str) -> PromptContent:
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, field, "is empty")
        return value
    return _chat_messages(value, where=where, field=field)


def _answer(value: Any, *, where: str, field: str) -> str | list[str]:
    if isinstance(value, bool) or value is None:
        raise _fail(where, field, f"expected a string, a number or a list of strings, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, field, f"expected a finite number, got {value!r}")
    if isinstance(value, int | float):
        return value.text if isinstance(value, WrittenFloat) else str(value)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) and item.strip() for item in value):
        return list(value)
    raise _fail(where, field, f"expected a non-empty string, a number or a list of strings, got {value!r}")


def _optional_text(row: Mapping[str, Any], field: str, *, where: str) -> str | None:
    value = row.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, field, f"expected a non-empty string or null, got {value!r}")
    return value


def _hint(row: Mapping[str, Any], *, where: str) -> str | list[str] | None:
    """One hint, or graded hints as a list of strings, weakest first."""
    value = row.get("hint")
    if not isinstance(value, list):
        return _optional_text(row, "hint", where=where)
    if not value or not all(isinstance(item, str) and item.strip() for item in value):
        raise _fail(where, "hint", f"expected a non-empty list of non-empty strings (weakest first), got {value!r}")
    if len(value) > MAX_HINT_LEVELS:  # the per-level metrics are reduced over a fixed number of levels
        raise _fail(where, "hint", f"at most {MAX_HINT_LEVELS} graded hints, got {len(value)}")
    return list(value)


def prompt_from_native_row(row: Any, *, where: str, default_id: str, default_source: str) -> Prompt:
    """A `Prompt` from a row of our schema; raises RowError naming `where` and the field."""
    if not isinstance(row, Mapping):
        raise RowError(f"{where}: expected an object with fields {NATIVE_FIELDS}, got {type(row).__name__}")
    unknown = sorted(set(row) - set(NATIVE_FIELDS))
    if unknown:
        raise _fail(where, unknown[0], f"unknown field; expected some of {NATIVE_FIELDS}")
    for required in ("prompt", "answer"):
        if required not in row:
            raise _fail(where, required, "missing")
    metadata = row.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping):
        raise _fail(where, "metadata", f"expected an object, got {type(metadata).__name__}")
    _check_code_tests(metadata, where=where)
    row_id = row.get("id")
    if row_id is not None and not isinstance(row_id, str | int):
        raise _fail(where, "id", f"expected a string or an integer, got {row_id!r}")
    return Prompt(
        id=str(row_id) if row_id is not None else default_id,
        prompt=_prompt_content(row["prompt"], where=where, field="prompt"),
        answer=_answer(row["answer"], where=where, field="answer"),
        hint=_hint(row, where=where),
        source=_optional_text(row, "source", where=where) or default_source,
        metadata=_plain_numbers(metadata),
    )


def _guide_rl_hinted_prompt(row: Mapping[str, Any], prompt: list[ChatMessage], *, where: str) -> list | None:
    if row.get("hint") is None:
        return None
    hint_messages = _chat_messages(row["hint"], where=where, field="hint")
    hinted = copy.deepcopy(prompt)
    hinted[-1]["content"] = hint_messages[-1]["content"]
    return hinted


def prompt_from_guide_rl_row(row: Any, *, where: str, default_id: str) -> Prompt:
    """A `Prompt` from a row of the Guide authors' schema; raises RowError naming `where` and the field."""
    if not isinstance(row, Mapping):
        raise RowError(f"{where}: expected an object with prompt, reward_model, data_source, got {type(row).__name__}")
    for required in ("prompt", "reward_model", "data_source"):
        if row.get(required) is None:
            raise _fail(where, required, "missing")
    prompt = _chat_messages(row["prompt"], where=where, field="prompt")
    reward_model = row["reward_model"]
    if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
        raise _fail(where, "reward_model.ground_truth", "missing")
    extra_info = row.get("extra_info")
    index = extra_info.get("index") if isinstance(extra_info, Mapping) else None
    source = row["data_source"]
    if not isinstance(source, str):
        raise _fail(where, "data_source", f"expected a string, got {source!r}")
    return Prompt(
        id=f"{source}/{index}" if index is not None else default_id,
        prompt=prompt,
        answer=_answer(reward_model["ground_truth"], where=where, field="reward_model.ground_truth"),
        hinted_prompt=_guide_rl_hinted_prompt(row, prompt, where=where),
        source=source,
        metadata={name: _plain_numbers(row[name]) for name in _GUIDE_RL_METADATA_FIELDS if row.get(name) is not None},
    )

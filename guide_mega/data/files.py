"""Prompt files: JSONL or Parquet rows -> `Prompt` records, with malformed rows raised or skipped and counted."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from guide_mega.data.rows import RowError, prompt_from_guide_rl_row, prompt_from_native_row
from guide_mega.types import Prompt

logger = logging.getLogger(__name__)

Schema = Literal["native", "guide_rl"]
OnError = Literal["raise", "skip"]
PROMPT_FILE_SUFFIXES = (".jsonl", ".parquet")
# How many skipped-row messages a PromptSet keeps for the report; the count is always complete.
_MAX_KEPT_ERRORS = 20


@dataclass(kw_only=True)
class PromptSet:
    """The prompts of one source, and what was left out of it (never silently)."""

    prompts: list[Prompt]
    num_skipped_rows: int = 0
    skipped_row_errors: list[str] = field(default_factory=list)
    """The first few skipped rows' errors, each naming its file and line."""
    num_without_hint: int = 0
    """Generator sources: problems left without a hint because every candidate hint leaked the answer."""


def _truncation_note(raw: bytes) -> str:
    # A last line without its newline that does not parse is most likely a file cut short (a copy that stopped).
    return "" if raw.endswith(b"\n") else "; the file ends mid-line (truncated?)"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded line by line: an encoding error (e.g. a multi-byte character cut in two) names its line too.
    with path.open("rb") as stream:
        for line_number, raw in enumerate(stream, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, RowError(f"{where}: invalid UTF-8 at byte {exc.start}{_truncation_note(raw)}")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                message = f"{where}: invalid JSON: {exc.msg} (column {exc.colno}){_truncation_note(raw)}"
                yield where, RowError(message)


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    row_number = 0
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                row_number += 1
                yield f"{path} row {row_number}", row
    except pyarrow.ArrowException as exc:
        raise ValueError(f"{path}: unreadable Parquet after row {row_number} (truncated or corrupt?): {exc}") from None


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs of a JSONL or Parquet file; an unparsable JSONL line comes as a RowError row."""
    path = Path(path)
    if path.suffix not in PROMPT_FILE_SUFFIXES:
        raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; expected {PROMPT_FILE_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return _jsonl_rows(path) if path.suffix == ".jsonl" else _parquet_rows(path)


def _row_to_prompt(row: Any, *, where: str, schema: Schema, default_id: str, default_source: str) -> Prompt:
    if isinstance(row, RowError):
        raise row
    if schema == "guide_rl":
        return prompt_from_guide_rl_row(row, where=where, default_id=default_id)
    return prompt_from_native_row(row, where=where, default_id=default_id, default_source=default_source)


def load_prompt_file(path: str | Path, *, schema: Schema = "native", on_error: OnError = "raise") -> PromptSet:
    """All prompts of a file. A malformed row raises RowError (file and line) or, with on_error='skip', is
    skipped, counted and logged. Duplicate ids are an error either way: resume and the eval analysis key on them.
    """
    path = Path(path)
    prompt_set = PromptSet(prompts=[])
    seen_ids: dict[str, str] = {}
    for row_index, (where, row) in enumerate(read_rows(path)):
        try:
            prompt = _row_to_prompt(
                row, where=where, schema=schema, default_id=f"{path.stem}/{row_index}", default_source=path.stem
            )
        except RowError as exc:
            if on_error == "raise":
                raise
            prompt_set.num_skipped_rows += 1
            if len(prompt_set.skipped_row_errors) < _MAX_KEPT_ERRORS:
                prompt_set.skipped_row_errors.append(str(exc))
            logger.warning("skipping malformed row: %s", exc)
            continue
        if prompt.id in seen_ids:
            raise RowError(f"{where}: field 'id': duplicate id {prompt.id!r} (first at {seen_ids[prompt.id]})")
        seen_ids[prompt.id] = where
        prompt_set.prompts.append(prompt)
    return prompt_set

"""Prompt files: JSONL or Parquet rows -> `Prompt` records, with malformed rows raised or skipped and counted."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from guide_mega.data.rows import RowError, WrittenFloat, prompt_from_guide_rl_row, prompt_from_native_row
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
    num_hint_levels_leaked: int = 0
    """Generator sources with graded hints: levels left out (of problems that may keep others) for leaking it."""

    def losses_line(self) -> str | None:
        """The start-up line that counts what was left out, or None when nothing was."""
        if not (self.num_skipped_rows or self.num_without_hint or self.num_hint_levels_leaked):
            return None
        return (
            f"data: {len(self.prompts)} prompts; {self.num_skipped_rows} malformed rows skipped; "
            f"{self.num_without_hint} problems without a usable hint; "
            f"{self.num_hint_levels_leaked} hint levels left out for stating the answer"
        )


def _truncation_note(raw: bytes) -> str:
    # A last line without its newline that does not parse is most likely a file cut short (a copy that stopped).
    return "" if raw.endswith(b"\n") else "; the file ends mid-line (truncated?)"


class _JsonRefusal(ValueError):
    """JSON that Python's parser would take but a prompt file must not hold."""


def _refuse_constant(text: str) -> float:
    raise _JsonRefusal(f"{text} is not a finite number")


def _written_float(text: str) -> WrittenFloat:
    number = WrittenFloat(text)
    if not math.isfinite(number):
        raise _JsonRefusal(f"{text} is not a finite number")
    return number


def _written_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # past Python's int-string limit
        limit = sys.get_int_max_str_digits()
        raise _JsonRefusal(f"an integer of more than {limit} digits; write it as a string") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _JsonRefusal(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _parse_json_row(line: str) -> Any:
    """One JSON value, refusing what `json.loads` accepts silently: NaN and infinities, a key given twice (the last
    would win), an integer too long to convert; numbers keep their written text (`WrittenFloat`). Raises
    json.JSONDecodeError for invalid JSON and ValueError (the problem, without a location) for the rest."""
    return json.loads(
        line,
        object_pairs_hook=_unique_keys,
        parse_constant=_refuse_constant,
        parse_float=_written_float,
        parse_int=_written_int,
    )


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
                row = _parse_json_row(line)
            except json.JSONDecodeError as exc:
                row = RowError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno}){_truncation_note(raw)}")
            except _JsonRefusal as exc:
                row = RowError(f"{where}: {exc}")
            yield where, row


def _struct_null(value: Any, field: str) -> str | None:
    """The path of the first null inside the struct values (dicts) under `value`, or None."""
    if isinstance(value, dict):
        for name, item in value.items():
            if item is None:
                return f"{field}.{name}"
            if found := _struct_null(item, f"{field}.{name}"):
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if found := _struct_null(item, f"{field}[{index}]"):
                return found
    return None


def _parquet_row(row: dict[str, Any], where: str) -> dict[str, Any] | RowError:
    # A struct column has the union of every row's keys: pyarrow gives a row that lacked one a null, which cannot be
    # told from a null that was written, so a null inside a struct is refused rather than invented into metadata.
    for name, value in row.items():
        if field := _struct_null(value, name):
            return RowError(
                f"{where}: field {field!r}: null in a Parquet struct column (a key some other row has, or a "
                "written null: they cannot be told apart); give every row the same keys, without nulls"
            )
    return row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    row_number = 0
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                row_number += 1
                yield f"{path} row {row_number}", _parquet_row(row, f"{path} row {row_number}")
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
    if not prompt_set.prompts:
        skipped = prompt_set.num_skipped_rows
        detail = f"all {skipped} rows were skipped; first: {prompt_set.skipped_row_errors[0]}" if skipped else ""
        raise ValueError(f"{path}: no prompts ({detail or 'the file holds no rows'})")
    return prompt_set

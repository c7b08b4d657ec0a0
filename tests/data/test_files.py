"""JSONL and Parquet prompt files: both schemas, malformed rows raised or skipped and counted."""

import json

import pyarrow
import pyarrow.parquet
import pytest

from guide_mega.config import DataConfig
from guide_mega.data.files import load_prompt_file
from guide_mega.data.rows import RowError
from guide_mega.data.sources import load_prompt_source


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "2 + 2?", "answer": "4", "id": "a"})
NO_ANSWER = json.dumps({"prompt": "3 + 3?", "id": "b"})
OTHER = json.dumps({"prompt": [{"role": "user", "content": "5 - 1?"}], "answer": 4, "hint": "subtract", "id": "c"})


def test_jsonl_raises_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", NO_ANSWER, OTHER])
    with pytest.raises(RowError, match=rf"{path}:3: field 'answer': missing"):
        load_prompt_file(path)


def test_jsonl_skip_counts_and_keeps_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "{not json", NO_ANSWER, OTHER])
    prompt_set = load_prompt_file(path, on_error="skip")
    assert [prompt.id for prompt in prompt_set.prompts] == ["a", "c"]
    assert prompt_set.num_skipped_rows == 2
    assert prompt_set.skipped_row_errors[0].startswith(f"{path}:2: invalid JSON")
    assert prompt_set.skipped_row_errors[1].startswith(f"{path}:3: field 'answer'")


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    with pytest.raises(RowError, match=r"train\.jsonl:2: field 'id': duplicate id 'a' \(first at .*train\.jsonl:1\)"):
        load_prompt_file(path, on_error="skip")


def test_parquet_native_and_guide_rl(tmp_path):
    native_path = tmp_path / "native.parquet"
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([json.loads(GOOD), {"prompt": "q", "answer": "1"}]), native_path
    )
    native = load_prompt_file(native_path)
    assert [prompt.id for prompt in native.prompts] == ["a", "native/1"]

    rows = [
        {
            "prompt": [{"role": "user", "content": f"problem {index}"}],
            "hint": [{"role": "user", "content": f"problem {index} with a hint"}] if index else None,
            "reward_model": {"ground_truth": str(index), "style": "rule"},
            "data_source": "src",
            "extra_info": {"index": index},
        }
        for index in range(3)
    ]
    guide_path = tmp_path / "guide.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), guide_path)
    prompt_set = load_prompt_source(str(guide_path), DataConfig(source=str(guide_path), schema="guide_rl"))
    assert [prompt.has_hint for prompt in prompt_set.prompts] == [False, True, True]
    assert prompt_set.prompts[2].hinted_prompt[-1]["content"] == "problem 2 with a hint"


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": None}]), path
    )
    with pytest.raises(RowError, match=rf"{path} row 2: field 'answer'"):
        load_prompt_file(path)


def test_unknown_sources_and_suffixes(tmp_path):
    with pytest.raises(ValueError, match="unsupported prompt file type '.csv'"):
        load_prompt_file(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="data.source: 'data.csv' is not"):
        load_prompt_source("data.csv", DataConfig())
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompt_file(tmp_path / "missing.jsonl")


def test_a_file_cut_mid_line_names_the_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_bytes((GOOD + "\n" + OTHER + "\n" + NO_ANSWER[:15]).encode())
    with pytest.raises(RowError, match=rf"{path}:3: invalid JSON: .*the file ends mid-line \(truncated\?\)"):
        load_prompt_file(path)
    prompt_set = load_prompt_file(path, on_error="skip")
    assert [prompt.id for prompt in prompt_set.prompts] == ["a", "c"]
    assert prompt_set.num_skipped_rows == 1 and prompt_set.skipped_row_errors[0].startswith(f"{path}:3:")


def test_a_multibyte_character_cut_in_two_names_the_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_bytes((GOOD + "\n").encode() + '{"prompt": "café'.encode()[:-1])
    with pytest.raises(RowError, match=rf"{path}:2: invalid UTF-8 at byte 15; the file ends mid-line"):
        load_prompt_file(path)


def test_a_truncated_parquet_file_names_the_file(tmp_path):
    path = tmp_path / "cut.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([json.loads(GOOD)] * 50), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{path}: unreadable Parquet after row 0 \(truncated or corrupt\?\)"):
        load_prompt_file(path)

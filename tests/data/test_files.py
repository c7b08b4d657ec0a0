"""JSONL and Parquet prompt files: both schemas, malformed rows raised or skipped and counted."""

import json
import re

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
    assert prompt_set.losses_line() == (
        "data: 2 prompts; 2 malformed rows skipped; 0 problems without a usable hint; "
        "0 hint levels left out for stating the answer"
    )
    assert load_prompt_file(write_jsonl(tmp_path / "clean.jsonl", [GOOD, OTHER])).losses_line() is None


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


def test_an_empty_file_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=rf"^{path}: no prompts \(the file holds no rows\)$"):
        load_prompt_file(path)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [NO_ANSWER])
    with pytest.raises(ValueError, match=rf"^{all_bad}: no prompts \(all 1 rows were skipped; first: .*:1: field"):
        load_prompt_file(all_bad, on_error="skip")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "q", "answer": NaN}', "NaN is not a finite number"),
        ('{"prompt": "q", "answer": -Infinity}', "-Infinity is not a finite number"),
        ('{"prompt": "q", "answer": 1e999}', "1e999 is not a finite number"),
        ('{"prompt": "q", "answer": "1", "metadata": {"w": NaN}}', "NaN is not a finite number"),
        ('{"prompt": "q", "answer": "1", "id": "a", "id": "b"}', "key 'id' appears twice in one object"),
        ('{"prompt": "q", "answer": "1", "metadata": {"k": 1, "k": 2}}', "key 'k' appears twice in one object"),
        ('{"prompt": "q", "answer": ' + "9" * 5000 + "}", "an integer of more than 4300 digits; write it as a string"),
    ],
    ids=["nan", "infinity", "overflow", "nested_nan", "duplicate_key", "nested_duplicate", "huge_int"],
)
def test_json_that_python_would_accept_silently_is_an_error(tmp_path, line, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, line])
    with pytest.raises(RowError, match=rf"^{path}:2: {re.escape(message)}"):
        load_prompt_file(path)


def test_numeric_answers_keep_their_written_text(tmp_path):
    lines = [
        json.dumps({"prompt": "a", "answer": "x", "id": "0"}).replace('"x"', "1.50"),
        json.dumps({"prompt": "b", "answer": "x", "id": "1"}).replace('"x"', "1e3"),
        json.dumps({"prompt": "c", "answer": 12, "id": "2", "metadata": {"weight": 0.5, "n": 3}}),
    ]
    prompts = load_prompt_file(write_jsonl(tmp_path / "train.jsonl", lines)).prompts
    assert [prompt.answer for prompt in prompts] == ["1.50", "1e3", "12"]
    assert prompts[2].metadata == {"weight": 0.5, "n": 3} and type(prompts[2].metadata["weight"]) is float


def test_parquet_struct_columns_that_invent_keys_are_an_error(tmp_path):
    path = tmp_path / "structs.parquet"
    # pyarrow gives every row every key of the column: row 1 gets "b": None, row 2 "a": None.
    rows = [{"prompt": "q", "answer": "1", "metadata": {"a": 1}}, {"prompt": "r", "answer": "2", "metadata": {"b": 2}}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    with pytest.raises(RowError, match=rf"^{path} row 1: field 'metadata.b': null in a Parquet struct column"):
        load_prompt_file(path)

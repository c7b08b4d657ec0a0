"""Rows -> Prompt: our schema, the Guide authors' schema, and errors that name the location and field."""

import re

import pytest

from guide_mega.algorithms.guide import hinted_prompt
from guide_mega.data.rows import RowError, prompt_from_guide_rl_row, prompt_from_native_row

WHERE = "train.jsonl:7"


def native(row):
    return prompt_from_native_row(row, where=WHERE, default_id="train/6", default_source="train")


def test_native_text_prompt_with_defaults():
    prompt = native({"prompt": "1 + 1?", "answer": 2, "hint": "count"})
    assert (prompt.id, prompt.prompt, prompt.answer, prompt.hint, prompt.source) == (
        "train/6",
        "1 + 1?",
        "2",
        "count",
        "train",
    )


def test_native_chat_prompt_and_answer_list():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x^2 = 4?"}]
    prompt = native({"prompt": messages, "answer": ["2", "-2"], "id": 12, "source": "algebra", "metadata": {"k": 1}})
    assert prompt.prompt == messages and prompt.answer == ["2", "-2"]
    assert (prompt.id, prompt.source, prompt.metadata, prompt.has_hint) == ("12", "algebra", {"k": 1}, False)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"answer": "1"}, "prompt"),
        ({"prompt": "q"}, "answer"),
        ({"prompt": "  ", "answer": "1"}, "prompt"),
        ({"prompt": "q", "answer": True}, "answer"),
        ({"prompt": "q", "answer": [1, 2]}, "answer"),
        ({"prompt": "q", "answer": "1", "hints": "typo"}, "hints"),
        ({"prompt": "q", "answer": "1", "hint": 3}, "hint"),
        ({"prompt": [{"role": "robot", "content": "q"}], "answer": "1"}, "prompt[0].role"),
        ({"prompt": [{"role": "user"}], "answer": "1"}, "prompt[0]"),
        ({"prompt": "q", "answer": "1", "metadata": [1]}, "metadata"),
    ],
)
def test_native_errors_name_location_and_field(row, field):
    with pytest.raises(RowError, match=rf"^train\.jsonl:7: field '{re.escape(field)}'") as info:
        native(row)
    assert WHERE in str(info.value)


def guide_rl_row(**overrides):
    row = {
        "prompt": [{"role": "user", "content": "Find x if 2x = 6."}],
        "hint": [{"role": "user", "content": "Find x if 2x = 6.\nHint: divide both sides by 2."}],
        "reward_model": {"ground_truth": "\\boxed{3}", "style": "rule"},
        "data_source": "math/algebra/linear",
        "ability": "math",
        "extra_info": {"index": 41},
        "cot": None,
    }
    row.update(overrides)
    return row


def test_guide_rl_row_maps_the_full_hinted_text():
    prompt = prompt_from_guide_rl_row(guide_rl_row(), where=WHERE, default_id="x")
    assert prompt.id == "math/algebra/linear/41" and prompt.source == "math/algebra/linear"
    assert prompt.answer == "\\boxed{3}"
    assert prompt.hint is None and prompt.has_hint
    # The hinted prompt is the authors' full hinted text, used as is (no hint template applied on top).
    assert hinted_prompt(prompt) == [{"role": "user", "content": "Find x if 2x = 6.\nHint: divide both sides by 2."}]
    assert prompt.prompt == [{"role": "user", "content": "Find x if 2x = 6."}]
    assert prompt.metadata == {"ability": "math", "extra_info": {"index": 41}}


def test_guide_rl_row_without_hint_and_with_answer_list():
    row = guide_rl_row(hint=None, reward_model={"ground_truth": ["3", "3.0"]}, extra_info=None)
    prompt = prompt_from_guide_rl_row(row, where=WHERE, default_id="train/40")
    assert (prompt.id, prompt.answer, prompt.has_hint) == ("train/40", ["3", "3.0"], False)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"reward_model": {"style": "rule"}}, "reward_model.ground_truth"),
        ({"data_source": None}, "data_source"),
        ({"prompt": "plain text"}, "prompt"),
        ({"hint": []}, "hint"),
    ],
)
def test_guide_rl_errors_name_field(overrides, field):
    with pytest.raises(RowError, match=rf"train\.jsonl:7: field '{re.escape(field)}'"):
        prompt_from_guide_rl_row(guide_rl_row(**overrides), where=WHERE, default_id="x")


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": "q", "answer": "1", "metadata": []}, "metadata", "expected an object, got list"),
        ({"prompt": "q", "answer": "1", "metadata": 0}, "metadata", "expected an object, got int"),
        ({"prompt": "q", "answer": "1", "metadata": ""}, "metadata", "expected an object, got str"),
        ({"prompt": "q", "answer": float("nan")}, "answer", "expected a finite number, got nan"),
        ({"prompt": "q", "answer": float("inf")}, "answer", "expected a finite number, got inf"),
        ({"prompt": "q", "answer": "1", "metadata": {"tests": "assert f(1) == 2"}}, "metadata.tests", "an object"),
        (
            {"prompt": "q", "answer": "1", "metadata": {"tests": {"inputs": "1 2\n", "outputs": "3\n"}}},
            "metadata.tests.inputs",
            "expected a list of strings, got str",
        ),
        (
            {"prompt": "q", "answer": "1", "metadata": {"tests": {"asserts": "assert f(1) == 2"}}},
            "metadata.tests.asserts",
            "expected a list of strings, got str",
        ),
    ],
    ids=["list_metadata", "zero_metadata", "empty_string_metadata", "nan", "inf", "tests", "inputs", "asserts"],
)
def test_values_that_used_to_pass_silently_are_errors(row, field, problem):
    with pytest.raises(RowError, match=rf"^train\.jsonl:7: field '{re.escape(field)}': .*{re.escape(problem)}"):
        native(row)


def test_code_tests_given_as_lists_load():
    tests = {"inputs": ["1 2\n"], "outputs": ["3\n"], "asserts": ["assert f(1) == 2"]}
    assert native({"prompt": "q", "answer": "1", "metadata": {"tests": tests}}).metadata == {"tests": tests}

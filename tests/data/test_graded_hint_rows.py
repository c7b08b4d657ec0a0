"""Graded hints in our row schema: a list of hints, weakest first, under the `hint` field."""

import pytest

from guide_mega.data.rows import RowError, prompt_from_native_row


def _row(hint):
    return prompt_from_native_row(
        {"prompt": "2 cats?", "answer": 8, "hint": hint}, where="train.jsonl:3", default_id="r3", default_source="s"
    )


def test_a_list_of_hints_is_graded_weakest_first():
    prompt = _row(["a cat has 4 legs", "2 cats have 2 x 4 legs"])
    assert prompt.hint == ["a cat has 4 legs", "2 cats have 2 x 4 legs"] and prompt.num_hint_levels == 2
    assert _row("a cat has 4 legs").num_hint_levels == 1 and _row(None).num_hint_levels == 0


@pytest.mark.parametrize("bad", [[], ["ok", ""], ["ok", 3]])
def test_a_bad_hint_list_names_the_file_line_and_field(bad):
    with pytest.raises(RowError, match=r"train.jsonl:3: field 'hint': expected a non-empty list of non-empty strings"):
        _row(bad)


def test_more_graded_hints_than_the_metrics_hold_is_an_error_at_load():
    assert _row([f"hint {level}" for level in range(16)]).num_hint_levels == 16
    with pytest.raises(RowError, match=r"train.jsonl:3: field 'hint': at most 16 graded hints, got 17"):
        _row([f"hint {level}" for level in range(17)])

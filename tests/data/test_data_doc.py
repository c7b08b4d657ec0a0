"""docs/data.md's example rows load through our loader as the doc says, in JSONL and in Parquet, and none of
their hints gives the answer away."""

import json
import re
from pathlib import Path

import pyarrow
import pyarrow.parquet

from guide_mega.data.files import load_prompt_file
from guide_mega.data.hints import hint_leaks_answer, problem_text

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def _doc_rows() -> tuple[list[dict], list[dict]]:
    """The doc's JSONL example rows: (native rows, guide_rl rows)."""
    blocks = re.findall(r"```jsonl\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    rows = [json.loads(line) for block in blocks for line in block.splitlines() if line.strip()]
    return [r for r in rows if "data_source" not in r], [r for r in rows if "data_source" in r]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_native_example_rows_load_as_described(tmp_path):
    native, _ = _doc_rows()
    prompts = load_prompt_file(_write_jsonl(tmp_path / "problems.jsonl", native)).prompts
    by_id = {prompt.id: prompt for prompt in prompts}
    assert list(by_id) == ["gsm-0001", "algebra-17", "nt-3", "problems/3", "sci-8"]
    assert by_id["gsm-0001"].source == "gsm8k" and isinstance(by_id["gsm-0001"].hint, str)
    chat = by_id["algebra-17"]
    assert [m["role"] for m in chat.prompt] == ["system", "user"] and chat.answer == ["2, 3", "3, 2", "\\{2, 3\\}"]
    assert chat.metadata == {"difficulty": "easy"}
    assert by_id["nt-3"].num_hint_levels == 2
    default = by_id["problems/3"]
    assert (default.answer, default.hint, default.source) == ("24", None, "problems")
    assert by_id["sci-8"].metadata["choices"][1] == "Carbon dioxide"


def test_no_example_hint_leaks_its_answer(tmp_path):
    native, _ = _doc_rows()
    for prompt in load_prompt_file(_write_jsonl(tmp_path / "problems.jsonl", native)).prompts:
        hints = [prompt.hint] if isinstance(prompt.hint, str) else prompt.hint or []
        answers = [prompt.answer] if isinstance(prompt.answer, str) else prompt.answer
        for hint in hints:
            assert not any(hint_leaks_answer(hint, answer=a, question=problem_text(prompt)) for a in answers), hint


def test_guide_rl_example_row_loads_from_jsonl_and_parquet(tmp_path):
    _, guide_rl = _doc_rows()
    assert len(guide_rl) == 1
    parquet = tmp_path / "guide.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(guide_rl), parquet)  # the doc's conversion snippet
    for path in (_write_jsonl(tmp_path / "guide.jsonl", guide_rl), parquet):
        (prompt,) = load_prompt_file(path, schema="guide_rl").prompts
        assert (prompt.id, prompt.answer, prompt.source) == ("math/olympiad/algebra/12", "0", "math/olympiad/algebra")
        assert prompt.prompt[-1]["content"].startswith("Find the sum") and "Hint:" not in prompt.prompt[-1]["content"]
        assert "Hint: the solutions come in a pair" in prompt.hinted_prompt[-1]["content"]
        assert prompt.metadata["ability"] == "math"


def test_parquet_of_one_type_per_column_loads(tmp_path):
    native, _ = _doc_rows()
    plain = [row for row in native if isinstance(row["prompt"], str) and isinstance(row.get("hint", ""), str)]
    rows = [{**row, "answer": str(row["answer"])} for row in plain]
    rows = [{field: row.get(field) for field in ("id", "prompt", "answer", "hint", "source")} for row in rows]
    parquet = tmp_path / "plain.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), parquet)
    prompts = load_prompt_file(parquet).prompts
    assert [p.id for p in prompts] == ["gsm-0001", "plain/1", "sci-8"]

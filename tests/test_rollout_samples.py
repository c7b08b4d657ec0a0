"""samples.jsonl: which rollouts of a step are written, what a row holds, the size cap and resume."""

import json

from guide_mega.rollout_samples import SAMPLE_FIELDS, SampleFile, pick_rollouts, sample_rows
from guide_mega.types import Prompt, Rollout, RolloutGroup


def _group(prompt_id, rewards, *, guided=False, finish_reason="stop"):
    prompt = Prompt(id=prompt_id, prompt=f"What is {prompt_id}?", answer="1", hint=f"think about {prompt_id}")
    rollouts = [
        Rollout(
            prompt_id=prompt_id, sampled_prompt_ids=[1], train_prompt_ids=[1], response_ids=[5] * (index + 1),
            response_text=f"{prompt_id} answer {index}", reward=reward, correct=reward > 0, is_guided=guided,
            finish_reason=finish_reason, hint_level=1 if guided else -1,
        )
        for index, reward in enumerate(rewards)
    ]  # fmt: skip
    return RolloutGroup(prompt=prompt, rollouts=rollouts, is_guided=guided)


def test_picks_every_group_in_turn_guided_first():
    plain = [_group("a", [0, 0, 0]), _group("b", [1, 0, 0])]
    guided = [_group("a", [1, 0, 1], guided=True)]
    picked = pick_rollouts(plain + guided, 5)
    assert [(group.prompt.id, group.is_guided, group.rollouts.index(r)) for group, r in picked] == [
        ("a", True, 0), ("a", False, 0), ("b", False, 0), ("a", True, 1), ("a", False, 1),
    ]  # fmt: skip
    assert len(pick_rollouts(plain + guided, 100)) == 9
    assert pick_rollouts(plain, 0) == []


def test_rows_carry_prompt_hint_response_reward_and_finish_reason():
    groups = [_group("a", [0, 0]), _group("a", [1, 0], guided=True, finish_reason="length")]
    guided_row, plain_row = sample_rows(7, groups, 2)
    assert list(guided_row) == list(SAMPLE_FIELDS)
    assert guided_row == {
        "step": 7, "prompt_id": "a", "guided": True, "prompt": "What is a?", "hint": "think about a",
        "hint_level": 1, "response": "a answer 0", "reward": 1, "correct": True, "finish_reason": "length",
        "response_tokens": 1, "group_accuracy": 0.5,
    }  # fmt: skip
    # A hint-free sample was not sampled with the hint: the row does not claim one.
    assert (
        plain_row["hint"] is None
        and plain_row["hint_level"] is None
        and plain_row["guided"] is False
        and plain_row["group_accuracy"] == 0.0
    )


def test_the_file_stops_at_its_cap_and_counts_what_it_refused(tmp_path):
    rows = sample_rows(1, [_group("a", [0] * 6)], 6)
    line_bytes = len((json.dumps(rows[0], ensure_ascii=False) + "\n").encode())
    samples = SampleFile(tmp_path / "samples.jsonl", max_bytes=int(line_bytes * 3.5))
    samples.restart_after(0)
    assert samples.append(rows[:2]) == 0
    assert samples.append(rows[2:]) == 3
    assert samples.num_not_written == 3
    assert len(samples.path.read_text().splitlines()) == 3
    assert samples.path.stat().st_size <= samples.max_bytes


def test_a_resumed_run_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    samples = SampleFile(tmp_path / "samples.jsonl", max_bytes=1 << 20)
    samples.restart_after(0)
    for step in (1, 2, 3):
        samples.append(sample_rows(step, [_group("a", [0, 1])], 2))
    samples.restart_after(2)
    assert [json.loads(line)["step"] for line in samples.path.read_text().splitlines()] == [1, 1, 2, 2]
    samples.restart_after(0)
    assert samples.path.read_text() == ""

"""Readable rollouts: a few of each step's samples as JSON rows, appended to `<run_dir>/samples.jsonl`.

A row holds what a person needs to judge a sample: the prompt, the hint it was sampled with and its level (guided
samples only), the response, its reward and correctness, why generation stopped, and how its group fared.
"""

from __future__ import annotations

import json
from pathlib import Path

from guide_mega.types import Rollout, RolloutGroup

# The fields of a sample row, in order (also the columns of the W&B samples table).
SAMPLE_FIELDS = (
    "step",
    "prompt_id",
    "guided",
    "prompt",
    "hint",
    "hint_level",
    "response",
    "reward",
    "correct",
    "finish_reason",
    "response_tokens",
    "group_accuracy",
)


def pick_rollouts(groups: list[RolloutGroup], count: int) -> list[tuple[RolloutGroup, Rollout]]:
    """Up to `count` (group, rollout) pairs: the first rollout of every group, then every second one, and so on,
    guided groups first, so that a small sample still spans many prompts and shows what the hints did."""
    ordered = sorted(groups, key=lambda group: not group.is_guided)  # stable: each wave keeps its order
    depth = max((len(group.rollouts) for group in ordered), default=0)
    pairs = [(group, group.rollouts[i]) for i in range(depth) for group in ordered if i < len(group.rollouts)]
    return pairs[:count]


def sample_rows(step: int, groups: list[RolloutGroup], count: int) -> list[dict]:
    """The rows of `count` rollouts of a step's sampled groups (both waves), in SAMPLE_FIELDS order."""
    rows = []
    for group, rollout in pick_rollouts(groups, count):
        prompt = group.prompt
        hint = None
        if rollout.is_guided:
            hint = prompt.hinted_prompt if prompt.hinted_prompt is not None else prompt.hint
        values = {
            "step": step,
            "prompt_id": prompt.id,
            "guided": rollout.is_guided,
            "prompt": prompt.prompt,
            "hint": hint,
            "hint_level": rollout.hint_level if rollout.is_guided else None,
            "response": rollout.response_text,
            "reward": rollout.reward,
            "correct": rollout.correct,
            "finish_reason": rollout.finish_reason,
            "response_tokens": len(rollout.response_ids),
            "group_accuracy": group.success_rate,
        }
        rows.append({name: values[name] for name in SAMPLE_FIELDS})
    return rows


class SampleFile:
    """An append-only JSONL file of sample rows that stops growing at `max_bytes`; rows past it are counted."""

    def __init__(self, path: str | Path, *, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.num_not_written = 0
        """Rows refused because the file had reached max_bytes."""

    def restart_after(self, step: int) -> None:
        """Keep only the rows of steps <= `step` (0: none): a resumed run rewrites the steps after its checkpoint."""
        kept = ""
        if step > 0 and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = "".join(line for line in lines if line.strip() and json.loads(line)["step"] <= step)
        self.path.write_text(kept, encoding="utf-8")
        self.num_not_written = 0

    def append(self, rows: list[dict]) -> int:
        """Write the rows that fit under max_bytes; returns how many did not."""
        size = self.path.stat().st_size if self.path.exists() else 0
        refused = 0
        with self.path.open("a", encoding="utf-8") as handle:
            for row in rows:
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                if size + len(line) > self.max_bytes:
                    refused += 1
                    continue
                handle.write(line.decode("utf-8"))
                size += len(line)
        self.num_not_written += refused
        return refused

"""Where a pass@1 change comes from: self-distillation, capability gain and forgetting; and a hint's lift.

A problem is *solved at pass@1* when its estimated pass@1 (c / n) is at least `solved_threshold`, and *within
reach* before training when its estimated pass@k is at least `reach_threshold`. Problems that go from unsolved to
solved are *self-distillation* when they were within reach before (the model already found the answer within k
tries, and RL made it the likely one) and *capability gain* otherwise; solved problems that become unsolved are
*forgetting*. The paper uses k = 16 from 100 samples; both thresholds are parameters because the paper does not
pin them down (with 0.5 each rule is the more-likely-than-not reading).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from guide_mega.evaluation.passk import EvalResults, pass_at_k


@dataclass(frozen=True)
class Decomposition:
    """Counts of problems and the fractions of all problems, plus the mean pass@1 change they explain."""

    num_problems: int
    k: int
    solved_before: int
    solved_after: int
    self_distillation: int
    capability_gain: int
    forgetting: int
    mean_pass_at_1_before: float
    mean_pass_at_1_after: float

    @property
    def net_change(self) -> float:
        """Change in the fraction of problems solved at pass@1: (gains - forgetting) / problems."""
        return (self.self_distillation + self.capability_gain - self.forgetting) / self.num_problems

    def as_dict(self) -> dict:
        counts = asdict(self)
        fractions = {
            f"{name}_fraction": counts[name] / self.num_problems
            for name in ("self_distillation", "capability_gain", "forgetting", "solved_before", "solved_after")
        }
        return {**counts, **fractions, "net_change": self.net_change}


def _paired(before: EvalResults, after: EvalResults):
    before_by_id, after_by_id = before.by_id(), after.by_id()
    if set(before_by_id) != set(after_by_id):
        only_before = sorted(set(before_by_id) - set(after_by_id))[:5]
        only_after = sorted(set(after_by_id) - set(before_by_id))[:5]
        raise ValueError(f"before/after cover different problems: only before {only_before}, only after {only_after}")
    return [(before_by_id[i], after_by_id[i]) for i in sorted(before_by_id)]


def largest_valid_k(*results: EvalResults) -> int:
    """The largest k of pass@k that every problem of every results allows: their fewest samples."""
    return min(problem.num_samples for result in results for problem in result.problems)


def decompose_pass_at_1_change(
    before: EvalResults,
    after: EvalResults,
    *,
    k: int = 16,
    solved_threshold: float = 0.5,
    reach_threshold: float = 0.5,
) -> Decomposition:
    """Split the change in problems solved at pass@1 into self-distillation, capability gain and forgetting."""
    pairs = _paired(before, after)
    counts = dict.fromkeys(("solved_before", "solved_after", "self_distillation", "capability_gain", "forgetting"), 0)
    for old, new in pairs:
        solved_old = old.num_correct / old.num_samples >= solved_threshold
        solved_new = new.num_correct / new.num_samples >= solved_threshold
        counts["solved_before"] += solved_old
        counts["solved_after"] += solved_new
        if solved_new and not solved_old:
            within_reach = pass_at_k(old.num_samples, old.num_correct, k) >= reach_threshold
            counts["self_distillation" if within_reach else "capability_gain"] += 1
        elif solved_old and not solved_new:
            counts["forgetting"] += 1
    return Decomposition(
        num_problems=len(pairs),
        k=k,
        **counts,
        mean_pass_at_1_before=float(np.mean([o.num_correct / o.num_samples for o, _ in pairs])),
        mean_pass_at_1_after=float(np.mean([n.num_correct / n.num_samples for _, n in pairs])),
    )


def hint_lift(without_hint: EvalResults, with_hint: EvalResults, *, ks: list[int]) -> dict:
    """pass@k of the same problems without and with their hints, the lift, and how many problems the hint unlocks
    (no correct sample without it, at least one with it)."""
    pairs = _paired(without_hint, with_hint)
    unlocked = sum(1 for plain, hinted in pairs if plain.num_correct == 0 and hinted.num_correct > 0)
    rows = {}
    for k in ks:
        plain = without_hint.pass_at_k(k)
        hinted = with_hint.pass_at_k(k)
        rows[str(k)] = {"without_hint": plain, "with_hint": hinted, "lift": hinted - plain}
    unsolved = sum(1 for plain, _ in pairs if plain.num_correct == 0)
    return {"num_problems": len(pairs), "unsolved_without_hint": unsolved, "unlocked_by_hint": unlocked, "pass@k": rows}

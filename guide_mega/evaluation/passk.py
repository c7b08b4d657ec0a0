"""The unbiased pass@k estimator and per-problem evaluation results.

Shape legend: P problems, N samples per problem.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021) for n samples of which c are correct.

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms a binomial coefficient, so it is exact
    to float precision for any n (C(100, 16) alone is ~1.3e18).
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= correct <= samples, got {num_correct} of {num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, {num_samples}], got {k}")
    if num_samples - num_correct < k:
        return 1.0
    factors = 1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1, dtype=np.float64)
    return float(1.0 - np.prod(factors))


def pass_at_k_array(num_samples_P: np.ndarray, num_correct_P: np.ndarray, k: int) -> np.ndarray:
    """pass@k per problem [P] (problems may have different sample counts, each at least k)."""
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(num_samples_P, num_correct_P, strict=True)])


@dataclass(kw_only=True)
class ProblemResult:
    """One problem's evaluation: n samples, c of them correct, and the greedy answer's correctness."""

    id: str
    source: str = ""
    num_samples: int
    num_correct: int
    greedy_correct: bool | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.num_correct <= self.num_samples or self.num_samples < 1:
            raise ValueError(f"problem {self.id!r}: {self.num_correct} correct of {self.num_samples} samples")


@dataclass(kw_only=True)
class EvalResults:
    """Results of one evaluation run: per-problem counts plus free-form metadata (checkpoint, sampling, date)."""

    problems: list[ProblemResult]
    meta: dict = field(default_factory=dict)

    def by_id(self) -> dict[str, ProblemResult]:
        return {problem.id: problem for problem in self.problems}

    def pass_at_k(self, k: int, *, source: str | None = None) -> float:
        """Mean pass@k over problems (of one source, if given)."""
        selected = [p for p in self.problems if source is None or p.source == source]
        if not selected:
            raise ValueError(f"no problems{'' if source is None else f' from source {source!r}'}")
        return float(np.mean([pass_at_k(p.num_samples, p.num_correct, k) for p in selected]))

    def greedy_pass_at_1(self) -> float | None:
        graded = [p.greedy_correct for p in self.problems if p.greedy_correct is not None]
        return float(np.mean(graded)) if graded else None

    def summary(self, ks: list[int]) -> dict:
        """pass@k for each k, overall and per source, and greedy pass@1."""
        sources = sorted({p.source for p in self.problems})
        return {
            "num_problems": len(self.problems),
            "greedy_pass@1": self.greedy_pass_at_1(),
            "pass@k": {str(k): self.pass_at_k(k) for k in ks},
            "per_source": {s: {str(k): self.pass_at_k(k, source=s) for k in ks} for s in sources},
        }

    def save(self, path: str | Path) -> None:
        payload = {"meta": self.meta, "problems": [asdict(p) for p in self.problems]}
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EvalResults:
        try:
            payload = json.loads(Path(path).read_text())
            problems = [ProblemResult(**row) for row in payload["problems"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not an evaluation results file: {exc}") from None
        return cls(problems=problems, meta=payload.get("meta", {}))


def summary_markdown(summary: dict) -> str:
    """A markdown table of a `summary()`: one row per source plus the total."""
    ks = list(summary["pass@k"])
    lines = ["| source | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for source, values in summary["per_source"].items():
        lines.append(f"| {source or '(none)'} | " + " | ".join(f"{values[k]:.3f}" for k in ks) + " |")
    lines.append("| **all** | " + " | ".join(f"**{summary['pass@k'][k]:.3f}**" for k in ks) + " |")
    if summary["greedy_pass@1"] is not None:
        lines.append(f"\nGreedy pass@1: {summary['greedy_pass@1']:.3f} over {summary['num_problems']} problems.")
    return "\n".join(lines) + "\n"

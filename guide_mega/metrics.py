"""Step metrics that add up correctly over sampling rounds and stages: counts sum, means are weighted.

A step may sample several rounds (Filter-GRPO) and each round runs the same stages. A stage returns its metrics
as `Metrics`; the caller adds them. A count (groups, tokens, retries) adds up across rounds; a mean (reward,
accuracy, response length) carries the number of things it averages, so that combined means are the mean over
everything, not over the last round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Metrics:
    """Counts and weighted means of one stage (or of several, added together)."""

    counts: Mapping[str, float] = field(default_factory=dict)
    """Name -> count; added across stages and rounds."""
    means: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Name -> (mean, weight): the mean of `weight` things; combined as a weighted mean."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", _frozen(self.counts))
        object.__setattr__(self, "means", _frozen(self.means))
        for name, (_, weight) in self.means.items():
            if weight < 0:
                raise ValueError(f"metric {name!r}: negative weight {weight}")
        both = set(self.counts) & set(self.means)
        if both:
            raise ValueError(f"metrics {sorted(both)} are both counts and means")

    def __add__(self, other: Metrics) -> Metrics:
        counts = dict(self.counts)
        for name, value in other.counts.items():
            counts[name] = counts.get(name, 0.0) + value
        means = dict(self.means)
        for name, (mean, weight) in other.means.items():
            old_mean, old_weight = means.get(name, (0.0, 0.0))
            total = old_weight + weight
            means[name] = ((old_mean * old_weight + mean * weight) / total if total else 0.0, total)
        return Metrics(counts, means)

    def as_dict(self) -> dict[str, float]:
        """Plain name -> value; a mean over nothing is left out rather than reported as 0."""
        values = {name: float(value) for name, value in self.counts.items()}
        values.update({name: float(mean) for name, (mean, weight) in self.means.items() if weight > 0})
        return values

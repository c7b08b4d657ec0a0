"""Step metrics combine correctly over sampling rounds: counts add up, means are weighted by what they average."""

import pytest

from guide_mega.metrics import Metrics


def test_counts_add_and_means_are_weighted_by_their_counts():
    first = Metrics(counts={"guide/num_guided_groups": 3}, means={"guide/guided_success_rate": (0.5, 8)})
    second = Metrics(counts={"guide/num_guided_groups": 1}, means={"guide/guided_success_rate": (0.0, 24)})
    total = (first + second).as_dict()
    assert total["guide/num_guided_groups"] == 4.0
    assert total["guide/guided_success_rate"] == pytest.approx(4 / 32)


def test_a_mean_over_nothing_is_left_out_and_empty_metrics_are_neutral():
    empty = Metrics(means={"guided/reward_mean": (0.0, 0)})
    assert empty.as_dict() == {}
    some = Metrics(counts={"a": 2.0}, means={"m": (0.25, 4)})
    assert (Metrics() + some).as_dict() == some.as_dict() == (some + Metrics()).as_dict()
    assert (some + empty).as_dict() == {"a": 2.0, "m": 0.25}


def test_a_name_cannot_be_both_a_count_and_a_mean():
    with pytest.raises(ValueError, match="both counts and means"):
        Metrics(counts={"x": 1.0}, means={"x": (1.0, 1)})
    with pytest.raises(ValueError, match="negative weight"):
        Metrics(means={"x": (1.0, -1)})

"""pass@k against exact combinatorics, and the decomposition / hint lift on hand-built correctness matrices."""

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from guide_mega.evaluation.analysis import decompose_pass_at_1_change, hint_lift, largest_valid_k
from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.evaluation.passk import EvalResults, ProblemResult, pass_at_k, summary_markdown
from guide_mega.evaluation.plots import plot_decomposition, plot_pass_at_k, plot_training_curves


def _exact_pass_at_k(n, c, k):
    """Fraction of the C(n, k) k-subsets of n samples (c correct) that contain a correct sample, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(_exact_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_large_n_matches_exact_binomials():
    for n, c, k in [(100, 3, 16), (100, 50, 16), (200, 1, 100), (1000, 7, 64)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(4, 5, 1)


def _results(correct_by_problem, n, sources=None):
    return EvalResults(
        problems=[
            ProblemResult(id=f"p{i}", source=(sources or {}).get(i, "s"), num_samples=n, num_correct=c)
            for i, c in enumerate(correct_by_problem)
        ]
    )


def test_decomposition_hand_computed():
    # n = 4, k = 2, solved at pass@1 when c/n >= 0.5, within reach when pass@2 >= 0.5.
    # p0: 0 -> 3 correct: pass@2 before 0        -> capability gain
    # p1: 1 -> 4 correct: pass@2 before 0.5      -> self-distillation
    # p2: 3 -> 0 correct                           -> forgetting
    # p3: 2 -> 2 correct: solved before and after -> nothing
    # p4: 0 -> 1 correct: still unsolved          -> nothing
    before = _results([0, 1, 3, 2, 0], 4)
    after = _results([3, 4, 0, 2, 1], 4)
    result = decompose_pass_at_1_change(before, after, k=2)
    assert (result.capability_gain, result.self_distillation, result.forgetting) == (1, 1, 1)
    assert (result.solved_before, result.solved_after) == (2, 3)
    assert result.net_change == pytest.approx(1 / 5)
    assert result.mean_pass_at_1_before == pytest.approx(6 / 20) and result.mean_pass_at_1_after == pytest.approx(0.5)
    fractions = result.as_dict()
    assert fractions["capability_gain_fraction"] == pytest.approx(0.2)


def test_decomposition_depends_on_k():
    before, after = _results([1], 8), _results([6], 8)
    assert decompose_pass_at_1_change(before, after, k=1).capability_gain == 1  # pass@1 = 1/8 < 0.5
    assert decompose_pass_at_1_change(before, after, k=8).self_distillation == 1  # pass@8 = 1


def test_decomposition_rejects_different_problem_sets():
    with pytest.raises(ValueError, match="different problems"):
        decompose_pass_at_1_change(_results([1, 2], 4), _results([1], 4))


def test_hint_lift():
    plain, hinted = _results([0, 0, 2, 0], 4), _results([2, 0, 4, 1], 4)
    lift = hint_lift(plain, hinted, ks=[1, 4])
    assert lift["unsolved_without_hint"] == 3 and lift["unlocked_by_hint"] == 2
    assert lift["pass@k"]["1"]["without_hint"] == pytest.approx(2 / 16)
    assert lift["pass@k"]["1"]["with_hint"] == pytest.approx(7 / 16)
    assert lift["pass@k"]["4"]["lift"] == pytest.approx(0.75 - 0.25)


def test_summary_per_source_round_trip_and_markdown(tmp_path):
    results = _results([0, 4, 2], 4, sources={0: "a", 1: "a", 2: "b"})
    results.problems[0].greedy_correct = False
    results.problems[1].greedy_correct = True
    summary = results.summary([1, 2])
    assert summary["per_source"]["a"]["1"] == pytest.approx(0.5) and summary["per_source"]["b"]["1"] == 0.5
    assert summary["greedy_pass@1"] == 0.5
    results.save(tmp_path / "r.json")
    assert EvalResults.load(tmp_path / "r.json") == results
    table = summary_markdown(summary)
    assert "| a | 0.500 |" in table and "**all**" in table
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        EvalResults.load(tmp_path / "bad.json")


def test_plots_write_pngs(tmp_path):
    before, after = _results([0, 1, 3], 8), _results([2, 5, 3], 8)
    assert plot_pass_at_k({"before": before, "after": after}, tmp_path / "passk.png").stat().st_size > 1000
    decomposition = decompose_pass_at_1_change(before, after, k=4)
    assert plot_decomposition(decomposition, tmp_path / "decomp.png").stat().st_size > 1000
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "reward/mean": float(np.sin(s))}) for s in range(5)) + "\n")
    assert plot_training_curves(metrics, tmp_path / "curves.png", keys=["reward/mean"]).stat().st_size > 1000
    metrics.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(metrics)


def test_largest_valid_k_is_the_fewest_samples_of_any_problem():
    eight = EvalResults(problems=[ProblemResult(id="a", num_samples=8, num_correct=1)])
    mixed = EvalResults(
        problems=[
            ProblemResult(id="a", num_samples=16, num_correct=0),
            ProblemResult(id="b", num_samples=6, num_correct=6),
        ]
    )
    assert largest_valid_k(eight) == 8
    assert largest_valid_k(eight, mixed) == 6

"""The training-curves figure: integer steps, a title, eval pass@k when logged, 'no data' panels, a readable loss."""

import json

from guide_mega.evaluation.plots import plot_training_curves, training_curves_figure

ROWS = [
    {"step": 1, "rollout/reward_mean": 0.0, "loss": 0.002, "eval/pass@1": 0.1, "eval/pass@4": 0.3},
    {"step": 2, "rollout/reward_mean": 0.1, "loss": -0.0005},
    {"step": 3, "rollout/reward_mean": 0.2, "loss": 3.5, "eval/pass@1": 0.2, "eval/pass@4": 0.5,
     "eval/greedy_pass@1": 0.0, "eval/num_problems": 20.0},
    {"step": 4, "rollout/reward_mean": None, "loss": 0.001},
]  # fmt: skip
KEYS = ["rollout/reward_mean", "guide/hint_reliance", "loss"]


def _texts(axes):
    return [text.get_text() for text in axes.texts]


def test_panels_title_integer_steps_eval_and_no_data(tmp_path):
    figure = training_curves_figure(ROWS, keys=KEYS, title="demo: Guide-GRPO + filter")
    reward, hint_reliance, loss, evaluation = figure.axes
    assert figure.get_suptitle() == "demo: Guide-GRPO + filter"
    figure.canvas.draw()
    for axes in figure.axes:
        ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    # A key the run never logged says so instead of an empty frame; a null (non-finite) value is skipped.
    assert _texts(hint_reliance) == ["no data"] and _texts(reward) == []
    assert list(reward.lines[0].get_xdata()) == [1, 2, 3]
    # A loss near zero of either sign with one spike: symmetric log, linear up to the typical magnitude.
    assert loss.get_yscale() == "symlog" and reward.get_yscale() == "linear"
    # Every logged pass@k over the steps it was logged at, ordered by k, greedy last; eval/num_problems is no curve.
    assert [line.get_label() for line in evaluation.lines] == ["pass@1", "pass@4", "greedy_pass@1"]
    assert list(evaluation.lines[1].get_xdata()) == [1, 3]


def test_a_run_without_eval_has_no_eval_panel_and_the_png_is_written(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({key: row[key] for key in ("step", "loss")}) + "\n" for row in ROWS))
    assert len(training_curves_figure([], keys=KEYS).axes) == len(KEYS)
    path = plot_training_curves(metrics, tmp_path / "curves.png", keys=KEYS, title="run: GRPO")
    assert path.stat().st_size > 1000

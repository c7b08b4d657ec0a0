"""PNG plots: pass@k curves, the pass@1 decomposition, and training curves from a run's metrics.jsonl."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from guide_mega.evaluation.analysis import Decomposition  # noqa: E402
from guide_mega.evaluation.metrics_file import read_metrics  # noqa: E402
from guide_mega.evaluation.passk import EvalResults  # noqa: E402

# The eval metrics of a run's periodic evaluation drawn together: eval/pass@<k> and eval/greedy_pass@1.
EVAL_PASS_AT = re.compile(r"^eval/(greedy_)?pass@\d+$")


def plot_pass_at_k(curves: dict[str, EvalResults], path: str | Path, *, max_k: int | None = None) -> Path:
    """pass@k against k (log scale) for each labelled result set, e.g. {'before': ..., 'after': ...}."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, results in curves.items():
        limit = min(p.num_samples for p in results.problems)
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= min(limit, max_k or limit)]
        axes.plot(ks, [results.pass_at_k(k) for k in ks], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("k")
    axes.set_ylabel("pass@k")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_decomposition(decomposition: Decomposition, path: str | Path) -> Path:
    """Bars of self-distillation, capability gain and forgetting (as fractions of all problems) and the net change."""
    values = decomposition.as_dict()
    names = ["self_distillation", "capability_gain", "forgetting"]
    heights = [values[f"{name}_fraction"] for name in names[:2]] + [-values["forgetting_fraction"]]
    figure, axes = plt.subplots(figsize=(6, 4))
    bars = axes.bar(["self-distillation", "capability gain", "forgetting", "net"], heights + [values["net_change"]],
                    color=["tab:blue", "tab:green", "tab:red", "tab:gray"])  # fmt: skip
    for bar, name in zip(bars, names + ["net"], strict=True):
        label = str(values[name]) if name != "net" else f"{values['net_change']:+.3f}"
        axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("fraction of problems")
    axes.set_title(f"pass@1 change, reach judged at pass@{decomposition.k}")
    return _save(figure, path)


def plot_training_curves(
    metrics_path: str | Path, path: str | Path, *, keys: list[str], title: str | None = None
) -> Path:
    """The training curves of a run's metrics.jsonl (rows with a 'step' field) as a PNG: `training_curves_figure`."""
    return _save(training_curves_figure(read_metrics(metrics_path), keys=keys, title=title), path)


def training_curves_figure(rows: list[dict], *, keys: list[str], title: str | None = None) -> Figure:
    """One panel per metric key against the (integer) step, then one of eval pass@k when the run logged any.

    A key with no logged value gets a panel that says "no data" rather than an empty frame; loss panels use a
    symmetric log scale, where both a spike and values near zero (of either sign) stay readable.
    """
    eval_keys = sorted({key for row in rows for key in row if EVAL_PASS_AT.match(key)}, key=_eval_order)
    panels = [[key] for key in keys] + ([eval_keys] if eval_keys else [])
    figure, axes_list = plt.subplots(len(panels), 1, figsize=(6, 2.2 * len(panels)), sharex=True, squeeze=False)
    for axes, panel in zip(axes_list[:, 0], panels, strict=True):
        _plot_panel(axes, rows, panel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes_list[-1, 0].set_xlabel("step")
    if title:
        figure.suptitle(title)
    return figure


def _plot_panel(axes, rows: list[dict], keys: list[str]) -> None:
    """The logged values of `keys` (one line each) on one panel; nulls (non-finite values) are left out."""
    plotted = []
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None and "step" in row]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker=".", label=key.split("/")[-1])
            plotted += values
    axes.set_ylabel("eval" if len(keys) > 1 else keys[0].split("/")[-1], fontsize=8)
    axes.grid(alpha=0.3)
    if not plotted:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="gray")
        return
    if len(keys) > 1:
        axes.legend(fontsize=7)
    if any(key == "loss" or key.endswith("_loss") for key in keys):
        magnitudes = sorted(abs(value) for value in plotted if value != 0)
        # Linear up to the power of ten below the typical magnitude, logarithmic beyond: a loss is small and changes
        # sign, and a power of ten keeps the ticks at 0, +-threshold, +-10 x threshold evenly apart.
        typical = magnitudes[len(magnitudes) // 2] if magnitudes else 1.0
        axes.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(typical)))


def _eval_order(key: str) -> tuple[int, int]:
    """eval/pass@1, pass@2, ... by k, then greedy_pass@1."""
    return (key.startswith("eval/greedy"), int(key.rsplit("@", 1)[1]))


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""PNG plots: pass@k curves, the pass@1 decomposition, and training curves from a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

from guide_mega.evaluation.analysis import Decomposition  # noqa: E402
from guide_mega.evaluation.metrics_file import read_metrics  # noqa: E402
from guide_mega.evaluation.passk import EvalResults  # noqa: E402


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


def plot_training_curves(metrics_path: str | Path, path: str | Path, *, keys: list[str]) -> Path:
    """One panel per metric key against the step, from a run's metrics.jsonl (rows with a 'step' field)."""
    rows = read_metrics(metrics_path)
    figure, axes_list = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
    for axes, key in zip(axes_list[:, 0], keys, strict=True):
        points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker=".")
        axes.set_ylabel(key.split("/")[-1], fontsize=8)
        axes.grid(alpha=0.3)
    axes_list[-1, 0].set_xlabel("step")
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""A run's record: the resolved config, metrics as JSONL and TensorBoard, a progress bar and the summary table.

Only the logging rank (global rank 0) writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from guide_mega.config import Config, dump_config
from guide_mega.evaluation.metrics_file import read_metrics

# Columns of the end-of-run summary: (metric key, header, format).
SUMMARY_COLUMNS = [
    ("rollout/reward_mean", "reward", "{:.3f}"),
    ("rollout/accuracy", "accuracy", "{:.3f}"),
    ("guide/num_unsolved_groups", "unsolved", "{:.0f}"),
    ("guide/guided_success_rate", "guided success", "{:.3f}"),
    ("guide/hint_reliance", "hint reliance", "{:.2f}"),
    ("loss", "loss", "{:.4f}"),
    ("perf/rollout_tokens_per_s", "rollout tok/s", "{:.0f}"),
    ("time/step_s", "step s", "{:.0f}"),
]
# What the progress bar shows after each step: (metric key, label).
PROGRESS_FIELDS = [
    ("rollout/reward_mean", "reward"),
    ("guide/num_unsolved_groups", "unsolved"),
    ("guide/guided_success_rate", "guided"),
    ("perf/rollout_tokens_per_s", "tok/s"),
]


class RunLog:
    """Writes `<run_dir>/config.yaml`, `metrics.jsonl` and TensorBoard events; shows a bar with an ETA."""

    def __init__(self, run_dir: str | Path, config: Config, *, total_steps: int) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, self.run_dir / "config.yaml")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self._writer = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._bar = tqdm(total=total_steps, desc="guide-mega", unit="step", disable=not config.logging.progress_bar)

    def begin(self, first_step: int) -> None:
        """Start logging after step `first_step` (0 for a fresh run, the checkpoint's step on resume).

        Rows of later steps in an existing metrics.jsonl were logged after the checkpoint by a run that then died;
        those steps are about to run again, so their rows are removed rather than duplicated.
        """
        kept = []
        if first_step > 0 and self.metrics_path.exists():
            kept = [row for row in read_metrics(self.metrics_path) if row.get("step", 0) <= first_step]
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.rows = kept
        self._bar.reset(total=self._bar.total)
        self._bar.update(first_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one step's metrics (non-finite values are written as null, never dropped)."""
        row = {"step": step, "time": time.time()}
        row.update({key: (float(value) if math.isfinite(float(value)) else None) for key, value in metrics.items()})
        self.rows.append(row)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("step", "time") and value is not None:
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        shown = {label: f"{row[key]:.3g}" for key, label in PROGRESS_FIELDS if row.get(key) is not None}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def message(self, text: str) -> None:
        """A line above the progress bar (skipped prompts, partial batches, checkpoints)."""
        self._bar.write(text)

    def summary_table(self) -> str:
        """Markdown table, one row per logged step, of the SUMMARY_COLUMNS."""
        header = "| step | " + " | ".join(title for _, title, _ in SUMMARY_COLUMNS) + " |"
        lines = [header, "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
        for row in self.rows:
            cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in SUMMARY_COLUMNS]
            lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()


class NullRunLog:
    """The logger of ranks other than 0."""

    rows: list[dict] = []

    def begin(self, first_step: int) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def message(self, text: str) -> None: ...

    def summary_table(self) -> str:
        return ""

    def close(self) -> None: ...

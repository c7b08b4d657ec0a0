"""A run's record: the resolved config, metrics as JSONL and TensorBoard (and W&B), rollout samples, progress on
the console and the summary table.

Only the logging rank (global rank 0) writes; the others get a logger that does nothing. On a terminal the
console shows a progress bar naming the phase of the running step; otherwise (a log file, or
logging.progress_bar=false) it prints one line per step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from guide_mega.config import Config, dump_config
from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.rollout_samples import SampleFile, sample_rows
from guide_mega.types import RolloutGroup

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
# What the line of a step shows before its phase times: (metric key, label, format).
STEP_LINE_FIELDS = [
    ("rollout/reward_mean", "reward", "{:.3f}"),
    ("guide/num_unsolved_groups", "unsolved", "{:.0f}"),
    ("guide/guided_success_rate", "guided success", "{:.3f}"),
    ("loss", "loss", "{:.4g}"),
    ("perf/rollout_tokens_per_s", "tok/s", "{:.0f}"),
]
BAR_LABEL = "guide-mega"


def step_line(step: int, total_steps: int, row: dict) -> str:
    """One step as a line: the STEP_LINE_FIELDS it has, then the seconds of each phase that took at least 0.05 s
    (a colocated engine's sleep and wake on CPU take none) and of the whole step."""
    parts = [f"step {step}/{total_steps}"]
    parts += [f"{label} {fmt.format(row[key])}" for key, label, fmt in STEP_LINE_FIELDS if row.get(key) is not None]
    phases = [
        f"{key[len('time/') : -len('_s')]} {value:.1f}s"
        for key, value in row.items()
        if key.startswith("time/") and key.endswith("_s") and key != "time/step_s" and (value or 0.0) >= 0.05
    ]
    if phases:
        parts.append(" ".join(phases))
    if row.get("time/step_s") is not None:
        parts.append(f"step {row['time/step_s']:.1f}s")
    return " | ".join(parts)


def _on_terminal() -> bool:
    """Whether the console is a terminal: a bar in a redirected log would be a wall of carriage returns."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class RunLog:
    """Writes `<run_dir>/config.yaml`, `metrics.jsonl`, `samples.jsonl`, TensorBoard events and (optionally) a W&B
    run; shows a bar with the current phase and an ETA, or one line per step."""

    def __init__(self, run_dir: str | Path, config: Config, *, total_steps: int) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, self.run_dir / "config.yaml")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.total_steps = total_steps
        settings = config.logging
        self._writer = None
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._samples_per_step = settings.samples_per_step
        self.samples_file = SampleFile(self.run_dir / "samples.jsonl", max_bytes=int(settings.samples_max_mb * 2**20))
        self._pending_samples: list[dict] = []
        self._config = config
        self._wandb = None
        self.per_step_lines = not (settings.progress_bar and _on_terminal())
        self._bar = tqdm(total=total_steps, desc=BAR_LABEL, unit="step", disable=self.per_step_lines)

    def begin(self, first_step: int) -> None:
        """Start logging after step `first_step` (0 for a fresh run, the checkpoint's step on resume).

        Rows of later steps in an existing metrics.jsonl (and samples.jsonl) were logged after the checkpoint by a
        run that then died; those steps are about to run again, so their rows are removed rather than duplicated.
        """
        kept = []
        if first_step > 0 and self.metrics_path.exists():
            kept = [row for row in read_metrics(self.metrics_path) if row.get("step", 0) <= first_step]
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.rows = kept
        self.samples_file.restart_after(first_step)
        if self._config.logging.wandb.enabled:
            from guide_mega.wandb_log import WandbLog

            self._wandb = WandbLog(self._config, self.run_dir, resume=first_step > 0)
        self._bar.reset(total=self._bar.total)
        self._bar.update(first_step)

    def phase(self, name: str) -> None:
        """The step has entered phase `name` (rollout, guide wave, old_logprobs, train, weight_sync, ...): the bar
        names it, so a long step shows what it is doing."""
        self._bar.set_description_str(f"{BAR_LABEL} [{name.replace('_', ' ')}]")

    def samples(self, step: int, groups: list[RolloutGroup]) -> None:
        """Write logging.samples_per_step of the step's sampled groups (both waves) to samples.jsonl; the W&B table
        goes out with the step's metrics. Once the file is full, the refused rows are counted and said once."""
        rows = sample_rows(step, groups, self._samples_per_step)
        if not rows:
            return
        already_full = self.samples_file.num_not_written > 0
        if self.samples_file.append(rows) and not already_full:
            self.message(
                f"{self.samples_file.path} reached logging.samples_max_mb; later samples are counted "
                "(samples/num_not_written), not written"
            )
        self._pending_samples = rows

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one step's metrics (non-finite values are written as null, never dropped)."""
        row = {"step": step, "time": time.time()}
        row.update({key: (float(value) if math.isfinite(float(value)) else None) for key, value in metrics.items()})
        if self._samples_per_step:
            row["samples/num_not_written"] = float(self.samples_file.num_not_written)
        self.rows.append(row)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        scalars = {key: value for key, value in row.items() if key not in ("step", "time")}
        if self._writer is not None:
            for key, value in scalars.items():
                if value is not None:
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(step, scalars, self._pending_samples)
        self._pending_samples = []
        if self.per_step_lines:
            print(step_line(step, self.total_steps, row), flush=True)
        shown = {label: f"{row[key]:.3g}" for key, label in PROGRESS_FIELDS if row.get(key) is not None}
        self._bar.set_description_str(BAR_LABEL, refresh=False)
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def message(self, text: str) -> None:
        """A line above the progress bar (skipped prompts, partial batches, checkpoints)."""
        if self.per_step_lines:
            print(text, flush=True)
        else:
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
        self._bar.set_description_str(BAR_LABEL, refresh=False)  # the final bar names no phase
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.close()


class NullRunLog:
    """The logger of ranks other than 0."""

    rows: list[dict] = []

    def begin(self, first_step: int) -> None: ...

    def phase(self, name: str) -> None: ...

    def samples(self, step: int, groups: list[RolloutGroup]) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def message(self, text: str) -> None: ...

    def summary_table(self) -> str:
        return ""

    def close(self) -> None: ...

"""Weights & Biases as one more sink of a run's record: the step metrics, and each step's rollout samples as a table.

`wandb` is an optional dependency (the `wandb` extra); config validation refuses logging.wandb.enabled without it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from guide_mega.config import Config, config_to_dict
from guide_mega.rollout_samples import SAMPLE_FIELDS

# The W&B run id of a run directory, so that a resumed run continues the same W&B run.
RUN_ID_FILE = "wandb_run_id"


class WandbLog:
    """A W&B run for rank 0's log: online, or offline under `<run_dir>/wandb` with no network. A resumed run
    (`resume`) continues the W&B run its directory started; a fresh one starts a new W&B run."""

    def __init__(self, config: Config, run_dir: Path, *, resume: bool) -> None:
        import wandb

        settings = config.logging.wandb
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or run_dir.resolve().name,
            mode=settings.mode,
            dir=str(run_dir),
            config=config_to_dict(config),
            tags=list(settings.tags) or None,
            id=run_id,
            resume="allow",
        )

    def log(self, step: int, metrics: dict[str, float | None], samples: list[dict]) -> None:
        """One step's metrics (null values left out) and, when there are any, its samples as the 'samples' table."""
        values: dict = {key: value for key, value in metrics.items() if value is not None}
        if samples:
            # Chat prompts and graded hints are lists: a table cell shows them as JSON text.
            data = [[_cell(row[name]) for name in SAMPLE_FIELDS] for row in samples]
            values["samples"] = self._wandb.Table(columns=list(SAMPLE_FIELDS), data=data)
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


def _cell(value: object) -> object:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value

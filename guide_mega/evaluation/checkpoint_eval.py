"""`guide-mega eval`: evaluate a checkpoint on a problem source and write results JSON, a markdown table and plots;
with hints 'both', also the hint lift (the same problems evaluated without and with their hints).

The checkpoint may be a trainer checkpoint as the run left it: its data, reward and sampling settings come from the
run's own `config.yaml` unless --config is given, and a Megatron checkpoint without an `hf/` export is converted to
HF first (into the output directory), with the run's base model supplying config and tokenizer."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import torch

from guide_mega.config import Config, DataConfig
from guide_mega.convert import base_model_dir, find_run_config
from guide_mega.evaluation.analysis import hint_lift
from guide_mega.evaluation.passk import EvalResults, summary_markdown
from guide_mega.evaluation.runner import EvalSettings, evaluate
from guide_mega.rollout.engine import SamplingParams


def eval_config_path(checkpoint: str, config: str | None) -> str | Path | None:
    """The config `eval` reads: --config when given, else the config.yaml of the checkpoint's run (if any)."""
    return config if config is not None else find_run_config(checkpoint)


def resolve_checkpoint(checkpoint: str, output: Path) -> Path:
    """An HF model directory for `checkpoint`: an HF directory, a training checkpoint with an `hf/` export, a
    Megatron checkpoint (trainer or converted; written as HF to `output`/hf_model), `embedded:<name>` or a hub id in
    the local HF cache."""
    from guide_mega.data import resolve_model_path

    path = resolve_model_path(checkpoint)
    for candidate in (path, path / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    from guide_mega.training.checkpoint import METADATA_FILE  # the Megatron backend, only for its checkpoints
    from guide_mega.training.checkpoint_conversion import megatron_to_hf

    if (path / METADATA_FILE).is_file():
        return megatron_to_hf(path, output / "hf_model", hf_config_dir=base_model_dir(path))
    raise ValueError(
        f"--checkpoint {checkpoint}: not an HF model directory (no config.json there or in {path / 'hf'}) and not a "
        "Megatron checkpoint (no guide_mega.json)"
    )


def _source_settings(config: Config, source: str) -> tuple[DataConfig, str]:
    """The data settings to read `source` with (its own generator options) and the key errors should name."""
    data = config.data
    if source == data.eval_source:
        return dataclasses.replace(data, source_options=data.eval_source_options), "data.eval_source"
    if source == data.source:
        return data, "data.source"
    return dataclasses.replace(data, source_options={}), "--data"


def _load_problems(config: Config, source: str, limit: int | None, held_out_from: Config | None) -> tuple[list, dict]:
    """The problems of `source` minus any whose prompt is also in `held_out_from`'s training data, then the first
    `limit` of them; what was left out is counted in the returned dict."""
    from guide_mega.data import load_prompt_source

    data, key = _source_settings(config, source)
    prompt_set = load_prompt_source(source, data, key=key)
    problems = prompt_set.prompts
    counts = {"malformed_rows": prompt_set.num_skipped_rows, "overlapping_training": 0, "beyond_limit": 0}
    if held_out_from is not None:
        training = load_prompt_source(held_out_from.data.source, held_out_from.data).prompts
        seen = {repr(p.prompt) for p in training}
        kept = [p for p in problems if repr(p.prompt) not in seen]
        counts["overlapping_training"] = len(problems) - len(kept)
        problems = kept
    if limit is not None and len(problems) > limit:
        counts["beyond_limit"] = len(problems) - limit
        problems = problems[:limit]
    return problems, counts


def _write(results: EvalResults, output: Path, name: str, ks: list[int]) -> dict:
    summary = results.summary([k for k in ks if k <= min(p.num_samples for p in results.problems)])
    results.save(output / f"{name}.json")
    (output / f"{name}.md").write_text(summary_markdown(summary))
    return summary


def evaluate_checkpoint(
    config: Config,
    *,
    checkpoint: str,
    source: str,
    output: str | Path,
    num_samples: int,
    ks: list[int],
    hints: str = "none",
    greedy: bool = True,
    limit: int | None = None,
    held_out_from: Config | None = None,
) -> dict:
    """Evaluate and write `results.json`/`.md`, every generation to `generations.jsonl` (and `results_hinted.*`,
    `generations_hinted.jsonl`, `hint_lift.json` for hints='with'/'both') and `pass_at_k.png`; returns the
    summaries. With `held_out_from` (a training config), problems of its training data are left out and counted."""
    from guide_mega.data import render_prompt_ids
    from guide_mega.evaluation.plots import plot_pass_at_k
    from guide_mega.preflight import check_reward
    from guide_mega.rewards import RewardPool
    from guide_mega.rollout.hf_engine import HFEngine

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    check_reward(config.reward)
    problems, counts = _load_problems(config, source, limit, held_out_from)
    model_dir = resolve_checkpoint(checkpoint, output)
    engine = HFEngine.from_config(model_dir, config.rollout, device="cuda" if torch.cuda.is_available() else "cpu")
    settings = EvalSettings(
        num_samples=num_samples,
        sampling=SamplingParams.from_config(config.rollout, seed=config.train.seed),
        greedy=greedy,
        hint_template=config.algorithm.guide.hint_template,
        max_prompt_tokens=config.data.max_prompt_tokens,
    )
    meta = {
        "checkpoint": str(checkpoint),
        "model_dir": str(model_dir),
        "source": source,
        "source_options": config.data.source_options,
        "reward": config.reward.name,
        "left_out": counts,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tokenize = lambda content: render_prompt_ids(engine.tokenizer, content, system_prompt=config.data.system_prompt)  # noqa: E731
    runs = {"none": [False], "with": [True], "both": [False, True]}[hints]
    summaries, curves = {}, {}
    with RewardPool.from_config(config.reward, lenient=config.reward.lenient) as pool:
        if hints == "both":
            problems = [p for p in problems if p.has_hint]  # the lift compares the same problems
        for with_hints in runs:
            run_settings = dataclasses.replace(settings, with_hints=with_hints)
            suffix = "_hinted" if with_hints else ""
            results = evaluate(
                engine, pool, problems, tokenize=tokenize, settings=run_settings, meta=meta,
                generations_path=output / f"generations{suffix}.jsonl",
            )  # fmt: skip
            name = f"results{suffix}"
            summaries[name] = _write(results, output, name, ks)
            curves["with hint" if with_hints else "without hint"] = results
    plot_pass_at_k(curves, output / "pass_at_k.png")
    if hints == "both":
        lift = hint_lift(curves["without hint"], curves["with hint"], ks=[k for k in ks if k <= num_samples])
        (output / "hint_lift.json").write_text(json.dumps(lift, indent=1) + "\n")
        summaries["hint_lift"] = lift
    engine.close()
    return summaries

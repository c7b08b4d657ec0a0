"""What a finished run says about itself in words: its algorithm's name and a few sentences from its own metrics."""

from __future__ import annotations

from pathlib import Path

from guide_mega.config import AlgorithmConfig, Config

ESTIMATOR_NAMES = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO", "gae": "PPO"}


def algorithm_label(algorithm: AlgorithmConfig) -> str:
    """The algorithm as the paper's baselines are named: GRPO, Filter-GRPO, Guide-GRPO, PPO, Guide-PPO, ..."""
    name = ESTIMATOR_NAMES[algorithm.estimator]
    if algorithm.guide.enabled:
        return f"Guide-{name}" + (" + filter" if algorithm.filter_groups else "")
    return f"Filter-{name}" if algorithm.filter_groups else name


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _total(rows: list[dict], key: str) -> int | None:
    """The sum of a count over the logged steps; None when no step logged it."""
    values = [row[key] for row in rows if row.get(key) is not None]
    return round(sum(values)) if values else None


def describe_run(rows: list[dict], config: Config) -> str:
    """Plain sentences from a run's metrics rows: what the first wave left unsolved, what the hints rescued, how many
    groups were trained against how many plain GRPO would have had a signal from, and where the files are."""
    group_size, guide = config.rollout.group_size, config.algorithm.guide
    sampled = _total(rows, "rollout/num_rollouts")
    prompts = sampled // group_size if sampled is not None else None
    unsolved = _total(rows, "guide/num_unsolved_groups")
    lines = []
    if prompts is not None:
        failing = "no correct answer" if guide.threshold == 0 else f"at most {guide.threshold:.0%} correct answers"
        left = f"; {unsolved} of them were unsolved ({failing} in {group_size} tries)" if unsolved is not None else ""
        lines.append(f"In {_count(len(rows), 'step')} the first wave sampled {_count(prompts, 'prompt')}{left}.")
    guided, rescued = _total(rows, "guide/num_guided_groups"), _total(rows, "guide/guided_groups_solved")
    if guided is not None:
        without_hint = _total(rows, "guide/num_unsolved_without_hint") or 0
        lines.append(
            f"Guide sampled {guided} of them again with the hint in the prompt, and the hint rescued {rescued} "
            f"(at least one correct answer in {group_size} hinted tries)"
            + (f"; {without_hint} had no hint." if without_hint else ".")
        )
    trained, dropped = _total(rows, "train/num_groups"), _total(rows, "filter/num_groups_dropped")
    if trained is not None:
        filtered = f", after Filter-GRPO dropped {dropped} without reward variance" if dropped else ""
        lines.append(f"The policy trained on {_count(trained, 'group')}{filtered}.")
    with_signal = _total(rows, "rollout/num_groups_with_variance")
    if prompts is not None and with_signal is not None:
        lines.append(
            f"Plain GRPO would have had {_count(with_signal, 'group') if with_signal else 'no group'} with a learning "
            f"signal out of {prompts}: a group whose rewards are all equal (all wrong or all right) has advantages 0."
        )
    run_dir = Path(config.logging.run_dir)
    samples = f"rollout samples (prompt, hint, response, reward): {run_dir / 'samples.jsonl'}; "
    lines.append(
        f"Plots: {run_dir / 'curves.png'}; {samples if config.logging.samples_per_step else ''}"
        f"every metric: {run_dir / 'metrics.jsonl'}."
    )
    return "\n".join(lines) + "\n"

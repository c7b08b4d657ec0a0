"""The replication experiment (`make experiment`): GRPO, Filter-GRPO and Guide-GRPO on the embedded default with the
same budget (steps x prompts x samples per prompt) and seed, evaluated without hints on held-out problems before
and after training. Writes the table, the plots and the exact command to docs/results/.

`--variant hints` (`make experiment EXPERIMENT_ARGS="--variant hints --seeds 1,2,3"`) compares the hints Guide gets
at the same budget, one run per arm and seed: fixed (the strongest data hint, as in the paper), graded
(algorithm.guide.levels.adaptive) and self-written (algorithm.guide.hint_source=self, the data's hints removed). It
reports the trainable-group yield per 1,000 generated tokens and the guided success, per run and as the mean and
spread over seeds. It is resumable: a finished run leaves its summary.json and is not run again, an interrupted one
resumes from its last checkpoint; runs of other seeds can join the table later.

Every training run and evaluation is its own `guide-mega` process, as a user would run them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from guide_mega.evaluation.analysis import decompose_pass_at_1_change
from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.evaluation.passk import EvalResults
from guide_mega.evaluation.plots import plot_pass_at_k, plot_training_curves

# Guide-GRPO first: it is the run the experiment is about.
ALGORITHMS = {
    "guide_grpo": ["algorithm.guide.enabled=true", "algorithm.filter_groups=true"],
    "filter_grpo": ["algorithm.guide.enabled=false", "algorithm.filter_groups=true"],
    "grpo": ["algorithm.guide.enabled=false", "algorithm.filter_groups=false"],
}


# The hint arms; every arm runs Guide on the same config with the same budget.
HINT_ARMS = {
    "fixed_hints": ["algorithm.guide.enabled=true"],
    "graded_hints": ["algorithm.guide.enabled=true", "algorithm.guide.levels.adaptive=true"],
    "self_hints": [
        "algorithm.guide.enabled=true", "algorithm.guide.hint_source=self", "data.source_options.hints=false",
    ],
}  # fmt: skip
WAVES = ("rollout", "guided", "self_hint")


def _run(command: list[str], log: Path) -> float:
    """Run a guide-mega command, its output teed to `log`; returns its wall time in seconds."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as stream:
        process = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if process.returncode != 0:
        sys.exit(f"command failed ({process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def _evaluate(args: argparse.Namespace, checkpoint: str, output: Path) -> tuple[EvalResults, float]:
    command = [
        sys.executable, "-m", "guide_mega.cli", "eval", "--checkpoint", checkpoint, "--config", args.config,
        "--samples", str(args.samples), "--k", f"1,{args.samples}", "--held-out-from", args.config,
        "--output", str(output), "data.source_options.seed=" + str(args.eval_seed),
        "data.source_options.size=" + str(args.eval_problems), f"train.seed={args.seed}", *args.overrides,
    ]  # fmt: skip
    seconds = _run(command, output.with_suffix(".log"))
    return EvalResults.load(output / "results.json"), seconds


def _train(args: argparse.Namespace, name: str, run_dir: Path) -> float:
    command = [
        sys.executable, "-m", "guide_mega.cli", "train", "--config", args.config, *ALGORITHMS[name],
        f"train.steps={args.steps}", f"train.seed={args.seed}", f"logging.run_dir={run_dir}",
        "logging.progress_bar=false", "checkpoint.export_hf=true", "checkpoint.every=0", "checkpoint.resume=never",
        *args.overrides,
    ]  # fmt: skip
    return _run(command, run_dir.with_suffix(".log"))


def _training_totals(metrics_path: Path) -> dict[str, float]:
    """Generated tokens, trained steps and skipped steps of a run, from its metrics.jsonl."""
    rows = read_metrics(metrics_path)
    tokens = sum(row.get("perf/rollout_tokens_per_s", 0.0) * row.get("time/rollout_s", 0.0) for row in rows)
    return {
        "generated_tokens": round(tokens),
        "skipped_steps": int(sum(row.get("train/skipped_step", 0.0) for row in rows)),
        "mean_first_wave_accuracy": sum(row.get("rollout/accuracy", 0.0) for row in rows) / max(len(rows), 1),
    }


def _table(rows: list[dict], samples: int) -> str:
    header = (
        f"| run | held-out pass@1 | pass@{samples} | greedy pass@1 | Δ pass@1 | self-distillation | capability gain "
        "| forgetting | generated tokens | skipped steps | train time (s) |\n|---" + "|---" * 10 + "|\n"
    )
    lines = []
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['pass@1']:.4f} | {row[f'pass@{samples}']:.4f} | {row['greedy_pass@1']:.4f} "
            f"| {row.get('delta_pass@1', 0.0):+.4f} | {row.get('self_distillation', '-')} "
            f"| {row.get('capability_gain', '-')} | {row.get('forgetting', '-')} | {row.get('generated_tokens', '-')} "
            f"| {row.get('skipped_steps', '-')} | {row.get('train_seconds', 0.0):.0f} |"
        )
    return header + "\n".join(lines) + "\n"


def _row(name: str, results: EvalResults, samples: int) -> dict:
    return {
        "run": name,
        "pass@1": results.pass_at_k(1),
        f"pass@{samples}": results.pass_at_k(samples),
        "greedy_pass@1": results.greedy_pass_at_1() or 0.0,
    }


def hint_summary(rows: list[dict]) -> dict[str, float]:
    """What a hint arm is judged by, from its metrics.jsonl rows: generated tokens (every wave, hint writing
    included), trainable groups and their yield per 1,000 tokens, guided success (every hinted sample), unsolved and
    guided groups, escalations and rejected self-written hints."""
    tokens = [sum(row.get(f"{wave}/generated_tokens", 0.0) for wave in WAVES) for row in rows]
    trainable = sum(
        row.get("guide/trainable_groups_per_1k_tokens", 0.0) * n / 1000 for row, n in zip(rows, tokens, strict=True)
    )
    guided = sum(row.get("guided/num_rollouts", 0.0) for row in rows)
    correct = sum(row.get("guided/accuracy", 0.0) * row.get("guided/num_rollouts", 0.0) for row in rows)
    total = {key: sum(row.get(key, 0.0) for row in rows) for key in (
        "guide/num_unsolved_groups", "guide/num_guided_groups", "guide/num_escalated_groups",
        "self_hint/leaks_rejected", "train/skipped_step")}  # fmt: skip
    return {
        "steps": len(rows),
        "generated_tokens": sum(tokens),
        "trainable_groups": round(trainable, 3),
        "trainable_groups_per_1k_tokens": 1000 * trainable / max(sum(tokens), 1.0),
        "guided_success": correct / guided if guided else 0.0,
        **{key.split("/")[1]: value for key, value in total.items()},
    }


def _hint_run_dir(work: Path, arm: str, seed: int) -> Path:
    return work / f"{arm}_seed{seed}"


def _hint_run(args: argparse.Namespace, arm: str, seed: int, work: Path) -> dict:
    """One arm and seed, trained unless its summary.json says it finished; an interrupted run resumes."""
    run_dir = _hint_run_dir(work, arm, seed)
    done = run_dir / "summary.json"
    if done.exists():
        print(f"{run_dir}: finished earlier, not run again", flush=True)
        return json.loads(done.read_text())
    command = [
        sys.executable, "-m", "guide_mega.cli", "train", "--config", args.config, *HINT_ARMS[arm],
        f"train.steps={args.steps}", f"train.seed={seed}", f"logging.run_dir={run_dir}",
        "logging.progress_bar=false", "checkpoint.every=1", "checkpoint.keep_last=1", "checkpoint.resume=auto",
        *args.overrides,
    ]  # fmt: skip
    seconds = _run(command, run_dir.with_suffix(".log"))
    summary = {"arm": arm, "seed": seed, **hint_summary(read_metrics(run_dir / "metrics.jsonl")), "seconds": seconds}
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def hint_table(summaries: list[dict]) -> str:
    """One row per run, then per arm the mean and spread (population std) over its seeds."""
    keys = ("trainable_groups_per_1k_tokens", "guided_success", "generated_tokens", "trainable_groups",
            "num_guided_groups", "num_escalated_groups", "leaks_rejected")  # fmt: skip
    lines = ["| arm | seed | " + " | ".join(keys) + " |", "|---|---" + "|---" * len(keys) + "|"]
    for row in summaries:
        lines.append(f"| {row['arm']} | {row['seed']} | " + " | ".join(f"{row[key]:.4g}" for key in keys) + " |")
    for arm in dict.fromkeys(row["arm"] for row in summaries):
        runs = [row for row in summaries if row["arm"] == arm]
        cells = [_mean_spread([row[key] for row in runs]) for key in keys]
        lines.append(f"| **{arm}** | {len(runs)} seeds | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_spread(values: list[float]) -> str:
    """A table cell: the mean and the spread (population std) of one quantity over seeds."""
    return f"{statistics.fmean(values):.4g} ± {statistics.pstdev(values):.2g}"


def hint_window_table(runs: dict[tuple[str, int], list[dict]], window: int) -> str:
    """Each arm's yield, tokens and escalations per window of `window` steps (steps 1..window, ...), mean and
    spread over its seeds; `runs` maps (arm, seed) to the run's metrics rows. With a problem set of
    window x prompts_per_step problems, a window is one pass over it, so a later window shows what the per-problem
    hint levels remembered from the earlier ones."""
    keys = ("trainable_groups_per_1k_tokens", "generated_tokens", "num_guided_groups", "num_escalated_groups")
    lines = ["| steps | arm | " + " | ".join(keys) + " |", "|---|---" + "|---" * len(keys) + "|"]
    by_step = {run: {int(row["step"]): row for row in rows} for run, rows in runs.items()}
    last = max(max(steps, default=0) for steps in by_step.values())
    for first in range(1, last + 1, window):
        steps = range(first, min(first + window, last + 1))
        for arm in dict.fromkeys(arm for arm, _ in runs):
            summaries = [hint_summary([rows[step] for step in steps if step in rows])
                         for (run_arm, _), rows in by_step.items() if run_arm == arm]  # fmt: skip
            cells = [_mean_spread([summary[key] for summary in summaries]) for key in keys]
            lines.append(f"| {steps.start}-{steps.stop - 1} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_hint_arms(args: argparse.Namespace) -> None:
    """The hints variant: every arm of --arms for every seed of --seeds; writes the table and the JSON record."""
    work, output = Path(args.work_dir) / "hints", Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(HINT_ARMS))
    if unknown:
        sys.exit(f"--arms: unknown {unknown}; the arms are {sorted(HINT_ARMS)}")
    summaries = [_hint_run(args, arm, seed, work) for arm in arms for seed in seeds]
    table = hint_table(summaries)
    if args.window:
        runs = {
            (arm, seed): read_metrics(_hint_run_dir(work, arm, seed) / "metrics.jsonl")
            for arm in arms
            for seed in seeds
        }
        table += f"\nPer window of {args.window} steps, mean ± spread over seeds:\n\n" + hint_window_table(
            runs, args.window
        )
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "runs": summaries,
    }
    (output / "experiment_hints.json").write_text(json.dumps(record, indent=1) + "\n")
    (output / "experiment_hints_table.md").write_text(table)
    print(table + f"\nwritten to {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_cpu.yaml", help="the shared training config")
    parser.add_argument("--steps", type=int, default=6, help="RL steps per algorithm")
    parser.add_argument("--seed", type=int, default=1, help="train.seed of every run and evaluation")
    parser.add_argument("--samples", type=int, default=8, help="samples per held-out problem (pass@1 and pass@n)")
    parser.add_argument("--eval-problems", type=int, default=32, help="held-out problems generated (before overlap)")
    parser.add_argument("--eval-seed", type=int, default=2026, help="generator seed of the held-out problems")
    parser.add_argument("--work-dir", default="runs/experiment", help="runs, checkpoints and evaluations")
    parser.add_argument("--output", default="docs/results", help="where the table, plots and command go")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset to run")
    parser.add_argument("--variant", choices=("algorithms", "hints"), default="algorithms", help="what to compare")
    parser.add_argument("--seeds", default="1", help="hints variant: comma-separated train.seed of each run")
    parser.add_argument("--arms", default=",".join(HINT_ARMS), help="hints variant: comma-separated subset of arms")
    parser.add_argument(
        "--window", type=int, default=0, help="hints variant: also tabulate every window of this many steps"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run and evaluation")
    args = parser.parse_args()
    if args.window < 0:
        print(
            f"experiment.py: error: --window: {args.window} is not a number of steps (0: no such table)",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.variant == "hints":
        run_hint_arms(args)
        return
    work, output = Path(args.work_dir), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, base_seconds = _evaluate(args, "embedded:smollm2-135m-instruct", work / "eval_base")
    rows, curves = [{**_row("base (before training)", base, args.samples), "eval_seconds": base_seconds}], {}
    curves["base"] = base
    for name in args.algorithms.split(","):
        run_dir = work / name
        train_seconds = _train(args, name, run_dir)
        exports = (run_dir / "checkpoints").glob("step_*/hf")
        checkpoint = max(exports, key=lambda path: int(path.parent.name.removeprefix("step_")))
        after, eval_seconds = _evaluate(args, str(checkpoint), work / f"eval_{name}")
        decomposition = decompose_pass_at_1_change(base, after, k=args.samples).as_dict()
        rows.append(
            {
                **_row(name, after, args.samples),
                "delta_pass@1": after.pass_at_k(1) - base.pass_at_k(1),
                **{key: decomposition[key] for key in ("self_distillation", "capability_gain", "forgetting")},
                **_training_totals(run_dir / "metrics.jsonl"),
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
            }
        )
        curves[name] = after
        plot_training_curves(
            run_dir / "metrics.jsonl", output / f"experiment_{name}_curves.png",
            keys=["rollout/accuracy", "guide/num_unsolved_groups", "guide/guided_success_rate", "loss"],
        )  # fmt: skip
    plot_pass_at_k(curves, output / "experiment_pass_at_k.png")
    command = "make experiment" if len(sys.argv) == 1 else shlex.join([sys.executable, *sys.argv])
    record = {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_seconds": time.perf_counter() - started,
        "num_eval_problems": len(base.problems),
        "eval_left_out": base.meta.get("left_out"),
        "args": vars(args),
        "rows": rows,
    }
    (output / "experiment.json").write_text(json.dumps(record, indent=1) + "\n")
    (output / "experiment_table.md").write_text(_table(rows, args.samples))
    print(_table(rows, args.samples) + f"\nwritten to {output} in {record['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()

"""End-to-end GRPO step on CPU: guide_mega against TRL's GRPOTrainer, same configuration, in one run (issue 7).

Both sides run the same RL steps on the same local model directory: the same prompts in the same order (guide_mega's
PromptLoader order, rendered with the same chat template; the worker checks TRL's prompt ids are ours), G samples
per prompt from one generate call per step, the same max_new_tokens, temperature and top_p, the same reasoning-gym
verifier, GRPO advantages over the group, the clipped surrogate with per-sequence token means, no KL and no
reference model, AdamW with the same lr, betas, eps, weight decay and grad clip, one optimizer step per RL step,
fp32 and the same torch thread count. guide_mega runs configs/demo_cpu.yaml with Guide and Filter-GRPO switched
off; TRL runs in its own virtual environment (benchmarks/trl_grpo_worker.py), because TRL pins its own
transformers and must not touch the project's.

Old logprobs: when one optimizer step consumes the whole generation batch, TRL skips the old-logprob forward (the
ratio is 1 by construction). `--old-logprobs rollout` (default) makes guide_mega skip it as well, taking them from
the engine; `recompute` times guide_mega's default, one more forward per step. TRL pads each micro-batch of
`--trl-micro-batch` sequences to its longest row; guide_mega packs micro-batches of train.micro_batch_tokens.

A step is the wall time of one RL step: rollout, rewards, old logprobs, forward, backward, optimizer and (ours)
the weight push to the rollout engine; TRL's from on_step_begin to on_step_end. Step 1 is a warm-up on both sides
and is left out; the figures are means over the remaining steps. tokens/s is generated tokens per second of step
time; generation tokens/s counts generation time only. speedup_vs_trl = TRL step time / guide_mega step time.

The TRL environment (once; torch pinned, an unpinned one pulls a CUDA build of several GB):

    python3.11 -m venv ~/.cache/guide_mega/trl-venv
    ~/.cache/guide_mega/trl-venv/bin/pip install torch==2.13.0
    ~/.cache/guide_mega/trl-venv/bin/pip install trl==1.16.0 reasoning-gym==0.1.25 pyyaml

Usage (prints a table, writes it to benchmarks/results/e2e_vs_trl_cpu_<yyyymmdd>.md, prints one JSON line last):

    python benchmarks/bench_e2e_vs_trl.py     # the demo's size: a warm-up + 4 steps of 8 prompts x 8, 96 tokens
    python benchmarks/bench_e2e_vs_trl.py --steps 2 --prompts 2 --group-size 4 --max-new-tokens 16   # quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from report import machine_lines, markdown_table, write_report

from guide_mega.config import Config, load_config
from guide_mega.data import PromptLoader, load_prompt_source, render_prompt, render_prompt_ids, resolve_model_path
from guide_mega.rewards.verifiers import REASONING_GYM_ENTRY_KEY

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "trl_grpo_worker.py"
DEFAULT_TRL_PYTHON = Path.home() / ".cache" / "guide_mega" / "trl-venv" / "bin" / "python"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=5, help="RL steps per side; the first is a warm-up")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="G: samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--old-logprobs", choices=["rollout", "recompute"], default="rollout")
    parser.add_argument("--trl-micro-batch", type=int, default=None, help="TRL sequences per micro-batch (G)")
    parser.add_argument("--trl-python", default=str(DEFAULT_TRL_PYTHON), help="python of the TRL environment")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")
    args.trl_micro_batch = args.trl_micro_batch or args.group_size
    if (args.prompts * args.group_size) % args.trl_micro_batch:
        parser.error("--trl-micro-batch must divide prompts x group size")
    return args


def build_config(args: argparse.Namespace, run_dir: Path) -> Config:
    """The demo config as plain GRPO (no Guide, no filter) at the benchmark's size, one generate call per step."""
    overrides = [
        "algorithm.guide.enabled=false",
        "algorithm.filter_groups=false",
        f"algorithm.old_logprobs={args.old_logprobs}",
        f"train.steps={args.steps}",
        f"train.prompts_per_step={args.prompts}",
        "train.mini_batches_per_step=1",
        f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.batch_size={args.prompts * args.group_size}",
        f"logging.run_dir={run_dir}",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "checkpoint.every=0",
    ]
    config = load_config(args.config, overrides)
    algorithm = config.algorithm
    # Each of these has no TRL counterpart set by the worker; refuse rather than compare different algorithms.
    if config.reward.name != "reasoning_gym" or not config.data.source.startswith("reasoning_gym:"):
        raise SystemExit("bench_e2e_vs_trl: needs a reasoning_gym source and reward (the TRL side scores with it)")
    if algorithm.estimator != "grpo" or algorithm.kl_coef or algorithm.entropy_coef or algorithm.dual_clip:
        raise SystemExit("bench_e2e_vs_trl: needs estimator=grpo without KL, entropy bonus or dual clip")
    if algorithm.clip_low != algorithm.clip_high or algorithm.loss_aggregation != "seq_mean_token_mean":
        raise SystemExit("bench_e2e_vs_trl: needs symmetric clipping and loss_aggregation=seq_mean_token_mean")
    return config


def step_prompts(config: Config, tokenizer) -> list[dict]:
    """Every step's prompts in the order guide_mega's loader yields them (deterministic from data.seed)."""
    prompt_set = load_prompt_source(config.data.source, config.data)
    loader = PromptLoader.from_config(
        prompt_set.prompts, config.data, tokenizer=tokenizer, hint_template=config.algorithm.guide.hint_template
    )
    system_prompt = config.data.system_prompt
    return [
        {
            "text": render_prompt(tokenizer, prompt.prompt, system_prompt=system_prompt),
            "prompt_ids": render_prompt_ids(tokenizer, prompt.prompt, system_prompt=system_prompt),
            "entry": prompt.metadata[REASONING_GYM_ENTRY_KEY],
        }
        for _ in range(config.train.steps)
        for prompt in loader.next_batch(config.train.prompts_per_step)
    ]


def run_guide_mega(config: Config) -> dict[str, list[float]]:
    """Run the steps through Trainer.step; per step: wall time, generation time, generated tokens, mean reward."""
    from guide_mega.build import build_trainer

    trainer = build_trainer(config)
    result: dict[str, list[float]] = {"step_seconds": [], "generation_seconds": [], "generated_tokens": []}
    result["mean_reward"], result["phase_seconds"] = [], []
    try:
        for _ in range(config.train.steps):
            metrics = trainer.step()
            trainer.step_index += 1
            result["step_seconds"].append(metrics["time/step_s"])
            result["generation_seconds"].append(metrics["time/rollout_s"])
            generated = metrics.get("rollout/generated_tokens", 0.0) + metrics.get("guided/generated_tokens", 0.0)
            result["generated_tokens"].append(generated)
            result["mean_reward"].append(metrics["rollout/reward_mean"])
            result["phase_seconds"].append(
                {key[5:-2]: value for key, value in metrics.items() if key.startswith("time/")}
            )
            print(f"guide_mega step {trainer.step_index}: {metrics['time/step_s']:.1f} s", flush=True)
    finally:
        trainer.run_log.close()
        trainer.close()
    return result


def trl_spec(config: Config, args: argparse.Namespace, model_dir: Path, prompts: list[dict]) -> dict:
    """What the TRL worker needs: the model, every setting that must match, and the prompts."""
    optimizer, reward = config.optimizer, config.reward
    return {
        "model_dir": str(model_dir),
        "steps": config.train.steps,
        "prompts_per_step": config.train.prompts_per_step,
        "group_size": config.rollout.group_size,
        "max_new_tokens": config.rollout.max_new_tokens,
        "temperature": config.rollout.temperature,
        "top_p": config.rollout.top_p,
        "clip": config.algorithm.clip_low,
        "lr": optimizer.lr,
        "lr_schedule": optimizer.schedule,
        "warmup_steps": optimizer.warmup_steps,
        "weight_decay": optimizer.weight_decay,
        "adam_beta1": optimizer.adam_beta1,
        "adam_beta2": optimizer.adam_beta2,
        "adam_eps": optimizer.adam_eps,
        "grad_clip": optimizer.grad_clip,
        "seed": config.train.seed,
        "threads": args.threads,
        "trl_micro_batch": args.trl_micro_batch,
        "reward_options": {"lenient": reward.lenient, "format_gate": reward.format_gate,
                           "format_bonus": reward.format_bonus},
        "prompts": prompts,
    }  # fmt: skip


def run_trl(spec: dict, trl_python: str, scratch: Path) -> dict:
    """The TRL side in its own environment; guide_mega's reward code reaches it through PYTHONPATH."""
    spec_path, result_path = scratch / "trl_spec.json", scratch / "trl_result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(spec["threads"])}
    subprocess.run([trl_python, str(WORKER), str(spec_path), str(result_path)], check=True, env=env)
    return json.loads(result_path.read_text())


def summarize(result: dict) -> dict[str, float]:
    """Means over the steps after the warm-up."""
    seconds = result["step_seconds"][1:]
    tokens = sum(result["generated_tokens"][1:])
    return {
        "step_s": statistics.mean(seconds),
        "tokens_per_step": tokens / len(seconds),
        "tok_s": tokens / sum(seconds),
        "generation_tok_s": tokens / sum(result["generation_seconds"][1:]),
        "mean_reward": statistics.mean(result["mean_reward"][1:]),
    }


def phase_means(result: dict) -> str:
    """guide_mega's mean seconds per phase after the warm-up, e.g. 'rollout 9.8, reward 0.1, train 12.0'."""
    steps = result["phase_seconds"][1:]
    phases = [phase for phase in steps[0] if phase != "step"]
    return ", ".join(f"{phase} {statistics.mean(step[phase] for step in steps):.1f}" for phase in phases)


def describe(config: Config, args: argparse.Namespace) -> str:
    """The configuration line under the table."""
    return (
        f"Model {config.model.path}, fp32; {config.data.source}; {args.steps} steps (first one a warm-up) of "
        f"{args.prompts} prompts x G={args.group_size}, {args.max_new_tokens} new tokens max, "
        f"T={config.rollout.temperature}, lr {config.optimizer.lr}; old logprobs: {args.old_logprobs}; "
        f"TRL micro-batch {args.trl_micro_batch} sequences; {args.threads} torch threads on both sides."
    )


def main() -> None:
    args = _parse_args()
    if not Path(args.trl_python).is_file():
        sys.exit(f"bench_e2e_vs_trl: no TRL python at {args.trl_python}; create the environment with:\n"
                 + __doc__.split("several GB):")[1].split("Usage")[0])  # fmt: skip
    warnings.filterwarnings("ignore", module="megatron")  # optional-accelerator warnings, as in `guide-mega train`
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_vs_trl_") as scratch:
        config = build_config(args, Path(scratch) / "run")
        model_dir = resolve_model_path(config.model.path)
        prompts = step_prompts(config, transformers.AutoTokenizer.from_pretrained(model_dir))
        ours = run_guide_mega(config)
        trl_result = run_trl(trl_spec(config, args, model_dir, prompts), args.trl_python, Path(scratch))
    report(config, args, ours, trl_result)


def report(config: Config, args: argparse.Namespace, ours: dict, trl_result: dict) -> None:
    """Write and print the table, then the JSON line."""
    versions = trl_result["versions"]
    sides = {"guide_mega": summarize(ours), f"TRL {versions['trl']}": summarize(trl_result)}
    (mine, theirs) = sides.values()
    speedup = theirs["step_s"] / mine["step_s"]
    table = markdown_table(
        ("side", "step s", "generated tokens / step", "tokens/s", "generation tokens/s", "mean reward"),
        [
            (name, f"{s['step_s']:.2f}", f"{s['tokens_per_step']:.0f}", f"{s['tok_s']:.1f}",
             f"{s['generation_tok_s']:.1f}", f"{s['mean_reward']:.3f}")
            for name, s in sides.items()
        ],
        align="lrrrrr",
    )  # fmt: skip
    notes = [
        describe(config, args),
        "",
        f"guide_mega seconds per phase (mean after the warm-up): {phase_means(ours)}.",
        "",
        f"speedup_vs_trl (TRL step s / guide_mega step s): {speedup:.2f}",
    ]
    trl_versions = (
        f"TRL {versions['trl']} (torch {versions['torch']}, transformers {versions['transformers']}, own venv)"
    )
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "trl_threads": trl_result["threads"]},
        "config": {"model": config.model.path, "steps": args.steps, "prompts": args.prompts,
                   "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                   "temperature": config.rollout.temperature, "lr": config.optimizer.lr,
                   "old_logprobs": args.old_logprobs, "trl_micro_batch": args.trl_micro_batch},
        "trl_version": versions["trl"],
        "step_s": round(mine["step_s"], 3),
        "trl_step_s": round(theirs["step_s"], 3),
        "tok_s": round(mine["tok_s"], 1),
        "trl_tok_s": round(theirs["tok_s"], 1),
        "speedup_vs_trl": round(speedup, 3),
    }  # fmt: skip
    write_report(
        "e2e_vs_trl",
        "cpu",
        title="End-to-end GRPO step on CPU: guide_mega vs TRL",
        machine=machine_lines("cpu", extra_versions=(f"transformers {transformers.__version__}", trl_versions)),
        table=table,
        notes=notes,
        summary=summary,
    )


if __name__ == "__main__":
    main()

"""The `guide-mega` command: train, eval, analyze, convert, doctor and plan.

A user's mistake (a bad config value, a missing file, a missing package) is a ValueError: one line on stderr naming
what to change, exit status 2, on every rank under torchrun. A traceback means a bug of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

# Panels of the training-curves PNG written after `train`.
CURVE_KEYS = [
    "rollout/reward_mean",
    "guide/num_unsolved_groups",
    "guide/guided_success_rate",
    "guide/hint_reliance",
    "loss",
]


def _doctor(args: argparse.Namespace) -> int:
    from guide_mega.doctor import collect_report, format_report

    report = collect_report()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _train(args: argparse.Namespace) -> int:
    from guide_mega.config import load_config
    from guide_mega.evaluation.plots import plot_training_curves
    from guide_mega.preflight import check_run_inputs
    from guide_mega.run_report import algorithm_label, describe_run

    config = load_config(args.config, args.overrides)
    check_run_inputs(config)  # before any model loads, and before ranks wait on each other
    if args.dry_run:
        return _dry_run(config, args.config)
    from guide_mega.trainer import run_training  # torch and Megatron load only once the inputs check out

    trainer = run_training(config)
    if trainer.rollout is not None and trainer.run_log.rows:  # rank 0 holds the rollout side and the log
        run_dir = Path(config.logging.run_dir)
        summary = trainer.run_log.summary_table() + "\n" + describe_run(trainer.run_log.rows, config)
        (run_dir / "summary.md").write_text(summary)
        title = f"{run_dir.resolve().name}: {algorithm_label(config.algorithm)}"
        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", keys=CURVE_KEYS, title=title)
        print(summary, end="")
    return 0


def _dry_run(config, config_path: str) -> int:
    """`train --dry-run`: the resolved config and the memory plan, with no model loaded."""
    from guide_mega.config import dump_config

    print(dump_config(config), end="")
    report, verdict = _plan_report(config, config_path, arch=None, reserves={})
    print(report if verdict is None else f"{report}\n{verdict}")
    print("dry run: the inputs check out; no model was loaded")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from guide_mega.config import load_config
    from guide_mega.evaluation.checkpoint_eval import eval_config_path, evaluate_checkpoint
    from guide_mega.evaluation.passk import summary_markdown

    config_path = eval_config_path(args.checkpoint, args.config)
    if config_path is not None and args.config is None:
        print(f"config: {config_path} (the checkpoint's run)")
    config = load_config(config_path, args.overrides)
    source = args.data or config.data.eval_source or config.data.source
    if not source:
        raise ValueError("no problems to evaluate: pass --data or set data.eval_source / data.source in --config")
    ks = _parse_ks(args.k, samples=args.samples)
    summaries = evaluate_checkpoint(
        config,
        checkpoint=args.checkpoint,
        source=source,
        output=args.output,
        num_samples=args.samples,
        ks=ks,
        hints=args.hints,
        greedy=not args.no_greedy,
        limit=args.limit,
        held_out_from=load_config(args.held_out_from) if args.held_out_from else None,
    )
    for name, summary in summaries.items():
        if name == "hint_lift":
            print(f"hint lift: {json.dumps(summary)}")
        else:
            print(f"{name}:\n{summary_markdown(summary)}")
    print(f"written to {args.output}")
    return 0


def _parse_ks(text: str, *, samples: int) -> list[int]:
    """eval's --k values, each in [1, --samples]."""
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers, got {text!r}") from None
    if ks[0] < 1 or ks[-1] > samples:
        raise ValueError(f"--k {text}: every k must be in [1, --samples {samples}]")
    return ks


def _analyze(args: argparse.Namespace) -> int:
    from guide_mega.evaluation.analysis import decompose_pass_at_1_change, largest_valid_k
    from guide_mega.evaluation.passk import EvalResults
    from guide_mega.evaluation.plots import plot_decomposition, plot_pass_at_k

    before, after = EvalResults.load(args.before), EvalResults.load(args.after)
    largest = largest_valid_k(before, after)
    k = args.k or largest
    if not 1 <= k <= largest:
        raise ValueError(f"--k {k}: must be in [1, {largest}] (the fewest samples of any problem in the two files)")
    decomposition = decompose_pass_at_1_change(
        before, after, k=k, solved_threshold=args.solved_threshold, reach_threshold=args.reach_threshold
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "decomposition.json").write_text(json.dumps(decomposition.as_dict(), indent=1) + "\n")
    plot_decomposition(decomposition, output / "decomposition.png")
    plot_pass_at_k({"before": before, "after": after}, output / "pass_at_k.png")
    values = decomposition.as_dict()
    print(
        f"problems: {values['num_problems']}  solved at pass@1: {values['solved_before']} -> {values['solved_after']}"
        f"  (within reach: pass@{k})"
    )
    for name in ("self_distillation", "capability_gain", "forgetting"):
        print(f"{name:>18}: {values[name]:4d} ({values[name + '_fraction']:.3f})")
    print(f"{'net change':>18}: {values['net_change']:+.3f}   (written to {output})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from guide_mega.convert import convert

    options = {"hf_config": args.hf_config, "tensor": args.tensor, "pipeline": args.pipeline, "dtype": args.dtype}
    path = convert(args.direction, args.source, args.output, **options)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank converts its shard; one reports
        print(f"written to {path}")
    return 0


# `plan`'s exit status when the config does not fit on its cluster (0: it fits; 2: a bad config, as everywhere).
PLAN_DOES_NOT_FIT = 3


def _plan(args: argparse.Namespace) -> int:
    from guide_mega.config import load_config

    flags = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "gpu_memory_gib": args.gpu_memory_gib}
    cluster = [f"cluster.{key}={value}" for key, value in flags.items() if value is not None]
    config = load_config(args.config, [*args.overrides, *cluster])
    given = {"trainer_gib": args.trainer_reserve_gib, "engine_gib": args.engine_reserve_gib}
    report, verdict = _plan_report(config, args.config, arch=args.arch, reserves=given)
    print(report)
    if verdict is None:
        return 0
    print(verdict, file=sys.stderr)
    return PLAN_DOES_NOT_FIT


def _plan_report(config, config_path: str, *, arch: str | None, reserves: dict) -> tuple[str, str | None]:
    """The memory plan as text (ending 'plan: fits' when it fits), and the overflow verdict or None."""
    from guide_mega.data.embedded_model import cached_hub_snapshot, is_hub_id
    from guide_mega.planning import format_plan, model_shape, overflow_message, plan_memory
    from guide_mega.planning.memory import Reserves

    path = config.model.path
    # A cached hub model's sizes come from its config.json; an uncached one is looked up by name in the table.
    snapshot = cached_hub_snapshot(path) if is_hub_id(path) else None
    path = str(snapshot) if snapshot is not None else path
    given = {key: value for key, value in reserves.items() if value is not None}
    plan = plan_memory(config, model_shape(path, arch), Reserves(**given))
    verdict = overflow_message(plan)
    return format_plan(plan, config_path) + ("\nplan: fits" if verdict is None else ""), verdict


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guide-mega", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_command = lambda name, **options: commands.add_parser(name, formatter_class=_HelpFormatter, **options)  # noqa: E731

    train = add_command(
        "train", help="run RL training (GRPO, Filter-GRPO, Guide-GRPO, PPO, Guide-PPO) from a YAML config"
    )
    train.add_argument("--config", required=True, help="YAML config; see docs/configuration.md")
    train.add_argument(
        "--dry-run", action="store_true", help="check the inputs, print the resolved config and the memory plan, exit"
    )
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.guide.threshold=0.125")
    train.set_defaults(run=_train)

    evaluate = add_command(
        "eval", help="pass@k, greedy pass@1 and per-source tables of a checkpoint, with or without hints"
    )
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        help="HF model dir, a training checkpoint (runs/x/checkpoints/step_N; converted to HF when it has no hf/ "
        "export), embedded:NAME or a cached hub id",
    )
    evaluate.add_argument(
        "--config", help="YAML config for data, reward and sampling; default: the checkpoint's run's config.yaml"
    )
    evaluate.add_argument("--data", help="problem source (file or generator); default data.eval_source, data.source")
    evaluate.add_argument("--samples", type=int, default=8, help="samples per problem (n)")
    evaluate.add_argument("--k", default="1,8", help="comma-separated k values for pass@k (each <= --samples)")
    evaluate.add_argument("--hints", choices=["none", "with", "both"], default="none", help="'both' gives hint lift")
    evaluate.add_argument("--no-greedy", action="store_true", help="skip the greedy pass@1 pass")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N problems")
    evaluate.add_argument("--held-out-from", help="training config whose data.source problems are left out")
    evaluate.add_argument("--output", default="eval", help="directory for results JSON, markdown and plots")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.6")
    evaluate.set_defaults(run=_eval)

    doctor = add_command("doctor", help="report torch, CUDA, Triton, the C++ op, Megatron, SGLang and GPUs")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(run=_doctor)

    analyze = add_command(
        "analyze", help="split a pass@1 change into self-distillation, capability gain and forgetting"
    )
    analyze.add_argument("--before", required=True, help="evaluation results JSON before training")
    analyze.add_argument("--after", required=True, help="evaluation results JSON after training (same problems)")
    analyze.add_argument(
        "--k", type=int, help="k of the 'within reach' pass@k (paper: 16); default: the largest both files allow"
    )
    analyze.add_argument("--solved-threshold", type=float, default=0.5, help="pass@1 at which a problem is solved")
    analyze.add_argument("--reach-threshold", type=float, default=0.5, help="pass@k at which a problem is in reach")
    analyze.add_argument("--output", default="analysis", help="directory for decomposition.json and the plots")
    analyze.set_defaults(run=_analyze)

    convert = add_command("convert", help="convert an HF checkpoint to a Megatron one, or back")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    convert.add_argument("source", help="HF model directory, or a Megatron checkpoint (converted, or a trainer's)")
    convert.add_argument("output", help="directory to write (replaced when complete)")
    convert.add_argument(
        "--hf-config",
        help="megatron-to-hf of a trainer checkpoint: the HF model it trained from (dir, embedded:NAME or cached hub "
        "id); default: model.path of the run's config.yaml",
    )
    convert.add_argument("--tensor", type=int, help="tensor-parallel size (torchrun with tensor x pipeline procs)")
    convert.add_argument("--pipeline", type=int, help="pipeline-parallel size; default: 1, or as the checkpoint")
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the source's (float32 if other)")
    convert.set_defaults(run=_convert)

    plan = add_command(
        "plan",
        help="per-GPU memory of the trainer and the rollout engines, phase by phase; exit 3 when it does not fit",
    )
    plan.add_argument("--config", required=True, help="YAML config; its cluster section says which GPUs")
    plan.add_argument("--nodes", type=int, help="override cluster.nodes")
    plan.add_argument("--gpus-per-node", type=int, help="override cluster.gpus_per_node")
    plan.add_argument("--gpu-memory-gib", type=float, help="override cluster.gpu_memory_gib (79.6 on an 80 GB H100)")
    plan.add_argument("--arch", help="take the model's sizes from the known-models table under this name")
    plan.add_argument("--trainer-reserve-gib", type=float, help="CUDA context, NCCL, fragmentation (default 5)")
    plan.add_argument("--engine-reserve-gib", type=float, help="the engine's context, NCCL, CUDA graphs (default 3)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.tensor_parallel=8")
    plan.set_defaults(run=_plan)
    return parser


def _quiet_library_warnings() -> None:
    """Megatron warns at import and in every step about optional accelerators it lacks (Apex, Transformer Engine)
    and about deprecations (ShardedTensor); `guide-mega doctor` reports what is installed, so in a command's
    output they only bury what matters."""
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_warnings()
    try:
        return args.run(args)
    except ValueError as exc:  # a user error (ConfigError, a bad file, a missing package): one line, exit 2
        print(f"guide-mega {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

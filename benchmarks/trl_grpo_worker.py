"""TRL's GRPOTrainer side of bench_e2e_vs_trl.py; runs in the TRL virtual environment, never in the project's.

    python benchmarks/trl_grpo_worker.py SPEC.json RESULT.json

SPEC.json (written by bench_e2e_vs_trl.py) holds the local model directory, the sampling, optimizer and batch
settings, and every step's prompts in order: the chat-rendered text, the token ids guide_mega trained on (checked
against TRL's own tokenization before anything is timed) and the reasoning-gym entry its scorer needs. The reward
is guide_mega's own `reasoning_gym_reward`, imported with the repository root on PYTHONPATH: it needs only
reasoning-gym and PyYAML, so both sides score with the same code instead of a copy that could drift.

RESULT.json gets, per optimizer step, the wall time from TRL's on_step_begin to on_step_end (generation, rewards,
forward, backward, optimizer), the time inside generation, the generated tokens and the mean reward.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from guide_mega.rewards.verifiers import REASONING_GYM_ENTRY_KEY, RewardOptions, reasoning_gym_reward


class StepClock(TrainerCallback):
    """Wall time of each optimizer step, from its first micro-batch (where GRPO generates) to after the update."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


class TimedGRPOTrainer(trl.GRPOTrainer):
    """GRPOTrainer that records the time and the tokens of each generation call (one per optimizer step here)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generation_seconds: list[float] = []
        self.generated_tokens: list[int] = []

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        start = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self.generation_seconds.append(time.perf_counter() - start)
        self.generated_tokens.append(sum(len(ids) for ids in completion_ids))
        return completion_ids, logprobs


def reward_function(options: RewardOptions, rewards_seen: list[float]):
    """A TRL reward function scoring with guide_mega's reasoning-gym verifier (the `entry` column is JSON)."""

    def reasoning_gym(completions: list[str], entry: list[str], **_) -> list[float]:
        entries = [json.loads(text) for text in entry]
        rewards = [
            reasoning_gym_reward(
                completion, answer=item["answer"], metadata={REASONING_GYM_ENTRY_KEY: item}, options=options
            ).reward
            for completion, item in zip(completions, entries, strict=True)
        ]
        rewards_seen.append(sum(rewards) / len(rewards))
        return rewards

    return reasoning_gym


def grpo_config(spec: dict, output_dir: str) -> trl.GRPOConfig:
    """One TRL step = one RL step: P x G completions from one generate call, one optimizer step, no reuse."""
    sequences = spec["prompts_per_step"] * spec["group_size"]
    micro_batch = spec["trl_micro_batch"]
    return trl.GRPOConfig(
        output_dir=output_dir,
        max_steps=spec["steps"],
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=sequences // micro_batch,  # also steps_per_generation: one generation per step
        num_generations=spec["group_size"],
        num_iterations=1,  # one optimizer pass over each generation batch, as guide_mega's one mini-batch
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=spec["top_p"],
        top_k=0,
        shuffle_dataset=False,  # the dataset is already guide_mega's prompt order, step by step
        beta=0.0,  # no KL term, no reference model (algorithm.kl_coef = 0)
        loss_type="grpo",  # per-sequence token mean, then mean over sequences (seq_mean_token_mean)
        epsilon=spec["clip"],
        scale_rewards="group",
        learning_rate=spec["lr"],
        lr_scheduler_type=spec["lr_schedule"],
        warmup_steps=spec["warmup_steps"],
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"],
        adam_epsilon=spec["adam_eps"],
        max_grad_norm=spec["grad_clip"],
        gradient_checkpointing=False,  # TRL's default is on; guide_mega recomputes nothing (model.recompute=none)
        bf16=False,
        use_cpu=True,
        seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def check_prompt_ids(tokenizer, prompts: list[dict]) -> None:
    """TRL tokenizes the rendered text itself; it must give exactly the ids guide_mega trained on."""
    for prompt in prompts:
        ids = tokenizer(text=prompt["text"])["input_ids"]
        if ids != prompt["prompt_ids"]:
            raise SystemExit(f"trl_grpo_worker: TRL's prompt ids differ from guide_mega's for {prompt['text']!r}")


def main() -> None:
    spec_path, result_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    transformers.set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    check_prompt_ids(tokenizer, spec["prompts"])
    dataset = datasets.Dataset.from_list(
        [{"prompt": prompt["text"], "entry": json.dumps(prompt["entry"])} for prompt in spec["prompts"]]
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    rewards_seen: list[float] = []
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = TimedGRPOTrainer(
            model=model,
            reward_funcs=reward_function(RewardOptions(**spec["reward_options"]), rewards_seen),
            args=grpo_config(spec, output_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    result = {
        "step_seconds": clock.seconds,
        "generation_seconds": trainer.generation_seconds,
        "generated_tokens": trainer.generated_tokens,
        "mean_reward": rewards_seen,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
    }
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

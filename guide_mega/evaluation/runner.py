"""Evaluate a model on problems: n samples per problem (pass@k), one greedy answer (greedy pass@1), with or without
each problem's hint. Talks to the engine through the `RolloutEngine` protocol and to the verifier through
`RewardPool`, like the trainer, so an evaluation scores exactly what training rewards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from guide_mega.algorithms.guide import DEFAULT_HINT_TEMPLATE, hinted_prompt
from guide_mega.evaluation.passk import EvalResults, ProblemResult
from guide_mega.rewards import RewardPool, RewardResult
from guide_mega.rollout.engine import Completion, RolloutEngine, SamplingParams
from guide_mega.types import Prompt, PromptContent

Tokenize = Callable[[PromptContent], list[int]]


@dataclass(kw_only=True)
class EvalSettings:
    """How to evaluate: samples per problem, their sampling, the greedy pass, hints, and the prompt budget."""

    num_samples: int = 8
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    greedy: bool = True
    with_hints: bool = False
    hint_template: str = DEFAULT_HINT_TEMPLATE
    max_prompt_tokens: int | None = None
    requests_per_call: int = 64
    """Requests handed to the engine at once (the HF engine's default batch); the progress bar moves per call."""


@dataclass(kw_only=True)
class _Selection:
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    skipped: dict[str, int]


def _select(prompts: Sequence[Prompt], tokenize: Tokenize, settings: EvalSettings) -> _Selection:
    """The prompts to evaluate and their token ids; problems without a hint (in a hinted evaluation) and prompts
    over the token budget are counted, never silently dropped."""
    skipped = {"without_hint": 0, "too_long": 0}
    kept, kept_ids = [], []
    for prompt in prompts:
        if settings.with_hints and not prompt.has_hint:
            skipped["without_hint"] += 1
            continue
        content = hinted_prompt(prompt, template=settings.hint_template) if settings.with_hints else prompt.prompt
        ids = tokenize(content)
        if settings.max_prompt_tokens is not None and len(ids) > settings.max_prompt_tokens:
            skipped["too_long"] += 1
            continue
        kept.append(prompt)
        kept_ids.append(ids)
    return _Selection(prompts=kept, prompt_ids=kept_ids, skipped=skipped)


def generation_row(
    problem: Prompt, completion: Completion, result: RewardResult, *, with_hints: bool, greedy: bool
) -> dict:
    """One evaluated generation as a JSON row, with the field names of a training run's samples.jsonl."""
    hint = None
    if with_hints:
        hint = problem.hinted_prompt if problem.hinted_prompt is not None else problem.hint
    return {
        "prompt_id": problem.id,
        "guided": with_hints,
        "greedy": greedy,
        "prompt": problem.prompt,
        "hint": hint,
        "response": completion.text,
        "extracted": result.extracted,
        "reward": result.reward,
        "correct": result.correct,
        "finish_reason": completion.finish_reason,
        "response_tokens": len(completion.response_ids),
    }


def _correct_flags(
    engine: RolloutEngine,
    reward_pool: RewardPool,
    selection: _Selection,
    *,
    copies: int,
    sampling: SamplingParams,
    settings: EvalSettings,
    progress: tqdm,
    generations: TextIO | None,
) -> list[list[bool]]:
    """[problem][copy] correctness of `copies` completions per selected prompt; each generation is also written as
    a JSON row to `generations` when given."""
    requests = [(index, ids) for index, ids in enumerate(selection.prompt_ids) for _ in range(copies)]
    flags: list[list[bool]] = [[] for _ in selection.prompts]
    for start in range(0, len(requests), settings.requests_per_call):
        chunk = requests[start : start + settings.requests_per_call]
        completions = engine.generate([ids for _, ids in chunk], sampling)
        problems = [selection.prompts[index] for index, _ in chunk]
        results = reward_pool.score(
            [completion.text for completion in completions],
            [problem.answer for problem in problems],
            [problem.metadata for problem in problems],
            prompts=[problem.prompt for problem in problems],
        )
        for (index, _), result in zip(chunk, results, strict=True):
            flags[index].append(result.correct)
        if generations is not None:
            for problem, completion, result in zip(problems, completions, results, strict=True):
                row = generation_row(
                    problem, completion, result, with_hints=settings.with_hints, greedy=sampling.is_greedy
                )
                generations.write(json.dumps(row, ensure_ascii=False) + "\n")
        progress.update(len(chunk))
    return flags


def evaluate(
    engine: RolloutEngine,
    reward_pool: RewardPool,
    prompts: Sequence[Prompt],
    *,
    tokenize: Tokenize,
    settings: EvalSettings,
    meta: dict | None = None,
    show_progress: bool = True,
    generations_path: str | Path | None = None,
) -> EvalResults:
    """Per-problem correct counts of `settings.num_samples` samples (and the greedy answer's correctness); with
    `generations_path`, every generation (prompt, hint, response, reward, finish reason) is written there as JSONL."""
    if settings.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {settings.num_samples}")
    selection = _select(prompts, tokenize, settings)
    if not selection.prompts:
        raise ValueError(f"no problem left to evaluate (skipped: {selection.skipped})")
    total = len(selection.prompts) * (settings.num_samples + settings.greedy)
    label = "eval (hinted)" if settings.with_hints else "eval"
    with (
        tqdm(total=total, desc=label, unit="sample", disable=not show_progress) as progress,
        open(generations_path, "w", encoding="utf-8") if generations_path else contextlib.nullcontext() as generations,
    ):
        sampled = _correct_flags(
            engine, reward_pool, selection, copies=settings.num_samples, sampling=settings.sampling,
            settings=settings, progress=progress, generations=generations,
        )  # fmt: skip
        greedy_sampling = dataclasses.replace(settings.sampling, temperature=0.0, top_p=1.0, top_k=-1, seed=None)
        greedy = (
            _correct_flags(
                engine,
                reward_pool,
                selection,
                copies=1,
                sampling=greedy_sampling,
                settings=settings,
                progress=progress,
                generations=generations,
            )  # fmt: skip
            if settings.greedy
            else [[None] for _ in selection.prompts]
        )
    problems = [
        ProblemResult(
            id=prompt.id,
            source=prompt.source,
            num_samples=len(flags),
            num_correct=sum(flags),
            greedy_correct=greedy_flags[0],
        )
        for prompt, flags, greedy_flags in zip(selection.prompts, sampled, greedy, strict=True)
    ]
    run_meta = {
        **(meta or {}),
        "num_samples": settings.num_samples,
        "with_hints": settings.with_hints,
        "temperature": settings.sampling.temperature,
        "top_p": settings.sampling.top_p,
        "max_new_tokens": settings.sampling.max_new_tokens,
        "seed": settings.sampling.seed,
        "skipped": selection.skipped,
    }
    return EvalResults(problems=problems, meta=run_meta)


@dataclass(kw_only=True)
class PeriodicEvaluator:
    """Evaluation during training (train.eval_every): held-out problems without hints, through the rollout engine
    that holds the current weights; each evaluation's results are saved for `guide-mega analyze`
    (`step_<n>.json`), and its generations beside them (`step_<n>_generations.jsonl`, rows as in eval's
    `generations.jsonl`)."""

    engine: RolloutEngine
    reward_pool: RewardPool
    prompts: list[Prompt]
    tokenize: Tokenize
    settings: EvalSettings
    every: int
    output_dir: Path

    def __call__(self, step: int, *, is_last: bool) -> dict[str, float]:
        """eval/ metrics at every `every`-th step and after the last; {} at other steps."""
        if step % self.every != 0 and not is_last:
            return {}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = evaluate(
            self.engine, self.reward_pool, self.prompts, tokenize=self.tokenize, settings=self.settings,
            meta={"step": step}, show_progress=False,
            generations_path=self.output_dir / f"step_{step}_generations.jsonl",
        )  # fmt: skip
        results.save(self.output_dir / f"step_{step}.json")
        n = self.settings.num_samples
        metrics = {
            "eval/pass@1": results.pass_at_k(1),
            f"eval/pass@{n}": results.pass_at_k(n),
            "eval/num_problems": float(len(results.problems)),
        }
        greedy = results.greedy_pass_at_1()
        if greedy is not None:
            metrics["eval/greedy_pass@1"] = greedy
        return metrics

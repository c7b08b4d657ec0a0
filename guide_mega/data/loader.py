"""Batches of prompts: deterministic shuffling per epoch, a resumable position, and the prompt-length limit.

A prompt longer than `max_prompt_tokens` (after the chat template) is not trained on, but it is counted, logged once
with its id and reported in `metrics`, never dropped silently. A prompt whose *hinted* version is too long keeps
training unguided: its hint is removed for this run and counted; of graded hints only the levels too long go.

The loader also keeps each problem's hint level (graded hints, algorithm.guide.levels) and the hints the policy
wrote itself (algorithm.guide.hint_source = self), both part of its resumable state.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from guide_mega.algorithms.guide import DEFAULT_HINT_TEMPLATE, hinted_prompt
from guide_mega.config import DataConfig
from guide_mega.data.chat import render_prompt_ids
from guide_mega.types import Prompt

logger = logging.getLogger(__name__)


class PromptLoader:
    """Endless batches over `prompts`: epoch e visits them in the order `permutation(seed, e)` (or file order).

    `state_dict()` after any batch and `load_state_dict` on a fresh loader over the same prompts continue with
    exactly the batches the first loader would have produced next.
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        *,
        seed: int,
        shuffle: bool = True,
        tokenizer: Any = None,
        max_prompt_tokens: int | None = None,
        system_prompt: str | None = None,
        hint_template: str = DEFAULT_HINT_TEMPLATE,
    ) -> None:
        if not prompts:
            raise ValueError("PromptLoader: the prompt source is empty")
        if max_prompt_tokens is not None and tokenizer is None:
            raise ValueError("PromptLoader: max_prompt_tokens needs a tokenizer")
        self._prompts = list(prompts)
        self._seed, self._shuffle = seed, shuffle
        self._tokenizer, self._max_prompt_tokens = tokenizer, max_prompt_tokens
        self._system_prompt, self._hint_template = system_prompt, hint_template
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)
        self._admitted: dict[int, Prompt | None] = {}
        self._overlong_ids: set[str] = set()
        self._hint_removed_ids: set[str] = set()
        self._levels_removed_ids: set[str] = set()
        self._hint_levels: dict[str, int] = {}
        self._self_hints: dict[tuple[str, int], str | None] = {}

    @classmethod
    def from_config(
        cls,
        prompts: Sequence[Prompt],
        config: DataConfig,
        *,
        tokenizer: Any,
        hint_template: str = DEFAULT_HINT_TEMPLATE,
    ) -> PromptLoader:
        return cls(
            prompts,
            seed=config.seed,
            shuffle=config.shuffle,
            tokenizer=tokenizer,
            max_prompt_tokens=config.max_prompt_tokens,
            system_prompt=config.system_prompt,
            hint_template=hint_template,
        )

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(len(self._prompts))
        return np.random.default_rng([self._seed, epoch]).permutation(len(self._prompts))

    def _fits(self, content: Any) -> bool:
        ids = render_prompt_ids(self._tokenizer, content, system_prompt=self._system_prompt)
        return len(ids) <= self._max_prompt_tokens

    def _admit(self, index: int) -> Prompt | None:
        """The prompt as it will be trained (hint removed if the hinted prompt is too long), or None if too long."""
        if index not in self._admitted:
            self._admitted[index] = self._check_length(self._prompts[index])
        return self._admitted[index]

    def _check_length(self, prompt: Prompt) -> Prompt | None:
        limit = self._max_prompt_tokens
        if limit is None:
            return prompt
        if not self._fits(prompt.prompt):
            logger.warning("prompt %s is longer than %d tokens; not trained on", prompt.id, limit)
            self._overlong_ids.add(prompt.id)
            return None
        fitting = [
            level
            for level in range(prompt.num_hint_levels)
            if self._fits(hinted_prompt(prompt, template=self._hint_template, level=level))
        ]
        if prompt.has_hint and not fitting:
            logger.warning("hinted prompt %s is longer than %d tokens; trained without its hint", prompt.id, limit)
            self._hint_removed_ids.add(prompt.id)
            return dataclasses.replace(prompt, hint=None, hinted_prompt=None)
        if len(fitting) < prompt.num_hint_levels:
            logger.warning("prompt %s: hint levels other than %s are longer than %d tokens", prompt.id, fitting, limit)
            self._levels_removed_ids.add(prompt.id)
            return dataclasses.replace(prompt, hint=[prompt.hint[level] for level in fitting])
        return prompt

    def _advance(self) -> int:
        if self._position == len(self._order):
            self._epoch, self._position = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        index = int(self._order[self._position])
        self._position += 1
        return index

    def next_batch(self, batch_size: int) -> list[Prompt]:
        """The next `batch_size` admissible prompts (crossing into the next epoch when this one ends)."""
        batch: list[Prompt] = []
        draws_without_prompt = 0
        while len(batch) < batch_size:
            prompt = self._admit(self._advance())
            if prompt is None:
                draws_without_prompt += 1
                if draws_without_prompt > len(self._prompts):
                    raise ValueError(f"every prompt is longer than data.max_prompt_tokens={self._max_prompt_tokens}")
                continue
            draws_without_prompt = 0
            batch.append(prompt)
        return batch

    @property
    def hint_levels(self) -> Mapping[str, int]:
        """Each problem's current hint level (prompt id -> index into its graded hints); absent means 0."""
        return MappingProxyType(self._hint_levels)

    def update_hint_levels(self, updates: Mapping[str, int]) -> None:
        """Set the hint levels of the problems in `updates` (from `algorithms.guide.hint_level_updates`)."""
        for prompt_id, level in updates.items():
            if level:
                self._hint_levels[prompt_id] = level
            else:
                self._hint_levels.pop(prompt_id, None)

    @property
    def self_hints(self) -> Mapping[tuple[str, int], str | None]:
        """The hints the policy wrote: (prompt id, level) -> hint, None where it was rejected (it leaked)."""
        return MappingProxyType(self._self_hints)

    def update_self_hints(self, written: Mapping[tuple[str, int], str | None]) -> None:
        """Keep newly written hints (from `experience.self_written_hints`), so each is written once per run."""
        self._self_hints.update(written)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "num_prompts": len(self._prompts),
            "hint_levels": dict(self._hint_levels),
            "self_hints": [[prompt_id, level, hint] for (prompt_id, level), hint in self._self_hints.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the prompts and seed must be those the state was saved with."""
        for key, current in (("seed", self._seed), ("num_prompts", len(self._prompts))):
            if state[key] != current:
                raise ValueError(f"PromptLoader state: {key} is {state[key]} in the checkpoint but {current} now")
        if not 0 <= state["position"] <= len(self._prompts):
            raise ValueError(f"PromptLoader state: position {state['position']} out of range")
        self._epoch, self._position = state["epoch"], state["position"]
        self._order = self._epoch_order(self._epoch)
        # A checkpoint from before graded hints has no levels (every problem starts at 0) and no written hints.
        self._hint_levels = {str(key): int(level) for key, level in state.get("hint_levels", {}).items()}
        self._self_hints = {(prompt_id, level): hint for prompt_id, level, hint in state.get("self_hints", [])}

    @property
    def metrics(self) -> dict[str, float]:
        """Counts of distinct prompts seen so far that were too long, or lost their hint (or some of its levels)
        for length."""
        return {
            "data/epoch": float(self._epoch),
            "data/num_overlong_prompts": float(len(self._overlong_ids)),
            "data/num_hints_removed_for_length": float(len(self._hint_removed_ids)),
            "data/num_hint_levels_removed_for_length": float(len(self._levels_removed_ids)),
        }

"""Reward scoring in worker processes, each sample under a deadline.

math-verify interrupts slow sympy work with SIGALRM, which works only on a process's main thread, and a
pathological answer can still hang a C call that no signal interrupts. So every sample is scored on the main thread
of a worker process, and the parent kills a worker that passes its deadline (or dies) and starts a replacement. A
timed-out or crashed sample scores 0 and is counted; it never stops the training step. The code reward runs its
programs in sandbox processes started by the worker (`sandbox.py`); a sandbox whose worker is killed dies with it,
and its directory, in the pool's scratch directory, goes when the pool closes.

Workers come from a `forkserver` (or `spawn`) context: forking a parent that holds threads, CUDA state or a
Megatron process group is unsafe, and the fork server has math-verify and sympy imported once, so a replacement
starts in milliseconds.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guide_mega.config import RewardConfig
from guide_mega.rewards import boundary
from guide_mega.rewards.results import RewardOptions, RewardResult, failed_result
from guide_mega.rewards.sandbox import SandboxLimits, remove_tree, require_boundary
from guide_mega.rewards.verifiers import RewardTask, check_reward_name, score_task
from guide_mega.types import RolloutGroup

logger = logging.getLogger(__name__)

OutcomeStatus = Literal["ok", "timeout", "error"]
# Modules the fork server imports once, so each worker (and each replacement) starts with them loaded.
_PRELOAD = ["guide_mega.rewards.verifiers", "math_verify", "reasoning_gym"]
_JOIN_TIMEOUT_S = 5.0
# Time a reward function keeps between its own time budget and the pool's deadline (to return its result).
_DEADLINE_MARGIN_S = 0.5
# Owner-only listing, but traversable: a program running as an unprivileged user reaches its own run directory.
_SCRATCH_DIR_MODE = 0o711


@dataclass(frozen=True)
class Outcome:
    status: OutcomeStatus
    value: Any = None
    error: str = ""


def _worker_main(connection: multiprocessing.connection.Connection, fn: Callable[[Any], Any]) -> None:
    """Worker loop: receive (index, item), send back (index, Outcome), until the parent closes the pipe."""
    # A correct answer may have more than Python's default 4,300 digits (math-verify then fails it silently); the
    # deadline bounds what a huge number costs, and a timeout is counted.
    sys.set_int_max_str_digits(0)
    while True:
        try:
            index, item = connection.recv()
        except (EOFError, OSError):
            return
        try:
            outcome = Outcome("ok", fn(item))
        except Exception as exc:  # reported to the parent as this sample's error; the worker lives on
            outcome = Outcome("error", error=f"{type(exc).__name__}: {exc}")
        connection.send((index, outcome))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context: multiprocessing.context.BaseContext, fn: Callable[[Any], Any]) -> None:
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_end, fn), daemon=True)
        self.process.start()
        child_end.close()
        self.task_index: int | None = None
        self.deadline = 0.0

    def stop(self, *, kill: bool) -> None:
        if kill:
            self.process.kill()
        self.connection.close()
        self.process.join(_JOIN_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class DeadlinePool:
    """Maps a picklable, importable `fn` over items in `num_workers` processes, each call under `timeout_s`.

    `map` returns one `Outcome` per item, in order: ok (with fn's value), timeout (the worker was killed and
    replaced) or error (fn raised, or the worker process died). `num_restarts` counts replaced workers.
    """

    def __init__(
        self, fn: Callable[[Any], Any], *, num_workers: int, timeout_s: float, start_method: str = "forkserver"
    ) -> None:
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"DeadlinePool needs num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(_PRELOAD)
        self._fn = fn
        self._timeout_s = timeout_s
        self._workers = [_Worker(self._context, fn) for _ in range(num_workers)]
        self.num_restarts = 0

    def _replace(self, slot: int, *, kill: bool) -> None:
        self._workers[slot].stop(kill=kill)
        self._workers[slot] = _Worker(self._context, self._fn)
        self.num_restarts += 1

    def _dispatch(self, pending: deque[tuple[int, Any]]) -> None:
        for worker in self._workers:
            if worker.task_index is None and pending:
                index, item = pending.popleft()
                worker.connection.send((index, item))
                worker.task_index, worker.deadline = index, time.monotonic() + self._timeout_s

    def _collect(self, outcomes: list[Outcome | None]) -> None:
        """Wait for the first result or deadline, then record every finished, dead or overdue worker."""
        busy = [worker for worker in self._workers if worker.task_index is not None]
        wait_s = max(0.0, min(worker.deadline for worker in busy) - time.monotonic())
        ready = set(multiprocessing.connection.wait([worker.connection for worker in busy], wait_s))
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            index = worker.task_index
            if index is None:
                continue
            if worker.connection in ready:
                try:
                    _, outcomes[index] = worker.connection.recv()
                except (EOFError, OSError):
                    worker.process.join(_JOIN_TIMEOUT_S)
                    outcomes[index] = Outcome("error", error=f"worker died (exit code {worker.process.exitcode})")
                    self._replace(slot, kill=True)
                    continue
                worker.task_index = None
            elif now >= worker.deadline:
                outcomes[index] = Outcome("timeout", error=f"no result within {self._timeout_s:g} s")
                self._replace(slot, kill=True)

    def map(self, items: Sequence[Any]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        pending = deque(enumerate(items))
        while pending or any(worker.task_index is not None for worker in self._workers):
            if not self._workers:
                raise RuntimeError("DeadlinePool.map: the pool was closed")
            self._dispatch(pending)
            self._collect(outcomes)
        return outcomes  # type: ignore[return-value]  # every slot was filled by _collect

    def close(self) -> None:
        for worker in self._workers:
            worker.stop(kill=False)
        self._workers = []

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RewardPool:
    """Scores responses with a registered reward function in a `DeadlinePool`, and keeps the reward metrics."""

    def __init__(self, *, reward_name: str, options: RewardOptions, num_workers: int, timeout_s: float) -> None:
        self.reward_name = check_reward_name(reward_name)
        # Sandboxed runs happen in here: a worker killed mid-run cannot remove its run's directory, close() can.
        self._scratch_dir = tempfile.mkdtemp(prefix="guide-mega-rewards-")
        os.chmod(self._scratch_dir, _SCRATCH_DIR_MODE)
        self.options = dataclasses.replace(options, code_scratch_dir=self._scratch_dir)
        self._pool = DeadlinePool(score_task, num_workers=num_workers, timeout_s=timeout_s)
        self._status_counts: Counter[str] = Counter()

    @classmethod
    def from_config(cls, config: RewardConfig, *, lenient: bool = False) -> RewardPool:
        # math-verify's own per-operation timeout fires well inside the pool deadline, so a slow sympy call is
        # interrupted cheaply in the worker before the parent has to kill and replace the whole process.
        # The code reward likewise stops starting tests in time to return its own result before the deadline.
        # Code rewards refuse to start without the OS sandbox unless the config allows the weak fallback.
        os_boundary = require_boundary(allow_weak=config.allow_weak_sandbox) if config.name == "code" else True
        if not os_boundary:
            logger.warning("reward.allow_weak_sandbox: programs run WITHOUT the OS sandbox (no bubblewrap here)")
        options = RewardOptions(
            lenient=lenient,
            format_gate=config.format_gate,
            format_bonus=config.format_bonus,
            verify_timeout_s=max(1, int(config.timeout_s // 2)),
            code_limits=SandboxLimits(
                wall_s=config.code_timeout_s, memory_mb=config.code_memory_mb, os_boundary=os_boundary
            ),
            code_partial_credit=config.code_partial_credit,
            code_time_budget_s=config.timeout_s - _DEADLINE_MARGIN_S,
        )
        return cls(reward_name=config.name, options=options, num_workers=config.num_workers, timeout_s=config.timeout_s)

    def score(
        self,
        responses: Sequence[str],
        answers: Sequence[str | list[str]],
        metadatas: Sequence[dict],
        *,
        prompts: Sequence[str | list[dict]] | None = None,
    ) -> list[RewardResult]:
        """One RewardResult per response; a timeout or a failed verifier gives a 0-reward result with its status.
        `prompts` (the hint-free prompts) are what a user reward function gets as its first argument."""
        tasks = [
            RewardTask(
                reward_name=self.reward_name,
                response=response,
                answer=answer,
                metadata=metadata,
                prompt=prompt,
                options=self.options,
            )
            for response, answer, metadata, prompt in zip(
                responses, answers, metadatas, prompts or [None] * len(responses), strict=True
            )
        ]
        results: list[RewardResult] = []
        for outcome in self._pool.map(tasks):
            result = outcome.value if outcome.status == "ok" else failed_result(outcome.status, outcome.error)
            self._status_counts[result.status] += 1
            if result.status != "ok":
                logger.warning(
                    "reward %s: %s (%s); reward %g", self.reward_name, result.status, result.error, result.reward
                )
            results.append(result)
        return results

    def score_groups(self, groups: Sequence[RolloutGroup]) -> tuple[list[RolloutGroup], list[RewardResult]]:
        """Copies of `groups` whose rollouts carry their reward and correctness, and the results in rollout order
        (the input groups are left as they were)."""
        pairs = [(group.prompt, rollout) for group in groups for rollout in group.rollouts]
        results = iter(
            self.score(
                [rollout.response_text for _, rollout in pairs],
                [prompt.answer for prompt, _ in pairs],
                [prompt.metadata for prompt, _ in pairs],
                prompts=[prompt.prompt for prompt, _ in pairs],
            )
        )
        scored, all_results = [], []
        for group in groups:
            rollouts = []
            for rollout in group.rollouts:
                result = next(results)
                all_results.append(result)
                rollouts.append(dataclasses.replace(rollout, reward=result.reward, correct=result.correct))
            scored.append(dataclasses.replace(group, rollouts=rollouts))
        return scored, all_results

    @property
    def metrics(self) -> dict[str, float]:
        """Cumulative counts: verifications that timed out, raised or crashed, and worker restarts."""
        return {
            "reward/num_timeouts": float(self._status_counts["timeout"]),
            "reward/num_errors": float(self._status_counts["error"]),
            "reward/num_worker_restarts": float(self._pool.num_restarts),
        }

    def close(self) -> None:
        self._pool.close()
        remove_tree(self._scratch_dir)
        boundary.remove_orphan_cgroups()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

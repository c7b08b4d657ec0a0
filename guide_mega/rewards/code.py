"""The code reward: the response's Python program, run against the problem's tests in the sandbox.

The program is the last fenced code block of the response marked python (or py, python3), else the last unmarked
one; a response without a complete block scores 0 and is not formatted.

The tests are `Prompt.metadata["tests"]`, or else the ground-truth answer parsed as JSON, in this form:

    {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...],     # stdin -> expected stdout pairs
     "asserts": ["assert add(1, 2) == 3", ...]}               # statements appended to the program

Either list may be missing, not both. A stdin test passes when the program exits 0 and its stdout equals the
expected output up to trailing whitespace on each line and at the end. An assert test passes when the program
followed by the statement exits 0. Each test is its own sandboxed run (`sandbox.run_program`).

Assert tests run inside the program's own interpreter, so a program that wants to can fake them (exit 0 early, or
return an object equal to everything); stdin tests cannot be faked that way, since the expected output never
reaches the sandbox. Prefer stdin tests for training.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from guide_mega.rewards.results import RewardOptions, RewardResult
from guide_mega.rewards.sandbox import STARTUP_ALLOWANCE_S, run_program

TESTS_METADATA_KEY = "tests"
_PYTHON_FENCE_LANGUAGES = ("python", "py", "python3")
_FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class CodeTest:
    """One sandboxed run: the program plus `appended` code, fed `stdin`."""

    stdin: str = ""
    expected_stdout: str | None = None
    """None: the test passes when the run exits 0 (an assert test)."""
    appended: str = ""


def extract_program(response: str) -> str | None:
    """The last complete python-marked fenced block of `response`, else its last unmarked one, else None."""
    blocks = [(language.lower(), body) for language, body in _FENCED_BLOCK.findall(response)]
    python = [body for language, body in blocks if language in _PYTHON_FENCE_LANGUAGES]
    unmarked = [body for language, body in blocks if not language]
    candidates = python or unmarked
    return candidates[-1] if candidates else None


def load_tests(answer: str | list[str], metadata: dict[str, Any]) -> list[CodeTest]:
    """The problem's tests from metadata['tests'] or the JSON answer (format in the module docstring)."""
    spec = metadata.get(TESTS_METADATA_KEY)
    if spec is None:
        text = answer if isinstance(answer, str) else answer[0]
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"code reward: the answer is not a JSON test spec ({exc.msg})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"code reward: the test spec must be a JSON object, got {type(spec).__name__}")
    inputs, outputs = spec.get("inputs", []), spec.get("outputs", [])
    if len(inputs) != len(outputs):
        raise ValueError(f"code reward: {len(inputs)} test inputs but {len(outputs)} outputs")
    tests = [CodeTest(stdin=stdin, expected_stdout=expected) for stdin, expected in zip(inputs, outputs, strict=True)]
    tests += [CodeTest(appended=f"\n\n{statement}\n") for statement in spec.get("asserts", [])]
    if not tests:
        raise ValueError("code reward: the test spec has no inputs/outputs and no asserts")
    return tests


def _normalized_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _run_test(program: str, test: CodeTest, options: RewardOptions) -> str | None:
    """None when the test passes, else why it failed."""
    result = run_program(
        program + test.appended, stdin=test.stdin, limits=options.code_limits, scratch_dir=options.code_scratch_dir
    )
    if result.status != "ok":
        return result.status
    if test.expected_stdout is not None and _normalized_lines(result.stdout) != _normalized_lines(test.expected_stdout):
        return "wrong output"
    return None


def run_tests(program: str, tests: list[CodeTest], options: RewardOptions) -> tuple[int, str]:
    """How many tests pass, and why the first failing one failed ('' when all pass).

    Without partial credit the first failure ends the run; with a time budget, a test that could end past it is
    not started (it fails), so the reward worker finishes before the pool's deadline.
    """
    start = time.monotonic()
    run_cost_s = options.code_limits.wall_s + STARTUP_ALLOWANCE_S
    passed, first_failure = 0, ""
    for index, test in enumerate(tests):
        budget_s = options.code_time_budget_s
        if budget_s is not None and time.monotonic() - start + run_cost_s > budget_s:
            return passed, first_failure or f"test {index}: not run, the time budget of {budget_s:g} s is spent"
        failure = _run_test(program, test, options)
        if failure is None:
            passed += 1
            continue
        first_failure = first_failure or f"test {index}: {failure}"
        if not options.code_partial_credit:
            break
    return passed, first_failure


def code_reward(
    response: str, *, answer: str | list[str], metadata: dict[str, Any], options: RewardOptions
) -> RewardResult:
    """Correct if the extracted program passes every test; the reward is 1 for that (or, with partial credit, the
    fraction passed), plus the format bonus for a response with a code block."""
    tests = load_tests(answer, metadata)
    program = extract_program(response)
    if program is None:
        return RewardResult(reward=0.0, correct=False, is_formatted=False, error="no fenced code block")
    passed, failure = run_tests(program, tests, options)
    correct = passed == len(tests)
    score = passed / len(tests) if options.code_partial_credit else float(correct)
    return RewardResult(
        reward=score + options.format_bonus,
        correct=correct,
        is_formatted=True,
        extracted=program,
        error=failure,
    )

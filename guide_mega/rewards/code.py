"""The code reward: the response's Python program, run against the problem's tests in the sandbox.

The program is the last fenced code block of the response marked python (or py, python3), else the last unmarked
one; a response without a complete block scores 0 and is not formatted.

The tests are `Prompt.metadata["tests"]`, or else the ground-truth answer parsed as JSON, in this form:

    {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...],     # stdin -> expected stdout pairs
     "asserts": ["assert add(1, 2) == 3", ...]}               # statements run after the program

Either list may be missing, not both; where both are given, assert tests get the first stdin test's input (a program
that reads stdin at its top level would otherwise fail them). Each test is its own sandboxed run
(`sandbox.run_program`), and each is judged outside the program, by what it cannot forge:

- stdin: the program exits 0 and its stdout equals the expected output up to trailing whitespace on each line and
  at the end. The expected output never enters the sandbox.
- `assert EXPR == LITERAL` (either side the literal, as `ast.literal_eval` reads it): EXPR is evaluated in the
  sandbox after the program, its value comes back as plain data (a Python literal of built-in types only), and
  this side compares it with LITERAL. Exiting early, patching `sys.exit` or returning an object equal to
  everything cannot pass: the value never arrives, or is refused as not plain data.
- any other assert: the statement runs after the program, and the test passes when the harness reports that it
  ran to its end (exit codes are not trusted). A program written to defeat the harness from the inside can fake
  this kind; prefer the two above for training.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from guide_mega.rewards.results import RewardOptions, RewardResult
from guide_mega.rewards.sandbox import STARTUP_ALLOWANCE_S, SandboxResult, run_program

TESTS_METADATA_KEY = "tests"
_PYTHON_FENCE_LANGUAGES = ("python", "py", "python3")
_FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_TEST_LISTS = ("inputs", "outputs", "asserts")
# Integers in expected values and in the values programs return may have this many digits (Python's default int
# string limit, 4,300, would fail correct answers; no limit would let a reported value cost seconds to parse).
_MAX_INT_DIGITS = 100_000
_LITERAL_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


@dataclass(frozen=True, kw_only=True)
class CodeTest:
    """One sandboxed run of the program, fed `stdin`, then (assert tests) the test's code in its namespace."""

    stdin: str = ""
    expected_stdout: str | None = None
    """stdin tests: what the program must print; None for assert tests."""
    statements: str = ""
    """Asserts of other forms: run after the program; the test passes when they run to their end."""
    expression: str | None = None
    """`assert EXPR == LITERAL` tests: EXPR, evaluated in the sandbox; its value is compared with `expected` here."""
    expected: Any = None
    """The literal an expression test's value must equal."""


@contextlib.contextmanager
def _int_digits(limit: int) -> Iterator[None]:
    """Python's int-string conversion limit set to `limit` for the block (it is process-wide)."""
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(limit)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(previous)


def extract_program(response: str) -> str | None:
    """The last complete python-marked fenced block of `response`, else its last unmarked one, else None."""
    blocks = [(language.lower(), body) for language, body in _FENCED_BLOCK.findall(response)]
    python = [body for language, body in blocks if language in _PYTHON_FENCE_LANGUAGES]
    unmarked = [body for language, body in blocks if not language]
    candidates = python or unmarked
    return candidates[-1] if candidates else None


def assert_test(statement: str) -> CodeTest:
    """An expression test for `assert EXPR == LITERAL` (either side the literal), else a statements test."""
    try:
        with _int_digits(_MAX_INT_DIGITS):
            tree = ast.parse(statement)
    except SyntaxError as exc:
        raise ValueError(f"code reward: assert test {statement[:80]!r} is not valid Python ({exc.msg})") from None
    node = tree.body[0] if len(tree.body) == 1 else None
    is_equality = isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
    if not is_equality or not isinstance(node.test.ops[0], ast.Eq):
        return CodeTest(statements=statement)
    left, right = node.test.left, node.test.comparators[0]
    for computed, literal in ((left, right), (right, left)):
        try:
            with _int_digits(_MAX_INT_DIGITS):
                expected = ast.literal_eval(literal)
        except _LITERAL_ERRORS:
            continue
        return CodeTest(expression=ast.unparse(computed), expected=expected)
    return CodeTest(statements=statement)


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
    for key in _TEST_LISTS:
        entries = spec.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
            raise ValueError(f"code reward: the test spec's {key!r} must be a list of strings")
    inputs, outputs = spec.get("inputs", []), spec.get("outputs", [])
    if len(inputs) != len(outputs):
        raise ValueError(f"code reward: {len(inputs)} test inputs but {len(outputs)} outputs")
    tests = [CodeTest(stdin=stdin, expected_stdout=expected) for stdin, expected in zip(inputs, outputs, strict=True)]
    # A program that reads stdin at its top level needs some for its assert tests too: the first stdin test's.
    assert_stdin = inputs[0] if inputs else ""
    tests += [dataclasses.replace(assert_test(statement), stdin=assert_stdin) for statement in spec.get("asserts", [])]
    if not tests:
        raise ValueError("code reward: the test spec has no inputs/outputs and no asserts")
    return tests


def _normalized_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _judge(test: CodeTest, result: SandboxResult) -> str | None:
    """None when the run passes the test, else why not; judged on what the program cannot forge (see above)."""
    if result.status != "ok":
        return result.status
    if test.expected_stdout is not None:
        return None if _normalized_lines(result.stdout) == _normalized_lines(test.expected_stdout) else "wrong output"
    if not result.finished:
        return "exited before the end of the test"
    if test.expression is None:
        return None
    if result.value is None:
        return "no value"
    try:
        with _int_digits(_MAX_INT_DIGITS):
            value = ast.literal_eval(result.value)
    except _LITERAL_ERRORS:
        return "value not readable"
    return None if value == test.expected else "wrong value"


def _run_test(program: str, test: CodeTest, options: RewardOptions) -> str | None:
    """None when the test passes, else why it failed."""
    result = run_program(
        program,
        stdin=test.stdin,
        limits=options.code_limits,
        scratch_dir=options.code_scratch_dir,
        statements=test.statements,
        expression=test.expression,
    )
    return _judge(test, result)


def run_tests(program: str, tests: list[CodeTest], options: RewardOptions) -> tuple[int, str, bool]:
    """How many tests pass, why the first failing one failed ('' when all pass), and whether the time budget
    stopped the run.

    Without partial credit the first failure ends the run; with a time budget, a test that could end past it is
    not started (it fails), so the reward worker finishes before the pool's deadline.
    """
    start = time.monotonic()
    run_cost_s = options.code_limits.wall_s + STARTUP_ALLOWANCE_S
    passed, first_failure = 0, ""
    for index, test in enumerate(tests):
        budget_s = options.code_time_budget_s
        if budget_s is not None and time.monotonic() - start + run_cost_s > budget_s:
            return passed, first_failure or f"test {index}: not run, the time budget of {budget_s:g} s is spent", True
        failure = _run_test(program, test, options)
        if failure is None:
            passed += 1
            continue
        first_failure = first_failure or f"test {index}: {failure}"
        if not options.code_partial_credit:
            break
    return passed, first_failure, False


def code_reward(
    response: str, *, answer: str | list[str], metadata: dict[str, Any], options: RewardOptions
) -> RewardResult:
    """Correct if the extracted program passes every test; the reward is 1 for that (or, with partial credit, the
    fraction passed), plus the format bonus for a response with a code block."""
    tests = load_tests(answer, metadata)
    program = extract_program(response)
    if program is None:
        return RewardResult(reward=0.0, correct=False, is_formatted=False, error="no fenced code block")
    passed, failure, out_of_time = run_tests(program, tests, options)
    correct = passed == len(tests)
    score = passed / len(tests) if options.code_partial_credit else float(correct)
    return RewardResult(
        reward=score + options.format_bonus,
        correct=correct,
        is_formatted=True,
        extracted=program,
        # Tests left unrun for lack of time are a timeout the pool counts (reward/num_timeouts), not a quiet 0.
        status="timeout" if out_of_time else "ok",
        error=failure,
    )

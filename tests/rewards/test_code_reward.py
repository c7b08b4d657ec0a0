"""The code reward: program extraction, the test formats, scoring, and many programs in the reward pool."""

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from guide_mega.config import RewardConfig
from guide_mega.rewards import boundary
from guide_mega.rewards.code import CodeTest, code_reward, extract_program, load_tests
from guide_mega.rewards.pool import RewardPool
from guide_mega.rewards.results import RewardOptions
from guide_mega.rewards.sandbox import SandboxLimits

# Under bubblewrap where it runs (CI installs it); elsewhere the weak fallback, as reward.allow_weak_sandbox does.
OS_BOUNDARY = boundary.unavailable_reason() is None
# Generous: the test machine may be heavily loaded, and these programs must finish.
OPTIONS = RewardOptions(code_limits=SandboxLimits(wall_s=20.0, os_boundary=OS_BOUNDARY))
SUM_TESTS = {"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7", "0\n\n"]}


def fenced(source: str, language: str = "python") -> str:
    return f"Here is my solution.\n```{language}\n{source}\n```\nDone."


def test_extract_program_takes_the_last_python_block():
    response = "```python\nprint(1)\n```\ntext\n```cpp\nint main() {}\n```\n```py\nprint(2)\n```"
    assert extract_program(response) == "print(2)\n"
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert extract_program("```python\nprint(1)\n```\n```\nplain\n```") == "print(1)\n"
    assert extract_program("```python\nprint('cut off by the token limit')") is None
    assert extract_program("print(1)") is None


def test_load_tests_from_metadata_or_the_json_answer():
    from_answer = load_tests(json.dumps({"inputs": ["1\n"], "outputs": ["1\n"], "asserts": ["assert f() == 1"]}), {})
    assert from_answer == [
        CodeTest(stdin="1\n", expected_stdout="1\n"),
        CodeTest(stdin="1\n", expression="f()", expected=1),  # the first stdin test's input, for top-level reads
    ]
    assert load_tests("ignored", {"tests": {"asserts": ["assert True"]}}) == [CodeTest(statements="assert True")]
    assert load_tests("", {"tests": {"asserts": ["assert (1, [2]) == g(x=3)", "assert f() in (1, 2)"]}}) == [
        CodeTest(expression="g(x=3)", expected=(1, [2])),
        CodeTest(statements="assert f() in (1, 2)"),
    ]
    for spec, key in (({"inputs": "1 2", "outputs": "3"}, "inputs"), ({"asserts": "assert f() == 1"}, "asserts")):
        with pytest.raises(ValueError, match=f"'{key}' must be a list of strings"):
            load_tests(json.dumps(spec), {})
    with pytest.raises(ValueError, match="is not valid Python"):
        load_tests(json.dumps({"asserts": ["assert f( == 1"]}), {})
    with pytest.raises(ValueError, match="not a JSON test spec"):
        load_tests("not json", {})
    with pytest.raises(ValueError, match="2 test inputs but 1 outputs"):
        load_tests(json.dumps({"inputs": ["1", "2"], "outputs": ["1"]}), {})
    with pytest.raises(ValueError, match="no inputs/outputs and no asserts"):
        load_tests("{}", {})


def test_stdin_tests_all_or_nothing_and_partial_credit():
    right = fenced("a, b = map(int, input().split())\nprint(a + b)   ")
    result = code_reward(right, answer=json.dumps(SUM_TESTS), metadata={}, options=OPTIONS)
    assert (result.reward, result.correct, result.is_formatted, result.error) == (1.0, True, True, "")
    # Right on two of three tests (it subtracts): the first failure ends an all-or-nothing run.
    wrong = fenced("a, b = map(int, input().split())\nprint(a - b if b < 0 else a + b)")
    result = code_reward(wrong, answer=json.dumps(SUM_TESTS), metadata={}, options=OPTIONS)
    assert (result.reward, result.correct, result.error) == (0.0, False, "test 1: wrong output")
    partial = RewardOptions(code_limits=OPTIONS.code_limits, code_partial_credit=True, format_bonus=0.5)
    result = code_reward(wrong, answer=json.dumps(SUM_TESTS), metadata={}, options=partial)
    assert result.reward == pytest.approx(2 / 3 + 0.5) and not result.correct


def test_assert_tests():
    tests = {"tests": {"asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}}
    right = code_reward(fenced("def add(a, b):\n    return a + b"), answer="", metadata=tests, options=OPTIONS)
    assert right.correct and right.reward == 1.0
    wrong = code_reward(fenced("def add(a, b):\n    return a * b"), answer="", metadata=tests, options=OPTIONS)
    assert not wrong.correct and wrong.error == "test 0: wrong value"


def test_no_code_block_and_spent_time_budget_score_zero():
    missing = code_reward("print(3)", answer=json.dumps(SUM_TESTS), metadata={}, options=OPTIONS)
    assert (missing.reward, missing.is_formatted) == (0.0, False)
    budget = RewardOptions(code_limits=SandboxLimits(wall_s=2.0, os_boundary=OS_BOUNDARY), code_time_budget_s=1.0)
    result = code_reward(fenced("print(3)"), answer=json.dumps(SUM_TESTS), metadata={}, options=budget)
    assert result.reward == 0.0 and "time budget" in result.error
    assert result.status == "timeout"  # counted by the pool as reward/num_timeouts, never a quiet 0
    assert code_reward(fenced("print(3)"), answer=json.dumps(SUM_TESTS), metadata={}, options=OPTIONS).status == "ok"


def _pool(num_workers: int, **overrides) -> RewardPool:
    settings = {"timeout_s": 30.0, "code_timeout_s": 1.0, "allow_weak_sandbox": not OS_BOUNDARY, **overrides}
    config = RewardConfig(name="code", num_workers=num_workers, **settings)
    return RewardPool.from_config(config)


def _sandbox_parents() -> set[int]:
    """Pids of the processes that started a running sandbox (the reward workers).

    A run is several processes whose command lines name the harness (bwrap outside, bwrap as the namespace's PID 1,
    the interpreter; in the weak fallback the harness and its PID-namespace child): only the first has a parent
    outside the run, so sandboxes are left out.
    """
    parents, sandboxes = set(), set()
    for process in psutil.process_iter(["cmdline", "ppid"]):
        if any(part.endswith("sandbox_child.py") for part in process.info["cmdline"] or []):
            parents.add(process.info["ppid"])
            sandboxes.add(process.pid)
    return parents - sandboxes


def test_adversarial_programs_score_zero_and_the_pool_keeps_going(tmp_path):
    """Each attack's test expects what it would print if it worked; all score 0, a good program still scores 1."""
    tmp_path.chmod(0o777)
    target = tmp_path / "pwned"
    assert os.environ["PATH"] != "/usr/bin:/bin", "the environment attack needs a PATH the sandbox does not use"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        attacks = {
            "while True: pass": "",
            "import os, time\nfor _ in range(200):\n    if os.fork() == 0:\n        time.sleep(60)\n"
            "        os._exit(0)\nprint('FORKED')": "FORKED",
            "block = bytearray(4 << 30)\nprint('ALLOCATED')": "ALLOCATED",
            f"open({str(target)!r}, 'w').write('x')\nprint('WROTE')": "WROTE",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\nprint('CONNECTED')": "CONNECTED",
            "import os\nprint(os.environ.get('PATH'))": os.environ["PATH"],
            "print('x' * (100 << 20))\nprint('DONE')": "DONE",
        }
        responses = [fenced(source) for source in attacks] + [fenced("print(input())")]
        answers = [json.dumps({"inputs": [""], "outputs": [expected]}) for expected in attacks.values()]
        answers.append(json.dumps({"inputs": ["ok\n"], "outputs": ["ok\n"]}))
        # code_timeout_s is generous: the good program must finish while the other worker runs an attack, on a
        # loaded machine too; the attacks score 0 whether they are stopped by a limit or run out of time.
        with _pool(2, code_timeout_s=4.0, code_memory_mb=256) as pool:
            results = pool.score(responses, answers, [{}] * len(responses))
            assert [result.reward for result in results] == [0.0] * len(attacks) + [1.0]
            assert [result.status for result in results] == ["ok"] * len(responses)
            assert pool.metrics["reward/num_worker_restarts"] == 0.0
    assert not target.exists()


def test_reward_pool_runs_programs_concurrently():
    responses = [fenced("import time\ntime.sleep(1.5)\nprint('ok')")] * 4
    answers = [json.dumps({"inputs": [""], "outputs": ["ok"]})] * 4
    most_at_once = 0
    with _pool(4, code_timeout_s=10.0) as pool:
        scoring = threading.Thread(target=lambda: pool.score(responses, answers, [{}] * 4))
        scoring.start()
        while scoring.is_alive():
            most_at_once = max(most_at_once, len(_sandbox_parents()))
            time.sleep(0.02)
        scoring.join()
    assert most_at_once >= 2


def test_a_killed_reward_worker_is_replaced_and_its_sample_scores_zero():
    """The reward worker dies (SIGKILL, as from the OOM killer) mid-sample: that sample scores 0 and is counted,
    a replacement scores the next one, and the orphaned sandbox dies with its worker."""
    responses = [fenced("import time\ntime.sleep(20)\nprint('ok')"), fenced("print('ok')")]
    answers = [json.dumps({"inputs": [""], "outputs": ["ok"]})] * 2
    results = []
    with _pool(1, code_timeout_s=25.0) as pool:
        scoring = threading.Thread(target=lambda: results.extend(pool.score(responses, answers, [{}, {}])))
        scoring.start()
        deadline = time.monotonic() + 20.0
        while not (workers := _sandbox_parents()) and time.monotonic() < deadline:
            time.sleep(0.02)
        (worker,) = workers
        psutil.Process(worker).send_signal(signal.SIGKILL)
        scoring.join(timeout=30.0)
        # The orphaned sandbox dies with its worker, before the pool closes: close() removes the cgroup of a run
        # whose worker died only once the cgroup is empty.
        deadline = time.monotonic() + 5.0
        while _sandbox_parents() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _sandbox_parents()
        assert [result.status for result in results] == ["error", "ok"]
        assert [result.reward for result in results] == [0.0, 1.0]
        assert "worker died" in results[0].error
        assert pool.metrics["reward/num_errors"] == 1.0 and pool.metrics["reward/num_worker_restarts"] == 1.0
        scratch_dir = Path(pool.options.code_scratch_dir)
        # Under bubblewrap a run leaves nothing on the host; in the weak fallback its directory stays until close.
        assert bool(list(scratch_dir.iterdir())) != OS_BOUNDARY
    assert not scratch_dir.exists()
    assert not list(Path("/sys/fs/cgroup/pids").glob(f"guide-mega-sandbox-{worker}-*"))
    assert not _sandbox_parents()


def test_scoring_on_a_closed_pool_is_a_clear_error():
    pool = _pool(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([fenced("print('ok')")], [json.dumps({"inputs": [""], "outputs": ["ok"]})], [{}])


def test_equality_asserts_compare_the_returned_value_outside_the_program():
    tests = {"tests": {"asserts": ["assert pair(2) == (2, [4])", "assert 10 ** 5000 + 1 == big()"]}}
    right = "def pair(n):\n    return (n, [n * n])\ndef big():\n    return 10 ** 5000 + 1"
    assert code_reward(fenced(right), answer="", metadata=tests, options=OPTIONS).correct
    # Python's == tells a tuple from a list, and so does the comparison here.
    as_list = right.replace("return (n, [n * n])", "return [n, [n * n]]")
    result = code_reward(fenced(as_list), answer="", metadata=tests, options=OPTIONS)
    assert (result.correct, result.error) == (False, "test 0: wrong value")
    # A value that is not plain data never reaches the comparison.
    generator = right.replace("return (n, [n * n])", "return (x for x in (n, [n * n]))")
    result = code_reward(fenced(generator), answer="", metadata=tests, options=OPTIONS)
    assert (result.correct, result.error) == (False, "test 0: error")


FAKES = {
    "os._exit at exit": "import atexit, os\natexit.register(os._exit, 0)\ndef add(a, b):\n    return 7",
    "SystemExit(0)": "def add(a, b):\n    raise SystemExit(0)",
    "patched sys.exit": "import sys\nsys.exit = lambda *args: None\ndef add(a, b):\n    return 7",
    "excepthook": "import os, sys\nsys.excepthook = lambda *args: os._exit(0)\ndef add(a, b):\n    return 7",
    "equal to everything": "class Anything:\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Anything()",
    "int subclass": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Int(7)",
}


@pytest.mark.parametrize("source", FAKES.values(), ids=FAKES.keys())
def test_faked_equality_asserts_fail(source):
    tests = {"tests": {"asserts": ["assert add(1, 2) == 3"]}}
    result = code_reward(fenced(source), answer="", metadata=tests, options=OPTIONS)
    assert not result.correct and result.error.startswith("test 0: ")


@pytest.mark.parametrize("name", ["os._exit at exit", "SystemExit(0)", "patched sys.exit", "excepthook"])
def test_other_asserts_need_the_harness_report_not_an_exit_code(name):
    tests = {"tests": {"asserts": ["assert add(1, 2) in (3, 4)"]}}
    result = code_reward(fenced(FAKES[name]), answer="", metadata=tests, options=OPTIONS)
    assert not result.correct and result.error.startswith("test 0: ")
    right = code_reward(fenced("def add(a, b):\n    return a + b"), answer="", metadata=tests, options=OPTIONS)
    assert right.correct


def test_stdin_and_assert_tests_mixed_in_one_spec():
    tests = {"tests": {"inputs": ["2 3\n"], "outputs": ["5\n"], "asserts": ["assert add(2, 3) == 5"]}}
    # The assert test's run gets empty stdin: the program reads only what is there.
    source = "import sys\ndef add(a, b):\n    return a + b\nwords = sys.stdin.read().split()\nif words:\n"
    source += "    print(add(*map(int, words)))"
    result = code_reward(fenced(source), answer="", metadata=tests, options=OPTIONS)
    assert result.correct and result.error == ""


def test_tests_the_time_budget_cannot_run_are_counted_as_timeouts():
    """timeout_s 6.7 s leaves a budget of 6.2 s (timeout_s less the pool's 0.5 s margin): room for one run costed at
    code_timeout_s 5 s plus the sandbox's 1 s start-up allowance, never two. The program sleeps 0.5 s, so however
    fast the machine, the second of SUM_TESTS' 3 tests would start past 6.2 - 6.0 s and is not run (a CI machine ran
    all three when each test took under 0.5 s of a 2.5 s budget). However slow the machine, the first run has 6 s
    (its wall limit and the start-up allowance) to finish its 0.5 s sleep, and the pool's deadline comes later."""
    program = fenced("import time\ntime.sleep(0.5)\na, b = map(int, input().split())\nprint(a + b)")
    with _pool(1, timeout_s=6.7, code_timeout_s=5.0) as pool:
        (result,) = pool.score([program], [json.dumps(SUM_TESTS)], [{}])
        assert (result.reward, result.status) == (0.0, "timeout") and "test 1: not run" in result.error
        assert pool.metrics["reward/num_timeouts"] == 1.0

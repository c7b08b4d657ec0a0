"""The sandbox against real attacks: each is attempted for real, must fail, and must leave this process unharmed.

Every attack runs three ways: under the OS boundary (bubblewrap; skipped where it cannot run, and CI installs it),
in the weak fallback with the kernel's namespaces (skipped where the kernel refuses them), and in the weak fallback
with its own layers alone (resource limits, process group, audit hook). sandbox_attacks.py holds the attacks that
only the OS boundary stops.
"""

import ast
import dataclasses
import functools
import os
import socket
import subprocess
import time

import psutil
import pytest

from guide_mega.rewards import boundary
from guide_mega.rewards.sandbox import SandboxLimits, run_program

SECRET = "guide-mega-test-secret-5b1f"
# Generous for programs that must succeed: the test machine may be heavily loaded.
RELAXED = SandboxLimits(wall_s=20.0, os_boundary=boundary.unavailable_reason() is None)


@functools.cache
def namespaces_available() -> bool:
    weak = SandboxLimits(wall_s=20.0, os_boundary=False)
    return "network_namespace" in run_program("pass", limits=weak).isolation


@pytest.fixture(params=["boundary", "namespaces", "fallback"])
def limits(request) -> SandboxLimits:
    if request.param == "boundary" and boundary.unavailable_reason() is not None:
        pytest.skip(f"no OS boundary here: {boundary.unavailable_reason()}")
    if request.param == "namespaces" and not namespaces_available():
        pytest.skip("this kernel gives no network/PID namespaces to this user")
    return SandboxLimits(
        wall_s=1.0,
        memory_mb=256,
        processes=8,
        os_boundary=request.param == "boundary",
        namespaces=request.param == "namespaces",
    )


def unhurried(limits: SandboxLimits) -> SandboxLimits:
    """The same limits with a generous wall limit, for attacks that must run to their end (on a loaded or slow
    machine, too) to show that something other than the wall limit stopped them; 1.0 s stays for the tests that are
    about the wall limit itself."""
    return dataclasses.replace(limits, wall_s=20.0)


def sandbox_processes() -> list[psutil.Process]:
    """Processes still running sandbox_child.py (killed ones may take a moment to be reaped)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if any(part.endswith("sandbox_child.py") for part in cmdline) and process.info["status"] != "zombie":
            found.append(process)
    return found


def assert_parent_unharmed() -> None:
    """Nothing of the run is left, and this process still runs programs normally."""
    deadline = time.monotonic() + 5.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []
    result = run_program("print(sum(range(10)))", limits=RELAXED)
    assert (result.status, result.stdout) == ("ok", "45\n")


@pytest.fixture
def helper_process():
    """A process outside the sandbox holding SECRET in its environment."""
    process = subprocess.Popen(["sleep", "60"], env={"GUIDE_MEGA_SECRET": SECRET})
    yield process
    process.kill()
    process.wait()


def test_runs_a_program_in_a_fresh_directory_with_a_scrubbed_environment(monkeypatch, limits):
    monkeypatch.setenv("GUIDE_MEGA_SECRET", SECRET)
    source = "import os\nprint(input()[::-1])\nprint(sorted(os.listdir('.')))\nprint(sorted(os.environ))"
    result = run_program(source, stdin="olleh\n", limits=unhurried(limits))
    assert result.status == "ok" and result.returncode == 0
    reversed_input, listing, variables = result.stdout.splitlines()
    assert (reversed_input, listing) == ("hello", "['main.py']")
    # bwrap's --chdir sets PWD (to the sandbox's own working directory).
    assert set(ast.literal_eval(variables)) - {"PWD"} == {"HOME", "LANG", "PATH", "TMPDIR"}
    assert {"rlimits", "audit_hook"} <= set(result.isolation)
    assert ("bubblewrap" in result.isolation) == limits.os_boundary


def test_exit_codes_and_exceptions():
    assert run_program("import sys; sys.exit(3)", limits=RELAXED).returncode == 3
    failed = run_program("1 / 0", limits=RELAXED)
    assert failed.status == "error" and "ZeroDivisionError" in failed.stderr
    assert run_program("def f(:\n", limits=RELAXED).status == "error"


@pytest.mark.parametrize("source", ["while True: pass", "import time\ntime.sleep(60)"], ids=["spin", "sleep"])
def test_infinite_loop_times_out(source, limits):
    start = time.monotonic()
    result = run_program(source, limits=limits)
    assert result.status == "timeout"
    assert time.monotonic() - start < limits.wall_s + 5.0
    assert_parent_unharmed()


def test_fork_bomb_is_contained(limits):
    # Far more processes than the limit allows, each of which would outlive the run by a minute.
    source = (
        "import os, time\n"
        "for _ in range(200):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "print('FORKED ALL')\n"
    )
    result = run_program(source, limits=limits)
    assert result.status != "ok" and "FORKED ALL" not in result.stdout
    assert_parent_unharmed()


def test_memory_bomb_fails(limits):
    result = run_program("block = bytearray(4 << 30)\nprint('ALLOCATED')", limits=unhurried(limits))
    assert result.status == "error" and "MemoryError" in result.stderr
    assert "ALLOCATED" not in result.stdout
    assert_parent_unharmed()


def test_writing_outside_the_working_directory_is_refused(limits, tmp_path):
    tmp_path.chmod(0o777)
    targets = [tmp_path / name for name in ("open", "os_open", "pathlib")]
    source = (
        "import os, pathlib\n"
        f"targets = {[str(target) for target in targets]!r}\n"
        "attempts = [\n"
        "    lambda: open(targets[0], 'w').write('x'),\n"
        "    lambda: os.open(targets[1], os.O_WRONLY | os.O_CREAT),\n"
        "    lambda: pathlib.Path(targets[2]).write_text('x'),\n"
        "]\n"
        "for attempt in attempts:\n"
        "    try:\n"
        "        attempt()\n"
        "        print('WROTE')\n"
        "    except OSError as exc:\n"
        "        print('refused', type(exc).__name__)\n"
    )
    result = run_program(source, limits=unhurried(limits))
    assert result.status == "ok" and "WROTE" not in result.stdout
    assert not any(target.exists() for target in targets)
    assert_parent_unharmed()


def test_network_connection_is_refused(limits):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        source = (
            "import socket\n"
            f"connection = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
            "connection.sendall(b'leak')\n"
            "print('CONNECTED')\n"
        )
        result = run_program(source, limits=unhurried(limits))
        assert result.status == "error" and "CONNECTED" not in result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()
    assert_parent_unharmed()


def test_parent_environment_is_unreadable(limits, helper_process, monkeypatch):
    monkeypatch.setenv("GUIDE_MEGA_SECRET", SECRET)
    source = (
        "import os\n"
        "print(os.environ.get('GUIDE_MEGA_SECRET'))\n"
        f"for pid in [{helper_process.pid}, {os.getpid()}, os.getppid()] + os.listdir('/proc'):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except (OSError, ValueError):\n"
        "        pass\n"
    )
    result = run_program(source, limits=unhurried(limits))
    # The program ran to its end (a timeout would also print no secret) and saw no such variable.
    assert result.status == "ok" and result.stdout.splitlines()[0] == "None"
    assert SECRET not in result.stdout
    assert_parent_unharmed()


def test_other_processes_cannot_be_killed(limits, helper_process):
    result = run_program(f"import os, signal\nos.kill({helper_process.pid}, signal.SIGKILL)", limits=unhurried(limits))
    assert result.status == "error"
    assert helper_process.poll() is None
    assert_parent_unharmed()


def test_huge_output_is_cut_off(limits):
    result = run_program("import sys\nsys.stdout.write('x' * (100 << 20))\nprint('DONE')", limits=unhurried(limits))
    assert result.status == "output_limit"
    assert len(result.stdout) == limits.output_bytes and "DONE" not in result.stdout
    assert_parent_unharmed()

"""Run an untrusted Python program in a separate, limited process and collect what it printed.

`run_program(source, stdin=..., limits=...)` writes the program into a fresh temporary directory and starts
`sandbox_child.py` there with an isolated interpreter (`python -I -S`: no site-packages, no PYTHON* variables), a
scrubbed environment, stdin from a file, and a new session. The child sets resource limits, enters network and
PID namespaces where the kernel allows, drops privileges and installs an audit hook before it runs the program
(see its docstring and docs/rewards.md for what each layer guarantees). This side enforces the wall clock and the
output cap: stdout and stderr are read incrementally, and when the program runs past its time, writes more than
the cap, or exits, the whole process group is killed with SIGKILL.

It is a sandbox for scoring, not a container: it keeps model-written programs from taking down or reading the
trainer by accident or by crude attack. Run rewards on machines that hold nothing more secret than the trainer.
"""

from __future__ import annotations

import functools
import json
import math
import os
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guide_mega.rewards.sandbox_child import PROGRAM_FILE

SandboxStatus = Literal["ok", "error", "timeout", "output_limit"]

_CHILD_SCRIPT = str(Path(__file__).with_name("sandbox_child.py"))
# -I: no user site, no PYTHON* variables, no script directory on sys.path; -S: no site-packages;
# -B: no .pyc writes (the audit hook would refuse them); -X utf8: UTF-8 stdio whatever the locale.
_INTERPRETER_FLAGS = ("-I", "-S", "-B", "-X", "utf8")
_NOBODY_UID = 65534
_READ_CHUNK_BYTES = 1 << 16
# How often the reader checks whether the program's main process has exited (it may close stdout and live on).
_POLL_S = 0.05
# Interpreter start and sandbox setup, not charged to the program's wall-clock limit.
STARTUP_ALLOWANCE_S = 0.5
# Killed by the CPU-time limit: SIGXCPU at the soft limit, SIGKILL at the hard one (PID 1 ignores SIGXCPU).
_CPU_LIMIT_RETURNCODES = (-signal.SIGXCPU, -signal.SIGKILL)


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    wall_s: float = 2.0
    """Wall-clock limit of one run; the CPU-time limit is the same, rounded up to whole seconds."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS); an allocation beyond it fails with MemoryError."""
    output_bytes: int = 4 << 20
    """Most bytes kept of stdout and of stderr; a program that writes more is killed (status output_limit)."""
    file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE)."""
    processes: int = 8
    """Processes the program may start (forks of its main process; beyond what its user already runs)."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    namespaces: bool = True
    """Use network and PID namespaces where the kernel allows; False leaves the fallback layers alone."""


@dataclass(frozen=True, kw_only=True)
class SandboxResult:
    status: SandboxStatus
    """ok (exit 0), error (non-zero exit), timeout (wall clock or CPU time) or output_limit."""
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple[str, ...]
    """Layers the run obtained, e.g. rlimits, network_namespace, pid_namespace, no_capabilities, audit_hook."""


@functools.cache
def unprivileged_uid() -> int | None:
    """The uid programs run as when this process is root: nobody, provided nobody can read the standard library
    (the program imports from it after the switch). None otherwise: non-root users keep their own uid."""
    if os.geteuid() != 0:
        return None
    stdlib = Path(os.__file__).resolve().parent
    modes = [directory.stat().st_mode for directory in (stdlib, *stdlib.parents)]
    if all(mode & stat.S_IXOTH for mode in modes) and modes[0] & stat.S_IROTH:
        return _NOBODY_UID
    return None


def _child_config(limits: SandboxLimits, *, report_fd: int) -> dict:
    return {
        "parent_pid": os.getpid(),
        "report_fd": report_fd,
        "wall_s": limits.wall_s,
        "cpu_s": max(1, math.ceil(limits.wall_s)),
        "memory_bytes": limits.memory_mb << 20,
        "file_bytes": limits.file_mb << 20,
        "open_files": limits.open_files,
        "processes": limits.processes,
        "namespaces": limits.namespaces,
        "unprivileged_uid": unprivileged_uid(),
    }


def _scrubbed_environment(workdir: str) -> dict[str, str]:
    """Nothing of the trainer's environment (tokens, credentials, paths) reaches the program."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir}


def _has_exited(pid: int) -> bool:
    """Whether the process has exited, without reaping it (so its process-group id stays reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _collect_output(
    process: subprocess.Popen, outputs: dict[int, bytearray], *, deadline: float, max_bytes: int
) -> SandboxStatus | None:
    """Read stdout and stderr into `outputs` until both close and the main process has exited; kills the process
    group when the main process exits. Returns timeout or output_limit when the run must be stopped early."""
    main_running = True
    with selectors.DefaultSelector() as selector:
        for fd in outputs:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() or main_running:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if not selector.get_map():
                time.sleep(min(remaining, _POLL_S))
            for key, _ in selector.select(min(remaining, _POLL_S)) if selector.get_map() else ():
                chunk = os.read(key.fd, _READ_CHUNK_BYTES)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = outputs[key.fd]
                if len(buffer) + len(chunk) > max_bytes:
                    buffer += chunk[: max_bytes - len(buffer)]
                    return "output_limit"
                buffer += chunk
            if main_running and _has_exited(process.pid):
                main_running = False
                _kill_group(process.pid)  # what it left behind in its session goes too
    return None


def _read_report(fd: int) -> tuple[str, ...]:
    """The isolation layers the child reported at setup (none if it died before it could)."""
    os.set_blocking(fd, False)
    try:
        return tuple(json.loads(os.read(fd, _READ_CHUNK_BYTES).splitlines()[0]))
    except (BlockingIOError, IndexError, ValueError):
        return ()


def _status(stopped: SandboxStatus | None, returncode: int) -> SandboxStatus:
    if stopped is not None:
        return stopped
    if returncode in _CPU_LIMIT_RETURNCODES:
        return "timeout"
    return "ok" if returncode == 0 else "error"


def run_program(
    source: str, *, stdin: str = "", limits: SandboxLimits | None = None, scratch_dir: str | None = None
) -> SandboxResult:
    """Run `source` as `__main__` of a sandboxed Python interpreter with `stdin` as its input, in a new directory
    under `scratch_dir` (default: the system's temp dir) that is removed afterwards."""
    limits = limits or SandboxLimits()
    start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="run-", dir=scratch_dir, ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as stdin_file,
    ):
        Path(workdir, PROGRAM_FILE).write_text(source, encoding="utf-8")
        uid = unprivileged_uid()
        if uid is not None:
            os.chown(workdir, uid, uid)
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        report_read, report_write = os.pipe()
        config = _child_config(limits, report_fd=report_write)
        try:
            process = subprocess.Popen(
                [sys.executable, *_INTERPRETER_FLAGS, _CHILD_SCRIPT, json.dumps(config)],
                cwd=workdir,
                env=_scrubbed_environment(workdir),
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(report_write,),
                start_new_session=True,
            )
        finally:
            os.close(report_write)
        outputs = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
        with process.stdout, process.stderr:
            deadline = start + STARTUP_ALLOWANCE_S + limits.wall_s
            stopped = _collect_output(process, outputs, deadline=deadline, max_bytes=limits.output_bytes)
            _kill_group(process.pid)  # the main process is not reaped yet, so its group id is still its own
            returncode = process.wait()
        isolation = _read_report(report_read)
        os.close(report_read)
    stdout, stderr = (bytes(buffer).decode("utf-8", errors="replace") for buffer in outputs.values())
    return SandboxResult(
        status=_status(stopped, returncode),
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        wall_s=time.monotonic() - start,
        isolation=isolation,
    )

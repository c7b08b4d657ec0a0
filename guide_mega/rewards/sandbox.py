"""Run an untrusted Python program in a separate, limited process and collect what it printed.

`run_program(source, stdin=..., limits=...)` starts the harness `sandbox_child.py` with an isolated interpreter
(`python -I -S`: no site-packages, no PYTHON* variables), a scrubbed environment, stdin from an unlinked file, in a
new session, in one of two ways:

- under the OS boundary (`boundary.py`): bubblewrap, with the program and the harness copied into a fresh
  namespace that holds nothing else of the host. This is the default, and code rewards require it.
- the weak fallback (`SandboxLimits(os_boundary=False)`, opted into with `reward.allow_weak_sandbox`): the program
  in a fresh directory on the host, the harness entering namespaces itself where the kernel allows them.

Either way the harness sets resource limits and installs an audit hook (a second layer only) before it runs the
program, and reports on a pipe the layers it obtained and, for a test, whether the test's code ran to its end and
the value of its expression. This side enforces the wall clock and the output cap: stdout, stderr and the report
are read incrementally, and when the program runs past its time, writes more than the cap, or exits, the run is
killed with SIGKILL.
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

from guide_mega.rewards import boundary
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
# Sandbox setup (bwrap's mounts) and interpreter start, not charged to the program's wall-clock limit.
STARTUP_ALLOWANCE_S = 1.0
# Killed by the CPU-time limit: SIGXCPU at the soft limit, SIGKILL at the hard one (PID 1 ignores SIGXCPU); bwrap
# reports its program's death by a signal as the exit code 128 + the signal.
_CPU_LIMIT_SIGNALS = (signal.SIGXCPU, signal.SIGKILL)
_CPU_LIMIT_RETURNCODES = (*(-signum for signum in _CPU_LIMIT_SIGNALS), *(128 + signum for signum in _CPU_LIMIT_SIGNALS))


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    wall_s: float = 2.0
    """Wall-clock limit of one run; the CPU-time limit is the same, rounded up to whole seconds."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS); an allocation beyond it fails with MemoryError."""
    output_bytes: int = 4 << 20
    """Most bytes kept of stdout, of stderr and of the harness's report (which carries a test's value); a run that
    writes more is killed (status output_limit)."""
    file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE)."""
    processes: int = 8
    """Processes and threads the program may start: a pids cgroup per run (threads count) under the OS boundary
    where one can be made, else RLIMIT_NPROC beyond what the user already runs; the audit hook caps forks too."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    disk_mb: int = 64
    """Size of the working directory (a tmpfs) under the OS boundary: all the files the program writes together."""
    os_boundary: bool = True
    """Run under bubblewrap (refused with SandboxUnavailableError where it cannot run); False: the weak fallback."""
    namespaces: bool = True
    """Weak fallback only: use network and PID namespaces where the kernel allows; False: limits and hook alone."""


@dataclass(frozen=True, kw_only=True)
class SandboxResult:
    status: SandboxStatus
    """ok (exit 0), error (non-zero exit), timeout (wall clock or CPU time) or output_limit."""
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple[str, ...]
    """Layers the run obtained, e.g. bubblewrap, pids_cgroup, rlimits, pid_namespace, audit_hook."""
    finished: bool = False
    """The harness reported that the program and the test's statements ran to their end."""
    value: str | None = None
    """The test expression's value as the harness reported it (a Python literal), or None."""


class SandboxUnavailableError(ValueError):
    """Code rewards need the OS boundary, and this machine cannot give one (and the weak fallback was not allowed)."""


def require_boundary(*, allow_weak: bool) -> bool:
    """Whether runs get the OS boundary: True when bubblewrap works here, False when it does not and `allow_weak`.

    Raises SandboxUnavailableError when it does not and the weak fallback is not allowed.
    """
    reason = boundary.unavailable_reason()
    if reason is None:
        return True
    if allow_weak:
        return False
    raise SandboxUnavailableError(
        f"reward.name=code: no OS sandbox on this machine ({reason}); install bubblewrap (Debian/Ubuntu: apt-get "
        "install bubblewrap) or set reward.allow_weak_sandbox=true to run programs behind process limits and a "
        "Python audit hook only"
    )


@functools.cache
def unprivileged_uid() -> int | None:
    """Weak fallback only: the uid programs run as when this process is root: nobody, provided nobody can read the
    standard library (the program imports from it after the switch). None otherwise: others keep their own uid."""
    if os.geteuid() != 0:
        return None
    stdlib = Path(os.__file__).resolve().parent
    modes = [directory.stat().st_mode for directory in (stdlib, *stdlib.parents)]
    if all(mode & stat.S_IXOTH for mode in modes) and modes[0] & stat.S_IROTH:
        return _NOBODY_UID
    return None


def _child_config(limits: SandboxLimits, *, report_fd: int, statements: str, expression: str | None) -> dict:
    return {
        "parent_pid": os.getpid(),
        "report_fd": report_fd,
        "os_boundary": limits.os_boundary,
        "wall_s": limits.wall_s,
        "cpu_s": max(1, math.ceil(limits.wall_s)),
        "memory_bytes": limits.memory_mb << 20,
        "file_bytes": limits.file_mb << 20,
        "open_files": limits.open_files,
        "processes": limits.processes,
        "namespaces": limits.namespaces and not limits.os_boundary,
        "unprivileged_uid": None if limits.os_boundary else unprivileged_uid(),
        "statements": statements,
        "expression": expression,
    }


def _scrubbed_environment(home: str) -> dict[str, str]:
    """Nothing of the trainer's environment (tokens, credentials, paths) reaches the program."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


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
    """Read the pipes in `outputs` until all close and the main process has exited; kills the process group when
    the main process exits. Returns timeout or output_limit when the run must be stopped early."""
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


def _parse_report(report: bytes) -> tuple[tuple[str, ...], dict]:
    """The layers the harness reported at setup, and its last end-of-test record ({} if none came)."""
    layers: tuple[str, ...] = ()
    record: dict = {}
    for line in report.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, list) and not layers:
            layers = tuple(str(layer) for layer in entry)
        elif isinstance(entry, dict):
            record = entry
    return layers, record


def _status(stopped: SandboxStatus | None, returncode: int) -> SandboxStatus:
    if stopped is not None:
        return stopped
    if returncode in _CPU_LIMIT_RETURNCODES:
        return "timeout"
    return "ok" if returncode == 0 else "error"


def remove_tree(path: str) -> None:
    """Remove a directory tree however deep, never following links: rm walks it by file descriptor, while
    shutil.rmtree recurses, and a program's 6,000-deep tree exhausts Python's stack and PATH_MAX."""
    subprocess.run(["/bin/rm", "-rf", "--one-file-system", "--", path], capture_output=True, check=False)


def _supervise(process: subprocess.Popen, report_read: int, *, limits: SandboxLimits, start: float) -> SandboxResult:
    """Collect the run's output and report under the deadline, then kill whatever is left of it."""
    stdout, stderr, report = bytearray(), bytearray(), bytearray()
    outputs = {process.stdout.fileno(): stdout, process.stderr.fileno(): stderr, report_read: report}
    with process.stdout, process.stderr:
        deadline = start + STARTUP_ALLOWANCE_S + limits.wall_s
        stopped = _collect_output(process, outputs, deadline=deadline, max_bytes=limits.output_bytes)
        _kill_group(process.pid)  # the main process is not reaped yet, so its group id is still its own
        returncode = process.wait()
    layers, record = _parse_report(bytes(report))
    if limits.os_boundary:
        layers = ("bubblewrap", *layers)
    return SandboxResult(
        status=_status(stopped, returncode),
        returncode=returncode,
        stdout=bytes(stdout).decode("utf-8", errors="replace"),
        stderr=bytes(stderr).decode("utf-8", errors="replace"),
        wall_s=time.monotonic() - start,
        isolation=layers,
        finished=record.get("finished") is True,
        value=record["value"] if isinstance(record.get("value"), str) else None,
    )


def _run_under_boundary(
    source: str, config: dict, *, stdin_file, report_fds: tuple[int, int], limits: SandboxLimits, start: float
) -> SandboxResult:
    """The program and the harness copied into a fresh bubblewrap sandbox; nothing of the run stays on the host."""
    report_read, report_write = report_fds
    cgroup_parent = boundary.pids_cgroup_parent()
    cgroup = boundary.PidsCgroup(cgroup_parent, processes=limits.processes) if cgroup_parent else None
    if cgroup is not None:
        config = {**config, "pids_cgroup": True}
    with tempfile.TemporaryFile() as program_file, open(_CHILD_SCRIPT, "rb") as harness_file:
        program_file.write(source.encode())
        program_file.seek(0)
        command = boundary.bwrap_command(
            program_fd=program_file.fileno(),
            harness_fd=harness_file.fileno(),
            disk_bytes=limits.disk_mb << 20,
            environment=_scrubbed_environment(boundary.WORKDIR),
            child_args=[*_INTERPRETER_FLAGS, boundary.HARNESS_PATH, json.dumps(config)],
        )
        try:
            process = subprocess.Popen(
                [*(cgroup.launcher() if cgroup else ()), *command],
                # bwrap stays in the namespace as its PID 1, whose /proc/1/environ the program can read.
                env=_scrubbed_environment(boundary.WORKDIR),
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(report_write, program_file.fileno(), harness_file.fileno()),
                start_new_session=True,
            )
        finally:
            os.close(report_write)
    try:
        return _supervise(process, report_read, limits=limits, start=start)
    finally:
        if cgroup is not None:
            cgroup.remove()


def _run_weak(
    source: str,
    config: dict,
    *,
    stdin_file,
    report_fds: tuple[int, int],
    limits: SandboxLimits,
    start: float,
    scratch_dir: str | None,
) -> SandboxResult:
    """The weak fallback: the program in a fresh directory on the host, the harness confining itself."""
    report_read, report_write = report_fds
    workdir = tempfile.mkdtemp(prefix="run-", dir=scratch_dir)
    try:
        Path(workdir, PROGRAM_FILE).write_text(source, encoding="utf-8")
        if config["unprivileged_uid"] is not None:
            os.chown(workdir, config["unprivileged_uid"], config["unprivileged_uid"])
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
        return _supervise(process, report_read, limits=limits, start=start)
    finally:
        remove_tree(workdir)


def run_program(
    source: str,
    *,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    scratch_dir: str | None = None,
    statements: str = "",
    expression: str | None = None,
) -> SandboxResult:
    """Run `source` as `__main__` of a sandboxed Python interpreter with `stdin` as its input; then, in its
    namespace, the test's `statements` and `expression`, whose value comes back as `SandboxResult.value`.

    `scratch_dir` (default: the system's temp dir) holds the weak fallback's run directories.
    """
    limits = limits or SandboxLimits()
    if limits.os_boundary:
        require_boundary(allow_weak=False)
    start = time.monotonic()
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        report_fds = os.pipe()
        config = _child_config(limits, report_fd=report_fds[1], statements=statements, expression=expression)
        try:
            if limits.os_boundary:
                return _run_under_boundary(
                    source, config, stdin_file=stdin_file, report_fds=report_fds, limits=limits, start=start
                )
            return _run_weak(
                source,
                config,
                stdin_file=stdin_file,
                report_fds=report_fds,
                limits=limits,
                start=start,
                scratch_dir=scratch_dir,
            )
        finally:
            os.close(report_fds[0])

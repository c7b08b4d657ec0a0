"""The code sandbox's OS boundary: each program runs under bubblewrap (`bwrap`), in namespaces of its own.

What a run sees: the interpreter, its standard library (site-packages hidden) and the shared libraries they link,
all read-only; the harness file, read-only; a size-capped tmpfs as its working directory and another as /dev/shm;
its own /proc (only its own processes) and a minimal /dev. Nothing else of the host: no home, data, project tree,
host /tmp or /dev/shm, no network (a fresh network namespace), no other processes (a PID namespace), no new
privileges, no capabilities, uid 65534, no further user namespaces. `/` itself is read-only.

Limits that bind root too: the tmpfs sizes are mount options; address space, CPU time, file size and open files
are rlimits the harness sets inside, which a process without CAP_SYS_RESOURCE in the host's namespace cannot raise;
the process count is a pids cgroup where this machine lets us create one (the kernel exempts uid 0 from
RLIMIT_NPROC, and the sandbox's uid maps to the caller's), else RLIMIT_NPROC, which binds only callers other than
root. At the deadline the parent kills bwrap; its PID namespace's init dies with it (`--die-with-parent`), and the
kernel then kills everything left in the namespace.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HARNESS_PATH = "/sandbox/sandbox_child.py"
WORKDIR = "/work"
SANDBOX_UID = 65534
# /dev/shm is only for multiprocessing's semaphores and small shared buffers.
_SHM_BYTES = 8 << 20
# Tasks of a run before the program starts any: bwrap outside, bwrap as the namespace's PID 1, the interpreter.
_BASE_TASKS = 3
_PROBE_TIMEOUT_S = 20.0
_CGROUP_REMOVE_TIMEOUT_S = 2.0
_run_counter = itertools.count()


@functools.cache
def _bwrap() -> str | None:
    return shutil.which("bwrap")


def interpreter() -> str:
    """The real interpreter binary this process runs (a virtual environment's python resolves to its base)."""
    return os.path.realpath(sys.executable)


def _stdlib() -> Path:
    return Path(os.__file__).resolve().parent


@functools.cache
def _shared_libraries() -> tuple[str, ...]:
    """Every shared library the interpreter and its standard-library extension modules load (from ldd)."""
    extensions = sorted(str(path) for path in (_stdlib() / "lib-dynload").glob("*.so"))
    listing = subprocess.run(["ldd", interpreter(), *extensions], capture_output=True, text=True, check=False).stdout
    libraries = set()
    for line in listing.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        path = line.split("=>")[-1].strip().split(" (")[0]
        if path.startswith("/") and not path.endswith(":") and os.path.exists(path):
            libraries.add(path)
    return tuple(sorted(libraries))


@functools.cache
def interpreter_mounts() -> tuple[str, ...]:
    """bwrap arguments binding the interpreter, its standard library and its libraries read-only."""
    stdlib = _stdlib()
    args = ["--ro-bind", interpreter(), interpreter(), "--ro-bind", str(stdlib), str(stdlib)]
    if (stdlib / "site-packages").is_dir():
        args += ["--tmpfs", str(stdlib / "site-packages"), "--remount-ro", str(stdlib / "site-packages")]
    for library in _shared_libraries():
        args += ["--ro-bind", library, library]
    return tuple(args)


def bwrap_command(
    *, program_fd: int, harness_fd: int, disk_bytes: int, environment: dict[str, str], child_args: list[str]
) -> list[str]:
    """The bwrap command line of one run: `program_fd` becomes /work/main.py, `harness_fd` the harness file."""
    command = [_bwrap(), "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--disable-userns"]
    command += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL"]
    command += [*interpreter_mounts(), "--proc", "/proc", "--dev", "/dev"]
    command += ["--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm", "--size", str(disk_bytes), "--tmpfs", WORKDIR]
    command += ["--ro-bind-data", str(harness_fd), HARNESS_PATH, "--file", str(program_fd), f"{WORKDIR}/main.py"]
    command += ["--remount-ro", "/", "--chdir", WORKDIR, "--clearenv"]
    for name, value in environment.items():
        command += ["--setenv", name, value]
    return [*command, interpreter(), *child_args]


@functools.cache
def unavailable_reason() -> str | None:
    """Why bubblewrap cannot sandbox programs on this machine, or None when it can (tried once, with a real run)."""
    if _bwrap() is None:
        return "bubblewrap (bwrap) is not installed"
    command = [_bwrap(), "--unshare-all", "--die-with-parent", "--uid", str(SANDBOX_UID), "--cap-drop", "ALL"]
    command += [*interpreter_mounts(), "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/"]
    command += [interpreter(), "-I", "-S", "-c", "import os; print(os.getuid())"]
    try:
        probe = subprocess.run(command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap failed to start: {exc}"
    if probe.stdout.strip() != str(SANDBOX_UID):
        return f"bwrap failed: {probe.stderr.strip()[-300:] or f'exit code {probe.returncode}'}"
    return None


def _pids_hierarchy() -> Path | None:
    """Our own cgroup in a hierarchy with the pids controller (v1 `pids`, or v2 with pids for its children)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids", path.lstrip("/"))
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, _, path = line.split(":", 2)
        own = Path("/sys/fs/cgroup", path.lstrip("/"))
        control = own / "cgroup.subtree_control"
        if hierarchy == "0" and control.exists() and "pids" in control.read_text().split():
            return own
    return None


@functools.cache
def pids_cgroup_parent() -> Path | None:
    """Where per-run pids cgroups can be made (tried once), or None: then only RLIMIT_NPROC limits processes."""
    parent = _pids_hierarchy()
    if parent is None:
        return None
    probe = parent / f"guide-mega-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return None
    return parent


class PidsCgroup:
    """A pids cgroup for one run, with at most `processes` tasks (threads count) besides the sandbox's own."""

    def __init__(self, parent: Path, *, processes: int) -> None:
        self.path = parent / f"guide-mega-sandbox-{os.getpid()}-{next(_run_counter)}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(processes + _BASE_TASKS))

    def launcher(self) -> list[str]:
        """A prefix for the command line: the shell enters the cgroup, then execs the command (so it starts in it)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path)]

    def remove(self) -> None:
        """Kill what is left in the cgroup (cgroup v2) and remove it once it is empty."""
        if (self.path / "cgroup.kill").exists():
            (self.path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + _CGROUP_REMOVE_TIMEOUT_S
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def remove_orphan_cgroups() -> int:
    """Remove the empty run cgroups whose creator died mid-run (a killed reward worker); returns how many."""
    parent = pids_cgroup_parent()
    removed = 0
    for path in parent.glob("guide-mega-sandbox-*") if parent is not None else ():
        creator = int(path.name.split("-")[3])
        if not Path(f"/proc/{creator}").exists():
            try:
                path.rmdir()
                removed += 1
            except OSError:
                continue  # still holds processes that are dying; the next pool to close removes it
    return removed


def describe() -> str:
    """One line for `guide-mega doctor`: the boundary code rewards get on this machine."""
    reason = unavailable_reason()
    if reason is not None:
        return f"none: {reason}; code rewards refuse to run unless reward.allow_weak_sandbox=true"
    version = subprocess.run([_bwrap(), "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if pids_cgroup_parent() is not None:
        processes = "pids cgroup"
    elif os.geteuid() != 0:
        processes = "RLIMIT_NPROC"
    else:
        processes = "not bounded by the kernel (root, no pids cgroup): rlimits on memory and CPU only"
    return (
        f"{version}: user, mount, PID, network, IPC and UTS namespaces; uid {SANDBOX_UID}; read-only interpreter "
        f"and standard library only; size-capped tmpfs; processes: {processes}"
    )

"""The sandbox's harness: limits and an audit hook around one untrusted Python program, then the test's code.

`sandbox.run_program` starts this file as a script (`python -I -S -X utf8 sandbox_child.py CONFIG`) in a new
session, a fresh working directory holding the program as `main.py`, and a scrubbed environment. It imports only
the standard library. Under the OS boundary (bubblewrap, `boundary.py`) the namespaces, the unprivileged uid and
the dropped capabilities are already in place, and steps 2 and 3 are skipped; in the weak fallback this file does
them itself. In order:

1. Resource limits: CPU seconds, address space, file size, open files, no core files, and a process count of what
   the user already runs plus a small allowance (RLIMIT_NPROC counts every process of the user).
2. Linux namespaces where the kernel allows them: a network namespace (no interface but a loopback that is down)
   and a PID namespace in which the program runs as PID 1, so that when it ends the kernel kills everything it
   started. Root gets them directly; another user through a user namespace.
3. When root and the standard library is world-readable, the program runs as an unprivileged user; otherwise it
   keeps its uid and drops every capability (so root cannot raise its own limits).
4. An audit hook (PEP 578) refuses, inside the program's interpreter: writes outside the working directory,
   reads outside it and the standard library, other processes' /proc entries, running other programs, ctypes,
   signals to other processes, more than the allowed number of forks, heap introspection (gc), and networking
   (all of it without a network namespace; Unix sockets outside the working directory with one). This layer is
   Python-level defence in depth, not a boundary: a program written to defeat it (patching the modules it
   relies on, walking frames, resolving a relative path against another directory's descriptor) can.

The setup reports the layers it obtained as one JSON line on the report pipe, then runs `main.py` as `__main__`,
then the test's statements and expression in the program's namespace, and reports one JSON line more:
{"finished": true, "value": LITERAL}. The value is written as a Python literal only when it is plain data
(`plain_literal`); the parent compares it with the expected value itself, so an object that claims to equal
everything never reaches the comparison.
"""

import json
import os
import resource
import signal
import sys

PROGRAM_FILE = "main.py"
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# The kernel sends SIGXCPU at the soft CPU limit and SIGKILL this many seconds later (a handler cannot linger).
_CPU_HARD_MARGIN_S = 1
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_READABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/stdin")
# Audit events that take a path to change (argument positions), and events refused outright.
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.setxattr": (0,), "os.removexattr": (0,),
}  # fmt: skip
_REFUSED_EVENTS = (
    "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.kill", "os.killpg",
    "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "sqlite3.connect",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
)  # fmt: skip
_REFUSED_PREFIXES = ("ctypes.",)
# Extension modules that reach files, processes or memory without passing through audited calls.
_REFUSED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_sqlite3", "_dbm", "_gdbm"})
_SCALAR_TYPES = (int, float, complex, str, bytes, bool, type(None))
# Deeper values are refused: the parent's literal parser has a nesting limit of its own.
_MAX_LITERAL_DEPTH = 50


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _count_processes(uid: int) -> int:
    """Processes of `uid` on the machine (what RLIMIT_NPROC compares against)."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += os.stat(f"/proc/{name}").st_uid == uid
            except FileNotFoundError:
                continue
    return count


def set_limits(config: dict) -> None:
    """Resource limits of this process and everything it starts."""
    cpu_s = config["cpu_s"]
    limits = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_CPU: (cpu_s, cpu_s + _CPU_HARD_MARGIN_S),
        resource.RLIMIT_AS: config["memory_bytes"],
        resource.RLIMIT_FSIZE: config["file_bytes"],
        resource.RLIMIT_NOFILE: config["open_files"],
    }
    uid = config["unprivileged_uid"] if config["unprivileged_uid"] is not None else os.getuid()
    limits[resource.RLIMIT_NPROC] = _count_processes(uid) + config["processes"]
    for kind, value in limits.items():
        soft, hard = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(kind, (soft, hard))


def _write(path: str, text: str) -> None:
    with open(path, "w") as stream:
        stream.write(text)


def enter_namespaces(libc) -> list[str]:
    """New network and PID namespaces, directly (root) or through a user namespace; the layers obtained."""
    flags = _CLONE_NEWNET | _CLONE_NEWPID
    if os.geteuid() == 0 and libc.unshare(flags) == 0:
        return ["network_namespace", "pid_namespace"]
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags | _CLONE_NEWUSER) != 0:
        return []
    # Map our own ids onto themselves, so that files and permissions look the same inside.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    return ["user_namespace", "network_namespace", "pid_namespace"]


def run_as_pid_namespace_parent(child_pid: int, wall_s: float) -> None:
    """Wait for PID 1 of the new namespace and leave the way it left (the same exit code or signal)."""
    # A backstop: SIGALRM ends this process, and PID 1 with it (its parent-death signal), should the reward
    # worker be unable to kill the session itself.
    signal.alarm(int(wall_s) + 2)
    _, status = os.waitpid(child_pid, 0)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(os.waitstatus_to_exitcode(status))


def drop_privileges(libc, unprivileged_uid: int | None) -> list[str]:
    """Switch to the unprivileged uid (root only), then drop every capability and forbid gaining any."""
    import ctypes

    layers = []
    if unprivileged_uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(unprivileged_uid, unprivileged_uid, unprivileged_uid)
        os.setresuid(unprivileged_uid, unprivileged_uid, unprivileged_uid)
        layers.append("unprivileged_user")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    empty = (ctypes.c_uint32 * 6)()
    if libc.capset(header, empty) == 0:
        layers.append("no_capabilities")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return layers


def _resolve(path) -> str:
    return os.path.realpath(os.fsdecode(path))


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class AuditPolicy:
    """What the program may do; `__call__` is the audit hook and raises PermissionError to refuse an event.

    With `check_paths` False (under the OS boundary, whose mounts already confine files) paths are left to the
    kernel: resolving every path costs a system call per component, quadratic for a program working deep down.
    """

    def __init__(
        self, *, workdir: str, stdlib: str, max_forks: int, network_namespace: bool, check_paths: bool
    ) -> None:
        self.workdir, self.stdlib, self.check_paths = workdir, stdlib, check_paths
        self.max_forks, self.network_namespace = max_forks, network_namespace
        self.main_pid, self.forks = os.getpid(), 0

    def _refuse(self, event: str, detail: object = "") -> None:
        raise PermissionError(f"sandbox: {event} {detail!r} is not allowed")

    def _check_write(self, event: str, path) -> None:
        if not isinstance(path, int) and not _is_under(_resolve(path), self.workdir):
            self._refuse(event, path)

    def _check_open(self, path, mode, flags) -> None:
        if isinstance(path, int):
            return
        if os.fsdecode(path) in _READABLE_DEVICES:
            return
        resolved = _resolve(path)
        if _is_under(resolved, self.workdir):
            return
        writing = any(char in mode for char in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        # A directory outside could serve as dir_fd for relative writes; other processes' /proc entries hold
        # their environment and memory.
        if writing or os.path.isdir(resolved) or not _is_under(resolved, self.stdlib):
            self._refuse("open", path)

    def _check_socket(self, event: str, args: tuple) -> None:
        if not self.network_namespace:
            self._refuse(event)
        address = args[1] if len(args) > 1 else None
        if isinstance(address, str | bytes) and address[:1] not in ("\0", b"\0"):
            self._check_write(event, address)  # a Unix socket path reaches outside the network namespace

    def _check_fork(self, event: str) -> None:
        # Only the program's own process may fork, and only max_forks times: a fork bomb stays linear.
        if os.getpid() != self.main_pid or self.forks >= self.max_forks:
            self._refuse(event, self.forks)
        self.forks += 1

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":
            if self.check_paths:
                self._check_open(*args[:3])
        elif event in _PATH_EVENTS:
            for index in _PATH_EVENTS[event] if self.check_paths else ():
                self._check_write(event, args[index])
        elif event.startswith("socket."):
            self._check_socket(event, args)
        elif event in ("os.fork", "os.forkpty"):
            self._check_fork(event)
        elif event == "import" and args[0] in _REFUSED_MODULES:
            self._refuse(event, args[0])
        elif event in _REFUSED_EVENTS or event.startswith(_REFUSED_PREFIXES):
            self._refuse(event)


def _remove_session_calls() -> None:
    """Without a PID namespace only the process group is killed at the end, so a program must not leave it."""
    import posix

    for module in (os, posix):
        for name in ("setsid", "setpgid", "setpgrp"):
            if hasattr(module, name):
                delattr(module, name)


def plain_literal(value, depth: int = 0) -> str:
    """`value` as a Python literal, when it is built only of the exact built-in scalar and container types (a
    subclass could redefine equality); TypeError otherwise."""
    kind = type(value)
    if depth > _MAX_LITERAL_DEPTH:
        raise TypeError("the value is nested too deeply to compare")
    if kind in _SCALAR_TYPES:
        return kind.__repr__(value)
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        items = [plain_literal(item, depth + 1) for item in value]
        if kind is list:
            return "[" + ", ".join(items) + "]"
        if kind is tuple:
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "{" + ", ".join(items) + "}" if items else "set()"
    if kind is dict:
        pairs = [f"{plain_literal(key, depth + 1)}: {plain_literal(item, depth + 1)}" for key, item in value.items()]
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"the value is a {kind.__name__}, not plain data (numbers, strings, bytes, None, and lists, "
                    "tuples, sets and dicts of them)")  # fmt: skip


def run_program(config: dict) -> None:
    """Execute main.py as a fresh __main__ module (this script's globals stay out of sys.modules), then the test's
    statements and expression in its namespace, and report that they finished and the expression's value. An
    uncaught exception prints its traceback and exits with status 1 (no atexit handler runs); an exit before the
    end reports nothing."""
    import traceback
    import types

    # Bound before the program runs, so that patching os, json or sys.exit changes nothing here.
    write, dumps, exit_now, report_fd = os.write, json.dumps, os._exit, config["report_fd"]
    # The CPU limit bounds what a huge int costs; Python's 4,300-digit default would fail correct programs.
    sys.set_int_max_str_digits(0)
    with open(PROGRAM_FILE, encoding="utf-8") as stream:
        code = compile(stream.read(), PROGRAM_FILE, "exec")
    sys.argv = [PROGRAM_FILE]
    program = types.ModuleType("__main__")
    program.__file__ = PROGRAM_FILE
    sys.modules["__main__"] = program
    try:
        exec(code, program.__dict__)
        exec(compile(config["statements"], "<test>", "exec"), program.__dict__)
        record = {"finished": True}
        if config["expression"] is not None:
            value = eval(compile(config["expression"], "<test>", "eval"), program.__dict__)
            record["value"] = plain_literal(value)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        exit_now(1)
    sys.stdout.flush()
    write(report_fd, (dumps(record) + "\n").encode())


def _confine_weakly(config: dict) -> list[str]:
    """The weak fallback's own confinement: namespaces where the kernel allows, then fewer privileges."""
    libc = _libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the sandbox dies with the worker that started it
    if os.getppid() != config["parent_pid"]:
        os._exit(1)
    set_limits(config)
    layers = ["rlimits", "session"]
    if config["namespaces"]:
        layers += enter_namespaces(libc)
    if "pid_namespace" in layers:
        child_pid = os.fork()
        if child_pid:
            run_as_pid_namespace_parent(child_pid, config["wall_s"])
    layers += drop_privileges(libc, config["unprivileged_uid"])
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # fork and setuid clear it
    if "pid_namespace" not in layers:
        _remove_session_calls()
    return layers


def main() -> None:
    config = json.loads(sys.argv[1])
    if config["os_boundary"]:
        set_limits(config)
        layers = ["pids_cgroup", "rlimits"] if config.get("pids_cgroup") else ["rlimits"]
        network_namespace = True
    else:
        layers = _confine_weakly(config)
        network_namespace = "network_namespace" in layers
    for name in [name for name in sys.modules if name.split(".")[0] in _REFUSED_MODULES]:
        del sys.modules[name]
    policy = AuditPolicy(
        workdir=os.path.realpath(os.getcwd()),
        stdlib=os.path.realpath(os.path.dirname(os.__file__)),
        max_forks=config["processes"],
        network_namespace=network_namespace,
        check_paths=not config["os_boundary"],
    )
    sys.addaudithook(policy)
    del policy  # reachable from the program's frames no more; the refused gc calls were the other way to it
    layers.append("audit_hook")
    os.write(config["report_fd"], (json.dumps(layers) + "\n").encode())
    run_program(config)


if __name__ == "__main__":
    main()

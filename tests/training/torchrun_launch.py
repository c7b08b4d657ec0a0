"""Launch tests/training/dist_worker.py under torchrun: gloo processes with one thread each, on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
_TORCHRUN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(nproc: int, *args: str, module: str | None = None) -> None:
    """Run dist_worker.py (or `python -m module`) under torchrun with nproc gloo processes (one thread each); raise
    with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    target = ["-m", module] if module else [str(HERE / "dist_worker.py")]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}", *target, *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=_TORCHRUN_TIMEOUT_S)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}"
                             f"\n{result.stderr[-8000:]}")  # fmt: skip

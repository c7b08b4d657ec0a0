"""A local SGLang server process: its own virtual environment (SGLang pins its own torch) and its lifecycle.

`build_cpu_venv` makes the environment that runs `python -m sglang.launch_server --device cpu` on a machine with
no GPU, for tests and benchmarks. SGLang's wheel depends on CUDA-only packages, so it is installed without
dependencies plus the pure-Python ones its server imports, next to a CPU torch, and three stand-ins go on
PYTHONPATH for what the CPU path imports but never needs for a text model:
`vllm._custom_ops` (a fallback kernel import), `sgl_kernel` (Intel's CPU kernel library, built from source
elsewhere; without it SGLang uses its native torch paths) and `torchvision` (imported by transformers' image
processors; the PyPI build needs CUDA torch). Measured for sglang 0.5.21 on a 2-core machine: ~2.6 GB, ~3 min.

`LocalSGLangServer` starts the server on loopback in its own process group, waits for /health, and stops the
whole group (server, scheduler and detokenizer processes) on exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

SGLANG_VERSION = "0.5.21"
# The torch this SGLang release pins; a CPU build of it must be what pip resolves (a local wheel or an index).
TORCH_SPEC = "torch==2.13.0"
# What SGLang's HTTP server, scheduler and Llama path import, as measured with sglang 0.5.21 on CPU (pinned where
# sglang pins them).
_SERVER_REQUIREMENTS = (
    "transformers==5.12.1",
    "triton==3.9.0",
    "torchvision==0.28.*",
    "fastapi",
    "uvicorn",
    "uvloop",
    "pyzmq",
    "orjson",
    "aiohttp",
    "requests",
    "psutil",
    "setproctitle",
    "pybase64",
    "msgspec",
    "numpy",
    "pydantic",
    "python-multipart",
    "prometheus-client",
    "interegular",
    "partial_json_parser",
    "sentencepiece==0.2.1",
    "tiktoken",
    "pillow",
    "einops",
    "safetensors",
    "IPython",
    "zstandard",
    "blobfile",
    "xxhash",
    "pyyaml",
    "dill",
    "compressed-tensors",
    "gguf",
    "openai==2.6.1",
    "jsonschema",
    "xgrammar==0.2.7",
    "soundfile==0.13.1",
)
_STUB_DOC = '"""Stand-in for SGLang\'s CPU test server (guide_mega.rollout.sglang_server): importable, never used."""\n'
_PLACEHOLDER_MODULE = (
    _STUB_DOC
    + """

def _unavailable(name):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{__name__}.{name} is a stand-in on this CPU test server")

    return call


class _Placeholder(type):
    def __getattr__(cls, name):
        return cls

    def __call__(cls, *args, **kwargs):
        raise NotImplementedError(f"{__name__} is a stand-in on this CPU test server")


class Placeholder(metaclass=_Placeholder):
    pass


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Placeholder if name[:1].isupper() else _unavailable(name)
"""
)
_STUB_MODULES = {
    "vllm/__init__.py": _STUB_DOC,
    "vllm/_custom_ops.py": _PLACEHOLDER_MODULE,
    "sgl_kernel/__init__.py": _PLACEHOLDER_MODULE,
    "torchvision/__init__.py": _PLACEHOLDER_MODULE + '\n__version__ = "0.28.0"\n',
    **{
        f"torchvision/{module}.py": _PLACEHOLDER_MODULE
        for module in ("io", "ops", "transforms/__init__", "transforms/functional", "transforms/v2/__init__")
    },
    "torchvision/transforms/v2/functional.py": _PLACEHOLDER_MODULE,
}
_READY_MARKER = ".guide_mega_ready"
_PR_SET_PDEATHSIG = 1


def _pip(venv_dir: Path, *args: str) -> None:
    subprocess.run([str(venv_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", *args], check=True)


def write_stubs(stubs_dir: Path) -> None:
    for relative, text in _STUB_MODULES.items():
        path = stubs_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def build_cpu_venv(venv_dir: str | Path, *, python: str = "python3") -> Path:
    """The virtual environment for a CPU SGLang server at `venv_dir`, built once (a marker records completion)."""
    venv_dir = Path(venv_dir)
    marker = venv_dir / _READY_MARKER
    recipe = f"sglang=={SGLANG_VERSION} {TORCH_SPEC} {' '.join(_SERVER_REQUIREMENTS)}"
    if marker.is_file() and marker.read_text() == recipe:
        return venv_dir
    subprocess.run([python, "-m", "venv", "--clear", str(venv_dir)], check=True)
    _pip(venv_dir, TORCH_SPEC)
    _pip(venv_dir, "--no-deps", f"sglang=={SGLANG_VERSION}", "torchvision==0.28.*")
    _pip(venv_dir, *[spec for spec in _SERVER_REQUIREMENTS if not spec.startswith("torchvision")])
    write_stubs(venv_dir / "stubs")
    marker.write_text(recipe)
    return venv_dir


def _terminate_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent process dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalSGLangServer:
    """`python -m sglang.launch_server` from `venv_dir` on 127.0.0.1; a context manager that waits until healthy."""

    def __init__(
        self,
        venv_dir: str | Path,
        model_path: str | Path,
        *,
        log_path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        max_total_tokens: int = 16384,
        startup_timeout_s: float = 300.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.venv_dir = Path(venv_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.command = [
            str(self.venv_dir / "bin" / "python"), "-m", "sglang.launch_server",
            "--model-path", str(model_path), "--host", "127.0.0.1", "--port", str(self.port),
            "--device", device, "--dtype", dtype, "--max-total-tokens", str(max_total_tokens),
            *extra_args,
        ]  # fmt: skip
        self.env = {**os.environ, "PYTHONPATH": str(self.venv_dir / "stubs")}
        if device == "cpu":
            self.env["SGLANG_USE_CPU_ENGINE"] = "1"
        self.process: subprocess.Popen | None = None

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def _is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self) -> LocalSGLangServer:
        with self.log_path.open("wb") as log:
            # A new session makes the server the leader of a process group we can stop as a whole; the parent-death
            # signal stops it (and it stops its children) if this process dies without running stop().
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.process.returncode}:\n{self._log_tail()}")
            if self._is_healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server not healthy after {self.startup_timeout_s:g} s:\n{self._log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LocalSGLangServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

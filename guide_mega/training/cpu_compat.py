"""Shims that let Megatron-Core 0.16 train on CPU with the gloo backend (development machines have no GPU).

Megatron assumes a CUDA device in a handful of places: buffers allocated on `torch.cuda.current_device()`,
literal `device="cuda"` tensors in the pipeline schedules and the optimizer, a CUDA RNG tracker, and a dtype
check in the distributed optimizer that only accepts `torch.cuda.*Tensor` parameters. `apply_cpu_shims` patches
exactly those names, once, and only when no CUDA device is present; on a GPU it does nothing. Every shim says what
it replaces and why. `PATCHED_NAMES` lists the (module, attribute) pairs it touches so that a test fails loudly
when a megatron-core release renames one of them (see shared/reference/megatron_on_cpu.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import operator
import types
from typing import Any

import torch

_CPU = torch.device("cpu")

# Megatron modules that create tensors with a literal device="cuda"; each gets a `torch` proxy (shim 4).
_LITERAL_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",
)

PATCHED_NAMES: tuple[tuple[str, str], ...] = (
    ("megatron.core.parallel_state", "_GLOBAL_MEMORY_BUFFER"),
    ("megatron.core.parallel_state", "_set_global_memory_buffer"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    ("megatron.core.tensor_parallel.random", "get_cuda_rng_tracker"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    *((module, "torch") for module in _LITERAL_CUDA_MODULES),
)

_applied = False


class _CpuMemoryBuffer:
    """Stands in for megatron.core.utils.GlobalMemoryBuffer, which allocates on the current CUDA device."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None) -> torch.Tensor:
        numel = functools.reduce(operator.mul, tensor_shape, 1)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=_CPU)
            self._buffers[(name, dtype)] = buffer
        return buffer[:numel].view(*tensor_shape)


class _NullRngTracker:
    """Stands in for the CUDA RNG tracker: fork() is a null context, so code inside uses the CPU generator.

    Megatron forks the "model-parallel-rng" state around weight init and dropout; with dropout 0 nothing random
    runs inside the fork, and weights are overwritten by the HF checkpoint anyway.
    """

    def add(self, name: str, seed: int) -> None:
        return None

    def reset(self) -> None:
        return None

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        return None

    def is_initialized(self) -> bool:
        return True

    def fork(self, name: str = "model-parallel-rng"):
        return contextlib.nullcontext()


def _to_cpu_device(device: Any) -> Any:
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return _CPU
    return device


class _CpuDeviceTorch(types.ModuleType):
    """A `torch` module proxy whose tensor factories map device='cuda' to the CPU; everything else is torch."""

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(torch, name)
        if name not in ("zeros", "ones", "empty", "full", "tensor"):
            return attribute

        @functools.wraps(attribute)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return attribute(*args, **kwargs)

        return factory


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    """While active, tensor.type() with no argument reports CPU tensors under their torch.cuda.* names."""
    original = torch.Tensor.type

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(function):
    """`function` run under `_cuda_type_names` (for Megatron code that asserts param.type() is a CUDA type)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return function(*args, **kwargs)

    return wrapper


def _set_cpu_memory_buffer() -> None:
    from megatron.core import parallel_state

    parallel_state._GLOBAL_MEMORY_BUFFER = _CpuMemoryBuffer()


def _cuda_is_identity(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return self


def check_patched_names() -> None:
    """Raise ImportError naming the first (module, attribute) that megatron-core no longer has."""
    for module_name, attribute in PATCHED_NAMES:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            raise ImportError(f"cpu_compat: megatron-core no longer has {module_name}.{attribute}; update the shim")
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if not hasattr(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups"):
        raise ImportError("cpu_compat: DistributedOptimizer._build_model_and_main_param_groups is gone")


def apply_cpu_shims() -> bool:
    """Patch Megatron-Core for CPU execution when CUDA is absent (idempotent). Returns whether shims are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    check_patched_names()
    from megatron.core import parallel_state
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.tensor_parallel import random as tp_random

    # 1. The global memory buffer (the local attention's score buffer, all-gathers) allocates on the CUDA device;
    #    replace the function initialize_model_parallel calls to create it, so every (re)initialisation gets a CPU one.
    parallel_state._set_global_memory_buffer = _set_cpu_memory_buffer
    # 2. RoPE, DDP grad buffers and attention masks allocate on torch.cuda.current_device(); make that the CPU.
    torch.cuda.current_device = lambda: _CPU
    # 3. The CUDA RNG tracker needs CUDA generators; install one whose fork() is a null context.
    tp_random._CUDA_RNG_STATE_TRACKER = _NullRngTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # 4. p2p communication calls torch.cuda.synchronize (a no-op on CPU), and the schedules, the optimizer and
    #    gradient norms create small tensors with a literal device="cuda"; give those modules a torch proxy.
    torch.cuda.synchronize = lambda device=None: None
    for module_name in _LITERAL_CUDA_MODULES:
        importlib.import_module(module_name).torch = _CpuDeviceTorch("torch")
    # 5. Tied embeddings under PP (language_module.py), optimizer state loading and dist-checkpoint exchange call
    #    tensor.cuda(), which raises on a CPU-only torch; there the tensors already are where they must be.
    torch.Tensor.cuda = _cuda_is_identity
    # 6. The distributed optimizer's param groups and gradient clipping assert that tensors are torch.cuda.* types.
    optimizer_cls = distrib_optimizer.DistributedOptimizer
    optimizer_cls._build_model_and_main_param_groups = staticmethod(
        _with_cuda_type_names(optimizer_cls._build_model_and_main_param_groups)
    )
    megatron_optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        megatron_optimizer.clip_grad_by_total_norm_fp32
    )
    _applied = True
    return True

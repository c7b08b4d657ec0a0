"""`guide-mega doctor`: what this machine offers and which implementation each hot path uses."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import warnings

import torch


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> tuple[bool, str]:
    """Whether `module` imports, and the error if not (a broken install is worth reporting, not just 'missing')."""
    try:
        with warnings.catch_warnings():
            # Megatron warns at import about every missing optional accelerator; the report says it once.
            warnings.simplefilter("ignore")
            importlib.import_module(module)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding for the report, never a crash
        return False, f"{type(exc).__name__}: {exc}"


def gpu_telemetry() -> list[dict] | str:
    """Per-GPU name, memory, utilisation and temperature from NVML, or the reason it is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver is the normal case on CPU machines
        return f"NVML unavailable ({type(exc).__name__})"
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "name": pynvml.nvmlDeviceGetName(handle),
                    "memory_used_gib": round(memory.used / 2**30, 2),
                    "memory_total_gib": round(memory.total / 2**30, 2),
                    "utilization_pct": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _hot_paths(cuda: bool) -> dict[str, str]:
    """What training calls on this machine: each dispatcher's own choice for a tensor where training has one
    (bf16 on the GPU, fp32 on the CPU), so the report cannot drift from the code."""
    from guide_mega.algorithms.advantages import group_advantages_impl
    from guide_mega.kernels.policy_loss import resolve_impl as policy_loss_impl
    from guide_mega.kernels.token_logprobs import resolve_impl as token_logprobs_impl

    probe = torch.empty(0, dtype=torch.bfloat16, device="cuda") if cuda else torch.empty(0)
    names = {"triton": "triton", "chunked": "chunked torch", "torch": "closed-form torch"}
    paths = {
        "group_advantages": group_advantages_impl(),
        "token_logprobs": names[token_logprobs_impl("auto", probe)],
        "policy_loss": names[policy_loss_impl("auto", probe)],
    }
    triton_ok, triton_error = _importable("triton")
    if cuda and not triton_ok:
        paths = {name: f"{path} (triton unavailable: {triton_error})" for name, path in paths.items()}
    return paths


def collect_report() -> dict:
    """Everything `doctor` prints, as a dict (also printed as JSON with --json)."""
    cuda = torch.cuda.is_available()
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "packages": {
            name: _version(name)
            for name in (
                "triton",
                "megatron-core",
                "transformers",
                "sglang",
                "transformer-engine",
                "apex",
                "math-verify",
            )
        },
        "hot_paths": _hot_paths(cuda),
        "gpu_telemetry": gpu_telemetry(),
    }
    megatron_ok, megatron_error = _importable("megatron.core")
    report["megatron"] = "ok" if megatron_ok else megatron_error
    report["megatron_mode"] = "CUDA" if cuda else "CPU with gloo (cpu_compat shims)"
    report["code_sandbox"] = sandbox_isolation()
    return report


def sandbox_isolation() -> str:
    """The boundary code rewards get on this machine, and the layers a trivial program run actually obtained (under
    the weak fallback when there is no boundary, which code rewards then refuse without allow_weak_sandbox)."""
    from guide_mega.rewards import boundary
    from guide_mega.rewards.sandbox import SandboxLimits, run_program

    limits = SandboxLimits(os_boundary=boundary.unavailable_reason() is None)
    result = run_program("print('ok')", limits=limits)
    if result.stdout.strip() != "ok":
        return f"not working ({result.status}): {result.stderr.strip()[-200:]}"
    return f"{boundary.describe()} [layers of a trial run: {', '.join(result.isolation) or 'limits only'}]"


def format_report(report: dict) -> str:
    """Readable lines: one 'name: value' per finding, nested sections indented."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {name}: {'not installed' if item is None else item}" for name, item in value.items())
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{key}:")
            lines.extend("  " + ", ".join(f"{k}={v}" for k, v in gpu.items()) for gpu in value)
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)

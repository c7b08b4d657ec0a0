"""Every Triton kernel compiled ahead of time for Hopper (sm_90a), on a machine with no GPU.

    python -m guide_mega.kernels.aot           # a table: registers, spills and shared memory per launch
    python -m guide_mega.kernels.aot --json    # the table, then one JSON list of the reports as the last line

`launches()` lists each kernel at every dtype, constexpr and launch option that the CUDA paths of `token_logprobs`
and `policy_loss` can launch, taking tile sizes from the kernel modules' own config functions so the two cannot
drift apart. `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` needs neither a GPU nor a driver:
Triton lowers to PTX and runs its bundled ptxas, whose own report (`-v`) gives registers and spills; shared memory
comes from Triton's metadata. The calls are the same in Triton 3.6 (the GPU image's) and 3.9 (ours), and capability
90 already means sm_90a (Triton appends the "a" from 90 up). `make gpu-compile` runs this under both.

Run it with TRITON_INTERPRET unset: under it, @triton.jit returns interpreter functions (Triton's own tl.sum and
tl.cdiv included, from the moment triton is imported), which cannot be compiled; importing this module then fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if knobs.runtime.interpret:
    raise ImportError("guide_mega.kernels.aot compiles for a GPU: run it with TRITON_INTERPRET unset")

HOPPER = GPUTarget("cuda", 90, 32)
# Largest dynamic shared memory one block may opt into, per compute capability (sm_90: 227 KiB). Triton checks it
# only when it loads a kernel on a GPU, so a compile here must check it itself.
MAX_SHARED_BYTES = {90: 227 * 1024}
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The runtime scalars of the token_logprobs kernels: sizes and strides are Python ints, the temperature a float.
_LOGPROB_SCALARS = dict.fromkeys(
    ("T", "V", "H", "stride_ht", "stride_wv", "stride_gt", "stride_lt", "vocab_per_split", "num_splits"), "i32"
) | {"inv_temperature": "fp32"}
_COEF_POINTERS = dict.fromkeys(("max_ptr", "coef_a_ptr", "coef_b_ptr", "coef_c_ptr"), "*fp32")
# Integer arguments taken as multiples of 16, as Triton's launcher specialises them when they are: hidden sizes,
# vocabulary shards (e.g. 151936 / TP for TP <= 8) and the strides they give. Token counts are not assumed.
_ALIGNED_ARGS = frozenset({"H", "V", "stride_ht", "stride_wv", "stride_gt", "stride_lt", "vocab_per_split"})
_LAUNCH_OPTIONS = ("num_warps", "num_stages")
_PTX_TARGET = re.compile(r"^\.target\s+(\w+)", re.MULTILINE)
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Launch:
    """One specialisation of a kernel: Triton's type for every argument, the constexpr values, launch options."""

    fn: object  # the @triton.jit function
    variant: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CompileReport:
    """What ptxas and Triton report for one compiled launch; `error` is set when it failed or cannot run."""

    kernel: str
    variant: str
    num_warps: int = 0
    num_stages: int = 0
    registers: int | None = None
    stack_bytes: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    cubin_bytes: int = 0
    ptx_target: str | None = None
    error: str | None = None


def _kernel_module(name: str):
    """A kernel module of this package, refused if it was imported under the interpreter."""
    module = importlib.import_module(f"{__package__}.{name}")
    if getattr(module, "INTERPRETED", False):
        raise RuntimeError(f"{module.__name__} runs under TRITON_INTERPRET=1: unset it before importing the kernels")
    return module


def _split_config(config: dict) -> tuple[dict, dict]:
    """A kernel module's config dict as (constexprs, launch options)."""
    options = {key: config.pop(key) for key in _LAUNCH_OPTIONS if key in config}
    return config, options


def _launch(fn, variant: str, constexprs: dict, options: dict, types: dict[str, str]) -> Launch:
    """A Launch of fn, whose every runtime argument must have its Triton type ("*bf16", "i32", "fp32") in types."""
    missing = [name for name in fn.arg_names if name not in constexprs and name not in types]
    if missing:
        raise KeyError(f"{fn.__name__}: no Triton type for {missing}; add them to guide_mega.kernels.aot")
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    return Launch(fn, variant, signature, constexprs, options)


def _forward_and_backward(forward, backward, dtype, with_entropy: bool, constexprs: dict, options: dict):
    """The partials kernel and the dlogits kernel of one input dtype: [hidden, weight | logits] in that dtype,
    int32 target ids, fp32 partials and coefficients, dlogits written in the input dtype."""
    element = _TRITON_TYPES[dtype]
    inputs = dict.fromkeys(("hidden_ptr", "weight_ptr", "logits_ptr"), f"*{element}") | {"local_ids_ptr": "*i32"}
    constexprs = constexprs | {"WITH_ENTROPY": with_entropy}
    variant = f"{element}{' entropy' if with_entropy else ''}"
    types = inputs | _LOGPROB_SCALARS
    return [
        _launch(forward, variant, constexprs, options, types | {"out_ptr": "*fp32"}),
        _launch(backward, variant, constexprs, options, types | _COEF_POINTERS | {"grad_ptr": f"*{element}"}),
    ]


def _token_logprobs_launches() -> list[Launch]:
    """token_logprobs: the fused LM-head kernels (kernel.py) and the precomputed-logits ones (logits_kernel.py),
    forward and backward, per input dtype, with and without entropy, at the tiles their config functions pick for
    a CUDA tensor of that dtype (each forward's WITH_ENTROPY can meet either backward's)."""
    kernel = _kernel_module("token_logprobs.kernel")
    logits_kernel = _kernel_module("token_logprobs.logits_kernel")
    dispatch = importlib.import_module(f"{__package__}.token_logprobs.dispatch")
    launches = []
    for dtype, with_entropy in itertools.product(dispatch._TRITON_DTYPES, (False, True)):
        config = kernel._linear_config(SimpleNamespace(is_cuda=True, dtype=dtype))
        config.pop("vocab_per_split")  # a runtime argument
        constexprs, options = _split_config(config)
        constexprs |= {"UPCAST": False, "PRECISION": kernel._dot_precision(dtype)}
        fused = (kernel._linear_partials_kernel, kernel._linear_dlogits_kernel)
        launches += _forward_and_backward(*fused, dtype, with_entropy, constexprs, options)
        constexprs, options = _split_config(logits_kernel._logits_config(torch.device("cuda")))
        from_logits = (logits_kernel._logits_partials_kernel, logits_kernel._logits_dlogits_kernel)
        launches += _forward_and_backward(*from_logits, dtype, with_entropy, constexprs, options)
    return launches


def _policy_loss_launches() -> list[Launch]:
    """policy_loss/kernel.py: every off-policy mode with and without dual clip, on the fp32 logprobs training
    passes (token_logprobs returns fp32), with Triton's default launch options as the launcher uses them."""
    kernel = _kernel_module("policy_loss.kernel")
    fn = kernel._policy_loss_kernel
    # T is the token count; every other runtime scalar is a float option (clip ranges, caps, the log-ratio clamp).
    types = {name: "*fp32" if name.endswith("_ptr") else "fp32" for name in fn.arg_names}
    types |= {"loss_mask_ptr": "*u8", "is_guided_ptr": "*u8", "T": "i32"}
    launches = []
    for mode, dual_clip in itertools.product(kernel.OFF_POLICY_MODES, (False, True)):
        off_policy = kernel.OFF_POLICY_MODES.index(mode)
        constexprs = {"OFF_POLICY": off_policy, "HAS_DUAL_CLIP": dual_clip, "BLOCK": kernel._BLOCK}
        launches.append(_launch(fn, f"{mode}{' dual-clip' if dual_clip else ''}", constexprs, {}, types))
    return launches


def launches() -> list[Launch]:
    """Every kernel launch the CUDA paths of guide_mega.kernels can make, one per compiled specialisation."""
    return _token_logprobs_launches() + _policy_loss_launches()


@contextlib.contextmanager
def _fresh_compile():
    """Compile from scratch into a throwaway cache, so that ptxas always runs, and echo its log to stdout."""
    with (
        tempfile.TemporaryDirectory(prefix="triton-aot-") as cache_dir,
        knobs.cache.scope(),
        knobs.compilation.scope(),
        knobs.nvidia.scope(),
    ):
        knobs.cache.dir = cache_dir
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        yield


def _divisibility(launch: Launch) -> dict:
    """Triton's attrs: 16-divisibility of every pointer (torch allocations are aligned) and of _ALIGNED_ARGS."""
    aligned = [name in _ALIGNED_ARGS or kind.startswith("*") for name, kind in launch.signature.items()]
    return {(index,): [["tt.divisibility", 16]] for index, flag in enumerate(aligned) if flag}


def compile_launch(launch: Launch, target: GPUTarget = HOPPER) -> CompileReport:
    """Compile one launch for target and read its resource use; failures are reported, never raised."""
    attrs = _divisibility(launch)
    source = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=attrs)
    log = io.StringIO()
    try:
        with _fresh_compile(), contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=launch.options)
    except Exception as exc:  # any frontend, MLIR or ptxas error: the report carries it
        return CompileReport(launch.fn.__name__, launch.variant, error=_describe(exc))
    ptxas_log = log.getvalue()
    registers, frame = _PTXAS_REGISTERS.search(ptxas_log), _PTXAS_FRAME.search(ptxas_log)
    stack, stores, loads = (int(value) for value in frame.groups()) if frame else (None, None, None)
    metadata = compiled.metadata
    report = CompileReport(
        kernel=launch.fn.__name__,
        variant=launch.variant,
        num_warps=metadata.num_warps,
        num_stages=metadata.num_stages,
        registers=int(registers.group(1)) if registers else None,
        stack_bytes=stack,
        spill_stores=stores,
        spill_loads=loads,
        shared_bytes=metadata.shared,
        cubin_bytes=len(compiled.asm.get("cubin", b"")),
        ptx_target=next(iter(_PTX_TARGET.findall(compiled.asm.get("ptx", ""))), None),
    )
    return _checked(report, target)


def _describe(exc: Exception) -> str:
    """One line for a failed compile: the exception, and where it was raised when it carries no message."""
    if str(exc).strip():
        return f"{type(exc).__name__}: {str(exc).strip()}"
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {frame.filename}:{frame.lineno}: {frame.line}"


def _checked(report: CompileReport, target: GPUTarget) -> CompileReport:
    """The report with an error where it could not launch on target: no cubin, no ptxas report, too much smem."""
    limit = MAX_SHARED_BYTES.get(target.arch)
    if report.cubin_bytes == 0:
        error = "no cubin produced"
    elif report.registers is None or report.spill_stores is None:
        error = "ptxas printed no resource report"
    elif limit is not None and report.shared_bytes > limit:
        error = f"needs {report.shared_bytes} B of shared memory; sm_{target.arch} allows {limit} B per block"
    else:
        return report
    return replace(report, error=error)


def _compile_index(index: int) -> CompileReport:
    return compile_launch(launches()[index])


def compile_all(jobs: int = 1) -> list[CompileReport]:
    """Every launch compiled for Hopper, in `jobs` processes (Triton's frontend holds the GIL), in launches() order."""
    if jobs <= 1:
        return [compile_launch(launch) for launch in launches()]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_index, range(len(launches()))))


def format_table(reports: list[CompileReport]) -> str:
    """A fixed-width table of the reports, headed by the Triton version and the PTX target it compiled for."""
    columns = ("kernel", "variant", "warps", "stages", "regs", "spill st/ld B", "stack B", "smem B", "cubin KiB")
    rows = [columns]
    for r in reports:
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        cubin = f"{r.cubin_bytes / 1024:.1f}" if r.cubin_bytes else "-"
        cells = (r.num_warps, r.num_stages, r.registers, spills, r.stack_bytes, r.shared_bytes, cubin)
        rows.append((r.kernel, r.variant, *("-" if cell is None else str(cell) for cell in cells)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    failed = sum(r.error is not None for r in reports)
    ptx_targets = ", ".join(sorted({r.ptx_target for r in reports if r.ptx_target})) or "none"
    head = f"Triton {triton.__version__}, PTX target {ptx_targets}: {len(reports)} launches, {failed} failed"
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    """Compile and print the table; exit status 1 if any launch failed."""
    parser = argparse.ArgumentParser(description="Compile every guide_mega Triton kernel launch for sm_90a.")
    parser.add_argument("--json", action="store_true", help="end with one JSON list of the reports")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    reports = compile_all(args.jobs)
    print(format_table(reports))
    for report in reports:
        if report.error:
            print(f"FAILED {report.kernel}[{report.variant}]: {report.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(report) for report in reports]))
    return 1 if any(report.error for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

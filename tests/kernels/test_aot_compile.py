"""Every Triton kernel launch compiled ahead of time for Hopper (sm_90a) with the installed Triton, without a GPU.

The compile runs in a subprocess: this directory's conftest sets TRITON_INTERPRET=1 for the CPU tests, and under
it @triton.jit returns interpreter functions, which cannot be compiled. `make gpu-compile` runs the same command
under the GPU image's Triton too.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import guide_mega.kernels

# Spill bytes (stores + loads) that ptxas reports, the larger of Triton 3.6.0 and 3.9.0: the fp32 LM-head tiles
# (a 128 x 128 fp32 dot on CUDA cores, 8 warps) and, under 3.9, the bf16/fp16 entropy forward reach the 255-register
# cap. Every other launch must spill nothing; a bound here may shrink, never grow without a benchmark.
KNOWN_SPILL_BYTES = {
    ("_linear_partials_kernel", "fp32"): 52,
    ("_linear_partials_kernel", "fp32 entropy"): 132,
    ("_linear_partials_kernel", "bf16 entropy"): 112,
    ("_linear_partials_kernel", "fp16 entropy"): 112,
    ("_linear_dlogits_kernel", "fp32 entropy"): 36,
}
# A launch kernel is a @triton.jit function named *_kernel; the other jit functions are device helpers it inlines.
_JIT_KERNEL = re.compile(r"^@triton\.jit\s*\ndef (\w+_kernel)\(", re.MULTILINE)


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "guide_mega.kernels.aot", "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), f"aot crashed (rc {result.returncode}):\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_launch_compiles_to_an_sm90a_cubin(reports):
    failed = [f"{r['kernel']}[{r['variant']}]: {r['error']}" for r in reports if r["error"]]
    assert not failed, "\n".join(failed)
    assert {r["ptx_target"] for r in reports} == {"sm_90a"}
    assert all(r["cubin_bytes"] > 0 and 0 < r["registers"] <= 255 for r in reports)


def test_every_triton_kernel_is_compiled(reports):
    """A kernel added under kernels/ without a launch in guide_mega.kernels.aot fails here."""
    package = Path(guide_mega.kernels.__file__).parent
    defined = {name for path in package.rglob("*.py") for name in _JIT_KERNEL.findall(path.read_text())}
    assert defined, f"no @triton.jit *_kernel found under {package}"
    assert defined == {r["kernel"] for r in reports}


def test_spills_stay_within_measured_bounds(reports):
    over = []
    for r in reports:
        spilled = r["spill_stores"] + r["spill_loads"]
        bound = KNOWN_SPILL_BYTES.get((r["kernel"], r["variant"]), 0)
        if spilled > bound:
            over.append(f"{r['kernel']}[{r['variant']}]: {spilled} B spilled, bound {bound} B ({r['registers']} regs)")
    assert not over, "\n".join(over)

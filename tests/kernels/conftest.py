"""Kernel-test setup: the Triton interpreter on CPU, the per-dtype tolerance table and the error-bound check.

Error-bound rule (after cut-cross-entropy's tests): against an fp64 ground truth computed from the same inputs,
a kernel may be no less accurate than the plain torch computation in the same input dtype, up to TOL[dtype]:
    |kernel - truth| <= |torch_same_dtype - truth| + atol + rtol * |truth|      (element by element)
"""

import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. Triton reads the flag when a kernel is decorated,
# i.e. when guide_mega's kernel modules are imported (lazily, on the first Triton call), so it is set here,
# before any test runs; with a GPU the same tests run the compiled kernels on CUDA tensors.
_KERNEL_MODULES = (
    "guide_mega.kernels.token_logprobs.kernel",
    "guide_mega.kernels.token_logprobs.logits_kernel",
    "guide_mega.kernels.policy_loss.kernel",
)
_HAS_CUDA = torch.cuda.is_available()
_COMPILED_EARLY = os.environ.get("TRITON_INTERPRET") != "1" and any(name in sys.modules for name in _KERNEL_MODULES)
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (atol, rtol) slack on top of the same-dtype torch error. fp32: a few ulps of an O(10) log-sum-exp and of its
# gradients. bf16: the kernels round dlogits and grads to bf16 where torch keeps some steps in fp32.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
}


def _interpreter_takes_computed_loop_bounds() -> bool:
    """Whether this Triton's interpreter runs `range(start, stop)` with bounds computed from program ids.

    Triton 3.6's interpreter (the GPU image's) turns such a bound into an int with int() of a one-element array,
    which numpy 2.5 refuses; its compiled kernels are unaffected (they pass on the GPU), newer interpreters too.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, n):
        start = tl.program_id(0) * 2
        total = 0
        for i in range(start, tl.minimum(start + 2, n)):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](out, 5)
    except Exception:  # the interpreter's own failure, whatever it raises
        return False
    return int(out) == 1


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without CUDA; refuse to run Triton on CPU if the kernels were compiled for a GPU; on CPU, skip
    the Triton implementation's tests where the interpreter cannot run our kernels (said in the reason)."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")
    interpreter_ok = (
        _HAS_CUDA or not any(_runs_triton(item) for item in items) or _interpreter_takes_computed_loop_bounds()
    )
    skip_interpreter = pytest.mark.skip(
        reason="this Triton's interpreter cannot run computed loop bounds (Triton 3.6 with numpy 2.5); "
        "the compiled kernels are tested on a GPU and compiled for sm_90a by test_aot_compile"
    )
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        if not interpreter_ok and _runs_triton(item):
            item.add_marker(skip_interpreter)
    if _COMPILED_EARLY and not _HAS_CUDA:
        raise pytest.UsageError("guide_mega's Triton kernels were imported before TRITON_INTERPRET=1 was set")


def _runs_triton(item) -> bool:
    """Whether a test runs the Triton implementation: an impl="triton" parameter, or 'triton' in its name."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "triton" in params.values() or "triton" in getattr(item, "originalname", item.name)


def _describe(name: str, diff: torch.Tensor, excess: torch.Tensor) -> str:
    worst = int(excess.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), excess.shape))
    return (
        f"{name}: kernel error exceeds bound by {excess.max().item():.3e} at {index}; "
        f"max |diff| {diff.max().item():.3e}, mean |diff| {diff.mean().item():.3e}"
    )


def check_within_reference_error(name, actual, reference, truth, *, dtype):
    """Assert the error-bound rule for one output or gradient (all three tensors of the same shape)."""
    atol, rtol = TOL[dtype]
    truth = truth.double()
    kernel_error = (actual.double() - truth).abs()
    reference_error = (reference.double() - truth).abs()
    bound = reference_error + atol + rtol * truth.abs()
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    excess = kernel_error - bound
    assert (excess <= 0).all(), _describe(name, kernel_error, excess)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton through the interpreter)."""
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture
def within_reference_error():
    """The error-bound check as a fixture: within_reference_error(name, actual, reference, truth, dtype=...)."""
    return check_within_reference_error


@pytest.fixture
def tolerance():
    """The per-dtype (atol, rtol) table."""
    return TOL

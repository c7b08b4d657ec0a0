"""Build entry: the Python packages (with the top-level kernels/ folder mapped to guide_mega.kernels).

The C++/CUDA extension guide_mega._C is built from csrc/ when torch is importable at build time
(install with --no-build-isolation); a failed or impossible compile never breaks the install.
"""

import os
import subprocess
import sys

from setuptools import find_packages, setup

# kernels/ sits beside csrc/ at the top of the repo but installs as guide_mega.kernels: a top-level
# `kernels` module would collide with the HF `kernels` package that transformers probes for.
_KERNEL_PACKAGES = ["guide_mega.kernels"] + [f"guide_mega.kernels.{name}" for name in find_packages("kernels")]

_EXTENSION_NAME = "guide_mega._C"
_CPU_SOURCES = ["csrc/module.cpp", "csrc/group_advantages.cpp"]
_CUDA_SOURCES = ["csrc/group_advantages_cuda.cu"]
_CXX_FLAGS = ["-O3"]
# The public Extension fields that differ between torch's CUDAExtension and CppExtension.
_EXTENSION_FIELDS = ("sources", "include_dirs", "library_dirs", "libraries", "extra_compile_args", "extra_link_args")


# Run in a fresh interpreter on a freshly built library: its error path must raise a Python ValueError.
_ERROR_PATH_PROBE = """
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.guide_mega.group_advantages(torch.tensor([float("nan")]), torch.tensor([0]), -1, 0, True, 1e-6, False)
except ValueError:
    sys.exit(0)
sys.exit("the op did not reject a NaN reward")
"""


def _warn(message: str) -> None:
    print(f"WARNING (guide_mega): {message}", file=sys.stderr)


def _optional_build_ext(cpp_extension):
    """torch's BuildExtension, made optional: a CUDA build that fails is retried for CPU only, and a CPU build
    that fails only warns, leaving the package on the eager reference implementation."""

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def run(self) -> None:
            # build_ext.run swaps the compiler option (a name) for a compiler object, and setuptools' run clears
            # `inplace` until it finishes (so a failed run leaves it cleared): a retry needs both back.
            compiler_option, inplace = self.compiler, self.inplace
            error = self._try_run()
            if error is not None and any(src.endswith(".cu") for ext in self.extensions for src in ext.sources):
                _warn(f"building {_EXTENSION_NAME} with CUDA failed ({error}); retrying for CPU only")
                self.compiler, self.inplace = compiler_option, inplace
                self._drop_cuda()
                error = self._try_run()
            if error is not None:
                _warn(f"building {_EXTENSION_NAME} failed ({error}); group advantages will use the eager reference")
                return
            self._probe_error_path()

        def _probe_error_path(self) -> None:
            # Measured on a GPU image whose default CXX links libstdc++ statically: the library builds and loads,
            # but the first error it raises (a C++ exception thrown through torch's dispatcher) kills the process.
            # A library that cannot raise safely is removed, so that the package falls back to the reference.
            for extension in self.extensions:
                path = self.get_ext_fullpath(extension.name)
                probe = subprocess.run([sys.executable, "-c", _ERROR_PATH_PROBE, path], capture_output=True, text=True)
                if probe.returncode != 0:
                    compiler = os.environ.get("CXX", "the default C++ compiler")
                    _warn(
                        f"{_EXTENSION_NAME} built with {compiler} crashes when it raises an error (exit "
                        f"{probe.returncode}: {probe.stderr.strip()[-200:]}); removed it, group advantages will use "
                        "the eager reference. Rebuild with a compiler that links libstdc++ dynamically, e.g. "
                        "CXX=/usr/bin/g++"
                    )
                    os.remove(path)

        def _drop_cuda(self) -> None:
            # Reconfigure the extension objects in place: finalize_options attached build state to them.
            cpu_extension = cpp_extension.CppExtension(_EXTENSION_NAME, _CPU_SOURCES, extra_compile_args=_CXX_FLAGS)
            for extension in self.extensions:
                for field in _EXTENSION_FIELDS:
                    setattr(extension, field, getattr(cpu_extension, field))

        def _try_run(self) -> Exception | None:
            try:
                super().run()
            except Exception as exc:  # any compiler or toolchain error: the install must go on without _C
                return exc
            return None

    return OptionalBuildExt


def _extension_setup_args() -> dict:
    """ext_modules and cmdclass that build guide_mega._C, or none when torch is not importable at build time or
        GUIDE_MEGA_SKIP_EXTENSION=1 (for builds that test only the packaging).

        CUDA sources join when torch is a CUDA build and the CUDA toolkit (nvcc) is found. The CUDA kernel needs compute
    capability 6.0 or newer (float64 atomicAdd; the source refuses older targets); CUDA 13 itself starts at 7.5.
    """
    if os.environ.get("GUIDE_MEGA_SKIP_EXTENSION") == "1":
        _warn(f"GUIDE_MEGA_SKIP_EXTENSION=1: skipping {_EXTENSION_NAME}")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn(f"torch is not importable at build time (install with --no-build-isolation); skipping {_EXTENSION_NAME}")
        return {}
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        extension = cpp_extension.CUDAExtension(
            _EXTENSION_NAME,
            _CPU_SOURCES + _CUDA_SOURCES,
            extra_compile_args={"cxx": _CXX_FLAGS, "nvcc": ["-O3"]},
        )
    else:
        extension = cpp_extension.CppExtension(_EXTENSION_NAME, _CPU_SOURCES, extra_compile_args=_CXX_FLAGS)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": _optional_build_ext(cpp_extension)}}


setup(
    packages=find_packages(include=["guide_mega", "guide_mega.*"]) + _KERNEL_PACKAGES,
    package_dir={"guide_mega": "guide_mega", "guide_mega.kernels": "kernels"},
    **_extension_setup_args(),
)

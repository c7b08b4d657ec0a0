"""Build entry: the Python packages (with the top-level kernels/ folder mapped to guide_mega.kernels).

The C++/CUDA extension guide_mega._C is built from csrc/ when torch is importable at build time
(install with --no-build-isolation); a failed or impossible compile never breaks the install.
"""

import sys

from setuptools import find_packages, setup

# kernels/ sits beside csrc/ at the top of the repo but installs as guide_mega.kernels: a top-level
# `kernels` module would collide with the HF `kernels` package that transformers probes for.
_KERNEL_PACKAGES = ["guide_mega.kernels"] + [f"guide_mega.kernels.{name}" for name in find_packages("kernels")]

_EXTENSION_NAME = "guide_mega._C"
_CPU_SOURCES = ["csrc/module.cpp", "csrc/group_advantages.cpp"]
_CUDA_SOURCES = ["csrc/group_advantages_cuda.cu"]
_CXX_FLAGS = ["-O3"]


def _warn(message: str) -> None:
    print(f"WARNING (guide_mega): {message}", file=sys.stderr)


def _optional_build_ext(cpp_extension):
    """torch's BuildExtension, made optional: a CUDA build that fails is retried for CPU only, and a CPU build
    that fails only warns, leaving the package on the eager reference implementation."""

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def run(self) -> None:
            try:
                super().run()
                return
            except Exception as exc:  # any compiler or toolchain error: the install must go on without _C
                error = exc
            has_cuda_sources = any(src.endswith(".cu") for ext in self.extensions for src in ext.sources)
            if has_cuda_sources:
                _warn(f"building {_EXTENSION_NAME} with CUDA failed ({error}); retrying for CPU only")
                self.extensions = [
                    cpp_extension.CppExtension(_EXTENSION_NAME, _CPU_SOURCES, extra_compile_args=_CXX_FLAGS)
                ]
                try:
                    super().run()
                    return
                except Exception as exc:  # same reason as above
                    error = exc
            _warn(f"building {_EXTENSION_NAME} failed ({error}); group advantages will use the eager reference")

    return OptionalBuildExt


def _extension_setup_args() -> dict:
    """ext_modules and cmdclass that build guide_mega._C, or none when torch is not importable at build time.

    CUDA sources join when torch is a CUDA build and the CUDA toolkit (nvcc) is found.
    """
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

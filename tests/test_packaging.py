"""The top-level kernels/ folder installs as guide_mega.kernels, never as a top-level `kernels` module."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_resolves_kernels_inside_the_package():
    import guide_mega.kernels

    assert Path(guide_mega.kernels.__file__).resolve().parent == REPO / "kernels"


def test_no_top_level_kernels_module_from_this_repo(tmp_path):
    # Look it up from a neutral directory: `python -m` would put the repo root (holding kernels/) on sys.path.
    probe = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else '')"
    origin = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    # The HF `kernels` package may legitimately be installed; ours must never be what `import kernels` finds.
    assert not origin.stdout.strip().startswith(str(REPO))


@pytest.mark.slow
def test_wheel_maps_kernels_under_guide_mega(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        env={**os.environ, "GUIDE_MEGA_SKIP_EXTENSION": "1"},  # the C++ build is tested in tests/csrc
    )
    (wheel,) = tmp_path.glob("guide_mega-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "guide_mega/kernels/__init__.py" in names
    assert not [name for name in names if name.startswith("kernels/")]

"""Every attack of the adversarial suite (sandbox_attacks.py) is contained by the OS boundary, one test each.

The suite needs bubblewrap: `make test` installs it where it can (CI); where it cannot run the tests skip and say
why, and CI fails when doctor reports no bubblewrap sandbox.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

from guide_mega.rewards import boundary


def _load_suite():
    """sandbox_attacks.py is also a script, run as root and as another user; pytest imports test files only."""
    spec = importlib.util.spec_from_file_location("sandbox_attacks", Path(__file__).with_name("sandbox_attacks.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the module runs
    spec.loader.exec_module(module)
    return module


suite = _load_suite()


@pytest.mark.parametrize("name", list(suite.ATTACKS))
def test_attack_is_contained(name):
    if boundary.unavailable_reason() is not None:
        pytest.skip(f"no OS boundary here: {boundary.unavailable_reason()}")
    assert suite.run_all([name]) == {name: True}

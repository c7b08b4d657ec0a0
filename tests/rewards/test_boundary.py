"""Which sandbox code rewards get: bubblewrap where it runs, else a refusal unless the weak fallback is allowed,
and `guide-mega doctor` says which. A machine without bubblewrap is made by taking bwrap off PATH."""

import json

import pytest

from guide_mega.config import RewardConfig
from guide_mega.doctor import sandbox_isolation
from guide_mega.preflight import check_reward
from guide_mega.rewards import boundary
from guide_mega.rewards.pool import RewardPool
from guide_mega.rewards.sandbox import SandboxLimits, SandboxUnavailableError, run_program

PROGRAM = "```python\nprint(input())\n```"
TESTS = json.dumps({"inputs": ["ok\n"], "outputs": ["ok\n"]})


def _forget_probes() -> None:
    boundary.unavailable_reason.cache_clear()
    boundary._bwrap.cache_clear()


@pytest.fixture
def without_bubblewrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    _forget_probes()
    yield
    monkeypatch.undo()
    _forget_probes()


def test_doctor_names_bubblewrap_and_a_run_gets_it():
    if boundary.unavailable_reason() is not None:
        pytest.skip(f"no OS boundary here: {boundary.unavailable_reason()}")
    report = sandbox_isolation()
    assert report.startswith("bubblewrap ") and "uid 65534" in report, report
    result = run_program("print('ok')", limits=SandboxLimits(wall_s=20.0))
    assert result.stdout == "ok\n" and result.isolation[0] == "bubblewrap"


def test_without_bubblewrap_code_rewards_refuse_unless_allowed(without_bubblewrap):
    assert boundary.unavailable_reason() == "bubblewrap (bwrap) is not installed"
    assert sandbox_isolation().startswith("none: bubblewrap (bwrap) is not installed")
    with pytest.raises(SandboxUnavailableError, match="reward.allow_weak_sandbox=true") as refused:
        RewardPool.from_config(RewardConfig(name="code", num_workers=1))
    assert isinstance(refused.value, ValueError)  # the CLI reports it in one line and exits 2
    with pytest.raises(SandboxUnavailableError):
        run_program("print('ok')")
    config = RewardConfig(name="code", num_workers=1, timeout_s=30.0, code_timeout_s=10.0, allow_weak_sandbox=True)
    with RewardPool.from_config(config) as pool:
        assert not pool.options.code_limits.os_boundary
        assert [result.reward for result in pool.score([PROGRAM], [TESTS], [{}])] == [1.0]


def test_other_rewards_do_not_need_the_sandbox(without_bubblewrap):
    with RewardPool.from_config(RewardConfig(name="exact_match", num_workers=1)) as pool:
        assert [result.correct for result in pool.score(["Answer: 4"], ["4"], [{}])] == [True]


def test_the_refusal_comes_before_any_model_loads(without_bubblewrap):
    """`train` and `train --dry-run` run the preflight checks before loading a model."""
    with pytest.raises(SandboxUnavailableError, match="reward.allow_weak_sandbox=true"):
        check_reward(RewardConfig(name="code"))
    check_reward(RewardConfig(name="code", allow_weak_sandbox=True))
    check_reward(RewardConfig(name="math"))

"""Hostile or careless config files and overrides: one clear ConfigError naming where, fast, never a silent value."""

import time

import pytest

from guide_mega.config import ConfigError, load_config


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  1: 3\n", r"run\.yaml, line 2: key '1' is read as int 1, not a string"),
        ("train:\n  null: 3\n", r"run\.yaml, line 2: key 'null' is read as NoneType None, not a string"),
        # YAML 1.1: on/off/yes/no are booleans, even as keys.
        ("on: 3\n", r"run\.yaml, line 1: key 'on' is read as bool True, not a string; quote it"),
    ],
    ids=["int", "null", "on"],
)
def test_a_key_that_is_not_a_string_is_an_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    "text",
    [
        "train:\n  steps: 3\n  steps: 4\n",
        "train:\n  steps: 3\nreward:\n  name: code\ntrain:\n  seed: 2\n",
    ],
    ids=["key", "section"],
)
def test_a_key_or_section_given_twice_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match=r"run\.yaml, line \d: key '(steps|train)' is given twice \(first at line"):
        load_config(_write(tmp_path, text))


def test_an_alias_bomb_is_refused_fast(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"run\.yaml, line 2: aliases \(\*name\) are not supported"):
        load_config(path)
    assert time.monotonic() - start < 1.0
    with pytest.raises(ConfigError, match=r"override 'train.steps=\*x'.*aliases"):
        load_config(None, ["train.steps=*x"])


def test_deep_nesting_is_a_clear_error(tmp_path):
    path = _write(tmp_path, "train:\n  steps: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: .*nested too deeply"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.timeout_s=.inf", "reward.timeout_s: expected a finite number, got inf"),
        ("reward.timeout_s=.nan", "reward.timeout_s: expected a finite number, got nan"),
        ("reward.timeout_s=1e400", "reward.timeout_s: expected a finite number, got inf"),
        ("optimizer.lr=" + "9" * 400, "optimizer.lr: expected a finite number, got an integer too large for a float"),
        ("reward.timeout_s=1e9", r"reward.timeout_s: must be <= 3600"),
        ("reward.code_timeout_s=1e6", r"reward.code_timeout_s: must be <= 600"),
        ("reward.code_memory_mb=99999999999", r"reward.code_memory_mb: must be <= 65536"),
        ("parallel.timeout_minutes=99999999", r"parallel.timeout_minutes: must be <= 10080"),
    ],
)
def test_infinite_nan_and_absurd_limits_are_refused(override, message):
    with pytest.raises(ConfigError, match=rf"override '{override[:12]}.*{message}"):
        load_config(None, [override])


def test_a_reward_timeout_shorter_than_one_program_run_is_refused(tmp_path):
    path = _write(tmp_path, "reward:\n  name: code\n  code_timeout_s: 4\n")
    with pytest.raises(
        ConfigError,
        match=r"config error in command-line override 'reward.timeout_s=3'.*reward.timeout_s: 3.0 is shorter than "
        r"reward.code_timeout_s 4.0",
    ):
        load_config(path, ["reward.timeout_s=3"])
    assert load_config(None, ["reward.timeout_s=1"]).reward.timeout_s == 1.0  # math: no program runs


def test_errors_name_the_override_not_the_defaults(tmp_path):
    path = _write(tmp_path, "train:\n  prompts_per_step: 8\n")
    with pytest.raises(ConfigError, match=r"config error in command-line override 'train.mini_batches_per_step=3'"):
        load_config(path, ["train.mini_batches_per_step=3"])
    with pytest.raises(ConfigError, match=r"config error in command-line override 'reward.timeout_s.x=1'"):
        load_config(None, ["reward.timeout_s.x=1"])

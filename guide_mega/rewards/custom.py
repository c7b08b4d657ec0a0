"""Your own reward function: `reward.name=package.module:function` or `reward.name=path/to/file.py:function`.

The function is called as `function(prompt, response, answer, metadata)`, positionally:

- prompt: the problem's hint-free prompt as the data gave it (a string, or a list of chat messages);
- response: the sampled response text;
- answer: the ground truth (a string, or a list of accepted strings);
- metadata: the row's metadata dict;

and returns the reward (a finite number), or `(reward, extra_metrics)` with a dict of name -> finite number that
is averaged into the step's metrics (`rollout/reward_extra/<name>`, `guided/reward_extra/<name>`). A reward of at
least 1 counts as *correct*: that is what Guide's unsolved test, accuracy and pass@k read.

It runs in the reward pool's worker processes, under `reward.timeout_s` like the built-in verifiers: a call that
raises, returns something else or runs out of time scores 0 and is counted (`reward/num_errors`,
`reward/num_timeouts`). The module is imported once per worker. A module in the working directory is not on the
Python path of the `guide-mega` command: name it by file (`my_reward.py:score`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

from guide_mega.config import ConfigError
from guide_mega.rewards.results import RewardResult

# A response whose reward reaches this counts as correct (Guide's unsolved test, accuracy, pass@k).
CORRECT_REWARD = 1.0
_FORMS = "'package.module:function' or 'path/to/file.py:function'"


def is_custom_reward(name: str) -> bool:
    """Whether reward.name names a user function rather than a built-in verifier."""
    return ":" in name


def canonical_custom_name(name: str) -> str:
    """`name` with a file path made absolute, so worker processes find the same file wherever they run."""
    target, _, function = name.rpartition(":")
    if target.endswith(".py"):
        return f"{Path(target).resolve()}:{function}"
    return name


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"reward.name: no such file: {path}")
    # One module name per file path: two reward files that share a stem must not replace each other.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"guide_mega_user_reward_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_module_of(missing: str | None, target: str) -> bool:
    """Whether the missing module is `target` itself or a package on its dotted path (not something it imports)."""
    return missing is not None and not target.endswith(".py") and (target + ".").startswith(missing + ".")


def _import_target(target: str) -> Any:
    """The module named by `target` (a file path or a dotted name); any failure is a ConfigError naming it."""
    try:
        if target.endswith(".py"):
            return _import_file(Path(target))
        return importlib.import_module(target)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if not _is_module_of(exc.name, target):
            raise ConfigError(f"reward.name: importing {target} failed: ModuleNotFoundError: {exc}") from None
        raise ConfigError(
            f"reward.name: cannot import module {target!r} ({exc}); for a file in the working directory write "
            f"reward.name={target.replace('.', '/')}.py:FUNCTION"
        ) from None
    except Exception as exc:  # the user's module failed while importing: say where, not our traceback
        raise ConfigError(f"reward.name: importing {target} failed: {type(exc).__name__}: {exc}") from None


@functools.cache
def load_custom_reward(name: str) -> Callable[..., Any]:
    """The user function `name` names, checked to take (prompt, response, answer, metadata); ConfigError if not."""
    target, _, function = name.rpartition(":")
    if not target or not function.isidentifier():
        raise ConfigError(f"reward.name: {name!r} is neither a built-in reward nor of the form {_FORMS}")
    fn = getattr(_import_target(target), function, None)
    if not callable(fn):
        raise ConfigError(f"reward.name: {target} has no function {function!r}")
    try:
        inspect.signature(fn).bind("prompt", "response", "answer", {})
    except TypeError as exc:
        raise ConfigError(
            f"reward.name: {function} must take (prompt, response, answer, metadata) positionally: {exc}"
        ) from None
    except ValueError:  # a builtin without an inspectable signature: calling it will tell
        pass
    return fn


def _finite(value: Any, what: str) -> float:
    if not isinstance(value, Real) or not math.isfinite(value):
        raise TypeError(f"{what} must be a finite number, got {type(value).__name__} {value!r}")
    return float(value)


def custom_reward(name: str, *, prompt: Any, response: str, answer: Any, metadata: dict) -> RewardResult:
    """Call the user function `name` and check what it returns (a TypeError for anything but a number, or a
    number and a dict of numbers)."""
    value = load_custom_reward(name)(prompt, response, answer, metadata)
    reward, extras = value if isinstance(value, tuple) and len(value) == 2 else (value, {})
    reward = _finite(reward, f"reward function {name}: the reward")
    if not isinstance(extras, dict):
        raise TypeError(f"reward function {name}: extra metrics must be a dict, got {type(extras).__name__}")
    extras = {str(key): _finite(item, f"reward function {name}: extra metric {key!r}") for key, item in extras.items()}
    return RewardResult(reward=reward, correct=reward >= CORRECT_REWARD, is_formatted=False, extras=extras)

"""The W&B sink with the real `wandb` package in offline mode (no network): metrics and the samples table land in
the offline run under the run directory; enabling it without the package is a config error naming the extra."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guide_mega.config import ConfigError, load_config
from guide_mega.rollout_samples import SAMPLE_FIELDS
from guide_mega.run_log import RunLog
from guide_mega.types import Prompt, Rollout, RolloutGroup
from guide_mega.wandb_log import RUN_ID_FILE

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, **overrides):
    values = {"logging.run_dir": str(tmp_path / "run"), "logging.tensorboard": False, **overrides}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def test_offline_run_holds_the_metrics_and_the_samples_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the dev extra installs it
    # Keep wandb's own settings and caches inside the test directory.
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    config = _config(tmp_path, **{"logging.wandb.enabled": True, "logging.wandb.mode": "offline"})
    prompt = Prompt(id="q7", prompt=[{"role": "user", "content": "Say one."}], answer="1", hint="small")
    rollout = Rollout(
        prompt_id="q7", sampled_prompt_ids=[1], train_prompt_ids=[1], response_ids=[2, 3], response_text="1",
        reward=1.0, correct=True, is_guided=True, finish_reason="length",
    )  # fmt: skip
    log = RunLog(tmp_path / "run", config, total_steps=1)
    log.begin(0)
    log.samples(1, [RolloutGroup(prompt=prompt, rollouts=[rollout], is_guided=True)])
    log.log(1, {"rollout/reward_mean": 0.25, "loss": float("nan")})
    log.close()

    (offline_run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (table_file,) = offline_run.glob("files/media/table/samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(SAMPLE_FIELDS)
    (row,) = table["data"]
    cells = dict(zip(SAMPLE_FIELDS, row, strict=True))
    assert cells["prompt_id"] == "q7" and cells["hint"] == "small" and cells["finish_reason"] == "length"
    assert json.loads(cells["prompt"]) == [{"role": "user", "content": "Say one."}]  # chat prompts as JSON text
    (history,) = offline_run.glob("run-*.wandb")
    # wandb's service process may still be writing the run file when finish() returns: give it a few seconds.
    deadline = time.monotonic() + 30
    while b"rollout/reward_mean" not in history.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"rollout/reward_mean" in history.read_bytes()


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_anew(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    config = _config(tmp_path, **{"logging.wandb.enabled": True, "logging.wandb.mode": "offline"})
    run_ids = []
    for first_step in (0, 1, 0):  # fresh, resumed after step 1, fresh again (checkpoint.resume=never)
        log = RunLog(tmp_path / "run", config, total_steps=2)
        log.begin(first_step)
        log.log(first_step + 1, {"loss": 0.5})
        log.close()
        run_ids.append((tmp_path / "run" / RUN_ID_FILE).read_text().strip())
    assert run_ids[0] == run_ids[1] != run_ids[2]
    # Offline, each start writes a folder named by the time and the run id.
    folders = [path.name for path in (tmp_path / "run" / "wandb").glob("offline-run-*")]
    assert {run_id for run_id in run_ids for folder in folders if f"-{run_id}" in folder} == set(run_ids)
    assert all(any(f"-{run_id}" in folder for run_id in run_ids) for folder in folders)


def test_enabled_without_the_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like to find_spec
    with pytest.raises(ConfigError, match=r"logging\.wandb\.enabled: .*pip install 'guide-mega\[wandb\]'"):
        _config(tmp_path, **{"logging.wandb.enabled": True})


def test_the_train_command_exits_2_with_one_line(tmp_path):
    """The real entry point in a fresh interpreter where wandb cannot be imported: exit 2 before any model loads."""
    config = tmp_path / "train.yaml"
    config.write_text(f"logging:\n  run_dir: {tmp_path / 'run'}\n  wandb:\n    enabled: true\n")
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "from guide_mega.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(config)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"guide-mega train: error: config error in {config}: logging.wandb.enabled: the wandb package is not "
        "installed (pip install 'guide-mega[wandb]')"
    )
    assert not (tmp_path / "run").exists()

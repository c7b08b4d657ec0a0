"""The real `guide-mega` entry point in a subprocess: a user's mistake is one line on stderr naming what to change,
exit status 2, in seconds (no model loads); `--dry-run` and `--help` print what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE_MEGA = str(Path(sys.executable).parent / "guide-mega")
DEMO = str(REPO / "configs" / "demo_cpu.yaml")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GUIDE_MEGA, *args], capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **(env or {})}
    )


def first_error_line(*args: str, env: dict | None = None) -> str:
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.splitlines()[0]


def test_missing_data_file():
    line = first_error_line("train", "--config", DEMO, "data.source=missing.jsonl", "data.source_options={}")
    assert line == "guide-mega train: error: data.source: no such prompt file: missing.jsonl"


def test_prompt_file_with_the_demo_generator_options_says_what_to_override(tmp_path):
    rows = tmp_path / "mine.jsonl"
    rows.write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n")
    line = first_error_line("train", "--config", DEMO, f"data.source={rows}")
    assert line == (
        f"guide-mega train: error: data.source_options: {rows} is a prompt file, which takes no generator options "
        "(got ['max_animals', 'max_instances', 'min_animals', 'min_instances', 'seed', 'size']); remove them: "
        "data.source_options={} on the command line, or delete data.source_options from the YAML"
    )


def test_generator_options_the_generator_rejects():
    line = first_error_line("train", "--config", DEMO, "data.source_options={size: 3, legs: 4}")
    assert line.startswith(
        "guide-mega train: error: data.source: reasoning_gym:leg_counting with data.source_options "
        "{'size': 3, 'legs': 4}: LegCountingConfig.__init__() got an unexpected keyword argument 'legs'"
    )


@pytest.mark.skipif(__import__("importlib").util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_sglang_engine_without_sglang_names_the_extra():
    line = first_error_line("train", "--config", DEMO, "rollout.engine=sglang")
    assert line == (
        "guide-mega train: error: rollout.engine: 'sglang' runs SGLang in this process and needs the sglang package: "
        "install the gpu extra (pip install 'guide-mega[gpu]', on a CUDA machine), set rollout.sglang_urls to "
        "running servers, or use rollout.engine=hf"
    )


def test_typo_is_caught_with_a_suggestion():
    line = first_error_line("train", "--config", DEMO, "algorithm.guide.treshold=0.1")
    assert line == (
        "guide-mega train: error: config error in command-line override 'algorithm.guide.treshold=0.1': "
        "algorithm.guide.treshold: unknown key (did you mean 'algorithm.guide.threshold'?)"
    )


def test_reward_module_that_does_not_import():
    line = first_error_line("train", "--config", DEMO, "reward.name=mymodule:my_reward")
    assert line == (
        "guide-mega train: error: reward.name: cannot import module 'mymodule' (No module named 'mymodule'); for a "
        "file in the working directory write reward.name=mymodule.py:FUNCTION"
    )


def test_context_parallel_is_refused_by_validation():
    line = first_error_line("train", "--config", DEMO, "parallel.context=2")
    assert line == (
        "guide-mega train: error: config error in command-line override 'parallel.context=2': parallel.context: "
        "context parallelism is not supported yet; set parallel.context=1"
    )


def test_eval_every_without_held_out_problems_is_refused_by_validation():
    line = first_error_line("train", "--config", DEMO, "train.eval_every=2")
    assert line == (
        "guide-mega train: error: config error in command-line override 'train.eval_every=2': train.eval_every: "
        "needs data.eval_source (held-out problems)"
    )


def test_hub_id_not_in_the_local_cache_downloads_nothing(tmp_path):
    line = first_error_line(
        "train", "--config", DEMO, "model.path=SomeOrg/some-model", env={"HF_HUB_CACHE": str(tmp_path)}
    )
    assert line == (
        f"guide-mega train: error: model.path: 'SomeOrg/some-model' is not a local directory and not in the local "
        f"HF cache ({tmp_path}); guide-mega downloads nothing: fetch it first (`hf download SomeOrg/some-model`) or "
        "give its directory"
    )


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    line = first_error_line("train", "--config", DEMO, f"model.path={tmp_path}")
    assert line.startswith(f"guide-mega train: error: model.path: {tmp_path}/config.json: model_type 'gpt2' is not ")
    assert line.endswith(
        "; supported: Llama-3 (model_type llama), Qwen2 / Qwen2.5 (qwen2) and Qwen3 (qwen3) dense decoders"
    )


def test_dry_run_prints_the_resolved_config_and_the_plan():
    result = run_cli("train", "--config", DEMO, "--dry-run", "train.steps=3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["model:", "  path: embedded:smollm2-135m-instruct"]
    assert "  steps: 3" in lines and "plan: fits" in lines
    assert lines[-1] == "dry run: the inputs check out; no model was loaded"
    assert "Apex" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr


def test_help_shows_defaults():
    result = run_cli("eval", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "samples per problem (n) (default: 8)" in text and "(default: eval)" in text


@pytest.mark.distributed
def test_user_error_under_torchrun_is_one_clean_line_and_no_traceback_of_ours():
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "guide_mega.cli", "train", "--config", DEMO, "data.source=missing.jsonl", "data.source_options={}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Each rank that reaches the check prints the line; how many do is a race, since torchrun sends SIGTERM to
    # the other rank as soon as the first exits with 2.
    error_lines = [line for line in output.splitlines() if line.startswith("guide-mega train: error:")]
    assert error_lines and len(error_lines) <= 2, output
    assert set(error_lines) == {"guide-mega train: error: data.source: no such prompt file: missing.jsonl"}, output
    assert "[rank0]" not in output and "[rank1]" not in output, output
    assert "guide_mega/" not in output, output  # no frame of ours in any traceback


def test_convert_names_a_source_that_is_not_a_checkpoint(tmp_path):
    missing = tmp_path / "nothing"
    line = first_error_line("convert", "hf-to-megatron", str(missing), str(tmp_path / "out"))
    assert line == f"guide-mega convert: error: source: {missing} is not an HF model directory (no config.json there)"
    line = first_error_line("convert", "megatron-to-hf", str(tmp_path), str(tmp_path / "out"))
    assert line == f"guide-mega convert: error: source: {tmp_path} is not a Megatron checkpoint (no guide_mega.json)"


def test_train_sh_stops_a_mistake_before_torchrun_starts_any_rank():
    result = subprocess.run(
        ["bash", "scripts/train.sh", DEMO, "train.stepz=3"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "guide-mega train: error: config error in command-line override 'train.stepz=3': train.stepz: unknown key "
        "(did you mean 'train.steps'?)"
    ]

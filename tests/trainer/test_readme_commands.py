"""The README's commands as written, on the tiny unigram model: a two-step run through the real `guide-mega train`,
then the README's `train --dry-run`, `doctor`, `eval` (base model and the run's Megatron checkpoint, no --config:
the run's own config.yaml), `analyze` with its defaults, and `convert` without --hf-config, each in a subprocess.

Only paths and sizes are substituted (the README's run directory, step and problem count, the embedded model);
the options are the README's own."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from guide_mega.config import dump_config
from guide_mega.evaluation.passk import EvalResults

REPO = Path(__file__).resolve().parents[2]
GUIDE_MEGA = str(Path(sys.executable).parent / "guide-mega")


def readme_command(prefix: str, substitutions: dict[str, str]) -> list[str]:
    """The README's one command line that starts with `prefix`, without its comment, after `substitutions`."""
    lines = [line.split("  #")[0].strip() for line in (REPO / "README.md").read_text().splitlines()]
    matches = [line for line in lines if line.startswith(prefix)]
    assert len(matches) == 1, f"README: {len(matches)} lines start with {prefix!r}"
    line = matches[0]
    for old, new in substitutions.items():
        line = line.replace(old, new)
    return shlex.split(line)


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([GUIDE_MEGA, *argv[1:]], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_readme_commands_run_as_written(tiny_run_config, unigram_model_dir, tmp_path):
    # The commands run in a fresh directory holding the repository's configs, as in a clone.
    (tmp_path / "configs").symlink_to(REPO / "configs")
    dump_config(tiny_run_config("runs/demo"), tmp_path / "tiny.yaml")
    substitutions = {
        "step_4": "step_2",
        "--limit 50": "--limit 3",
        "embedded:smollm2-135m-instruct": str(unigram_model_dir),
    }
    train = run(["guide-mega", "train", "--config", "tiny.yaml"], tmp_path)
    for noise in ("Apex", "ShardedTensor", "Warning"):  # Megatron's import-time and checkpoint warnings stay out
        assert noise not in train.stderr + train.stdout, train.stderr
    assert (tmp_path / "runs/demo/config.yaml").is_file() and (tmp_path / "runs/demo/checkpoints/step_2").is_dir()

    dry_run = run(readme_command("guide-mega train --config configs/demo_cpu.yaml --dry-run", {}), tmp_path)
    assert "plan: fits" in dry_run.stdout
    doctor = run(readme_command("guide-mega doctor", {}), tmp_path)
    assert "megatron-core" in doctor.stdout

    run(readme_command("guide-mega eval --checkpoint embedded:", substitutions), tmp_path)
    run(readme_command("guide-mega eval --checkpoint runs/demo/", substitutions), tmp_path)
    before = EvalResults.load(tmp_path / "eval/before/results.json")
    after = EvalResults.load(tmp_path / "eval/after/results.json")
    assert [p.id for p in before.problems] == [p.id for p in after.problems] == ["q0", "q1", "q2"]
    assert after.meta["model_dir"] == "eval/after/hf_model"  # the run's Megatron checkpoint, converted

    analysis = run(readme_command("guide-mega analyze", substitutions), tmp_path)
    assert "(within reach: pass@8)" in analysis.stdout  # eval's default 8 samples, the largest valid k

    run(readme_command("guide-mega convert megatron-to-hf", substitutions), tmp_path)
    assert json.loads((tmp_path / "out/demo-hf/config.json").read_text())["model_type"] == "llama"
    assert list((tmp_path / "out/demo-hf").glob("*.safetensors"))

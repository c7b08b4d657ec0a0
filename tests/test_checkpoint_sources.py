"""Where `eval` and `convert` find what a trainer checkpoint does not hold: its run's config.yaml (data, reward,
sampling) and the base model (HF config and tokenizer), with embedded and cached hub paths resolved."""

import pytest

from guide_mega.config import dump_config, load_config
from guide_mega.convert import base_model_dir, find_run_config
from guide_mega.evaluation.checkpoint_eval import eval_config_path


def _trainer_checkpoint(run_dir, model_path="/models/base"):
    checkpoint = run_dir / "checkpoints" / "step_4"
    checkpoint.mkdir(parents=True)
    dump_config(load_config(None, [f"model.path={model_path}", "data.source=problems.jsonl"]), run_dir / "config.yaml")
    return checkpoint


def test_the_run_config_is_two_levels_up_or_beside_a_checkpoint_dir_of_its_own(tmp_path):
    checkpoint = _trainer_checkpoint(tmp_path / "run")
    assert find_run_config(checkpoint) == tmp_path / "run" / "config.yaml"
    assert eval_config_path(str(checkpoint), None) == tmp_path / "run" / "config.yaml"
    assert eval_config_path(str(checkpoint), "mine.yaml") == "mine.yaml"
    (tmp_path / "elsewhere" / "step_1").mkdir(parents=True)
    (tmp_path / "elsewhere" / "config.yaml").write_text("{}\n")
    assert find_run_config(tmp_path / "elsewhere" / "step_1") == tmp_path / "elsewhere" / "config.yaml"
    assert find_run_config(tmp_path / "nowhere" / "a" / "b") is None
    (tmp_path / "config.yaml").write_text("{}\n")
    assert find_run_config(tmp_path / "embedded:smollm2-135m-instruct") is None  # not a directory: no run of ours


def test_base_model_comes_from_the_flag_the_checkpoint_or_the_run_config(tmp_path):
    checkpoint = _trainer_checkpoint(tmp_path / "run", model_path=str(tmp_path / "base"))
    assert base_model_dir(checkpoint) == tmp_path / "base"
    assert base_model_dir(checkpoint, str(tmp_path / "other")) == tmp_path / "other"
    (checkpoint / "hf_config").mkdir()
    (checkpoint / "hf_config" / "config.json").write_text("{}")
    assert base_model_dir(checkpoint) is None  # a converted checkpoint carries its own


def test_a_checkpoint_without_its_run_says_what_to_pass(tmp_path):
    (tmp_path / "step_1").mkdir()
    with pytest.raises(
        ValueError, match=r"step_1: a trainer checkpoint without its run's config.yaml two levels up; pass --hf-config"
    ):
        base_model_dir(tmp_path / "step_1")

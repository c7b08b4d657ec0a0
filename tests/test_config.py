"""Config loading, dotted overrides, validation messages and the YAML round trip."""

from pathlib import Path

import pytest

from guide_mega.config import RENAMED_KEYS, Config, ConfigError, dump_config, load_config, parse_override
from guide_mega.config_reference import config_reference_markdown, describe_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    assert config.algorithm.guide.threshold == 0.0 and not config.algorithm.guide.enabled


def test_file_then_overrides(tmp_path):
    path = _write(tmp_path, "algorithm:\n  guide:\n    enabled: true\n    threshold: 0.25\noptimizer:\n  lr: 1e-6\n")
    config = load_config(path, ["algorithm.guide.threshold=0.125", "rollout.stop=['Answer:']", "train.steps=3"])
    assert config.algorithm.guide.enabled and config.algorithm.guide.threshold == 0.125
    assert config.optimizer.lr == 1e-6 and isinstance(config.optimizer.lr, float)  # YAML reads 1e-6 as text
    assert config.rollout.stop == ["Answer:"] and config.train.steps == 3


def test_round_trip(tmp_path):
    config = load_config(None, ["algorithm.dual_clip=3", "data.source_options={min_animals: 2}", "checkpoint.dir=x"])
    path = tmp_path / "resolved.yaml"
    dump_config(config, path)
    assert load_config(path) == config


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("algorithm:\n  guide:\n    treshold: 0.1\n", ["run.yaml", "algorithm.guide.treshold", "unknown key"]),
        ("train:\n  steps: many\n", ["run.yaml", "train.steps", "expected int"]),
        ("train:\n  steps: 1.5\n", ["run.yaml", "train.steps", "expected int"]),
        ("algorithm:\n  guide:\n    threshold: 1.5\n", ["run.yaml", "algorithm.guide.threshold", "< 1.0"]),
        ("algorithm:\n  clip_low: -0.1\n", ["run.yaml", "algorithm.clip_low", ">= 0.0"]),
        ("algorithm:\n  guide:\n    merge: mix\n", ["run.yaml", "algorithm.guide.merge", "'replace'"]),
        ("rollout: 3\n", ["run.yaml", "rollout", "expected a mapping"]),
        ("parallel:\n  sequence_parallel: true\n", ["run.yaml", "parallel.sequence_parallel", "tensor > 1"]),
        (
            "algorithm:\n  guide:\n    teacher_coef: 0.1\n",
            ["run.yaml", "algorithm.guide.teacher_coef", "merge=pool"],
        ),
        ("- a\n", ["run.yaml", "top level"]),
        ("a: [1,\n", ["run.yaml", "invalid YAML"]),
    ],
)
def test_file_errors_name_key_and_file(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_override_errors_name_the_override(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"override 'train.stepz=4'.*train.stepz: unknown key"):
        load_config(path, ["train.stepz=4"])
    with pytest.raises(ConfigError, match=r"override 'rollout.temperature=0'.*must be > 0.0"):
        load_config(path, ["rollout.temperature=0"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_bool_is_not_an_int_and_none_only_where_optional():
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_config(None, ["train.steps=true"])
    with pytest.raises(ConfigError, match="optimizer.lr: expected float"):
        load_config(None, ["optimizer.lr=null"])
    assert load_config(None, ["algorithm.dual_clip=null"]).algorithm.dual_clip is None


def test_hint_template_must_have_both_fields():
    with pytest.raises(ConfigError, match=r"algorithm.guide.hint_template: must contain \{hint\}"):
        load_config(None, ["algorithm.guide.hint_template='{prompt} only'"])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    config = load_config(path)
    assert config != Config()
    dump_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_every_field_has_a_docstring():
    undocumented = [key for key, _, _, doc in describe_config() if not doc]
    assert undocumented == []


def test_configuration_reference_is_up_to_date():
    reference = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert reference.read_text() == config_reference_markdown(), "regenerate: python -m guide_mega.config > docs/..."


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_KEYS.items()))
def test_a_renamed_key_is_an_error_that_names_its_successor(old, new, tmp_path):
    with pytest.raises(ConfigError, match=rf"command-line override.*{old}: renamed to {new}"):
        load_config(None, [f"{old}=true"])
    section, _, leaf = old.rpartition(".")
    nested = leaf + ": true"
    for part in reversed(section.split(".")):
        nested = f"{part}:\n  " + nested.replace("\n", "\n  ")
    path = tmp_path / "old.yaml"
    path.write_text(nested + "\n")
    with pytest.raises(ConfigError, match=rf"{path}.*{old}: renamed to {new}"):
        load_config(path)
    value = {"algorithm.guide.off_policy_clip_low": "0.3", "algorithm.guide.off_policy_clip_high": "0.3",
             "rollout.sglang_urls": "[http://server:30000]"}.get(new, "true")  # fmt: skip
    assert load_config(None, [f"{new}={value}"])

"""The guide-mega command: doctor's report and analyze's files and errors."""

import json

import torch

from guide_mega.cli import main
from guide_mega.evaluation.passk import EvalResults, ProblemResult


def test_doctor_json_reports_hot_paths(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hot_paths"]["group_advantages"] in ("cpp", "reference")
    # On a CPU, training runs the fused loss's closed-form torch pass and the chunked LM-head logprobs.
    assert report["hot_paths"]["policy_loss"] == "closed-form torch"
    assert report["hot_paths"]["token_logprobs"] == "chunked torch"
    assert report["torch"] and "megatron-core" in report["packages"]
    # The sandbox ran a program: it names its layers (at least the resource limits), not an error.
    assert "rlimits" in report["code_sandbox"], report["code_sandbox"]


def test_training_calls_the_fused_policy_loss_that_doctor_reports():
    from guide_mega.kernels.policy_loss import policy_loss, resolve_impl
    from guide_mega.training import train_step

    assert train_step.fused_policy_loss is policy_loss
    assert resolve_impl("auto", torch.empty(0)) == "torch"


def _write(path, counts):
    EvalResults(problems=[ProblemResult(id=f"p{i}", num_samples=4, num_correct=c) for i, c in enumerate(counts)]).save(
        path
    )


def test_analyze_writes_decomposition_and_plots(tmp_path, capsys):
    _write(tmp_path / "before.json", [0, 1, 3])
    _write(tmp_path / "after.json", [3, 4, 0])
    out = tmp_path / "analysis"
    argv = ["analyze", "--before", str(tmp_path / "before.json"), "--after", str(tmp_path / "after.json")]
    assert main(argv + ["--k", "2", "--output", str(out)]) == 0
    values = json.loads((out / "decomposition.json").read_text())
    assert (values["capability_gain"], values["self_distillation"], values["forgetting"]) == (1, 1, 1)
    assert (out / "decomposition.png").exists() and (out / "pass_at_k.png").exists()
    assert "capability_gain" in capsys.readouterr().out


def test_analyze_bad_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("[]")
    assert main(["analyze", "--before", str(tmp_path / "bad.json"), "--after", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_analyze_defaults_to_the_largest_k_both_files_allow(tmp_path, capsys):
    _write(tmp_path / "before.json", [0, 1, 3])
    _write(tmp_path / "after.json", [3, 4, 0])
    argv = ["analyze", "--before", str(tmp_path / "before.json"), "--after", str(tmp_path / "after.json")]
    assert main(argv + ["--output", str(tmp_path / "analysis")]) == 0
    assert json.loads((tmp_path / "analysis" / "decomposition.json").read_text())["k"] == 4
    assert "(within reach: pass@4)" in capsys.readouterr().out


def test_analyze_k_beyond_the_samples_is_a_clear_error(tmp_path, capsys):
    _write(tmp_path / "before.json", [0, 1, 3])
    argv = ["analyze", "--before", str(tmp_path / "before.json"), "--after", str(tmp_path / "before.json")]
    assert main(argv + ["--k", "16", "--output", str(tmp_path / "analysis")]) == 2
    assert capsys.readouterr().err == (
        "guide-mega analyze: error: --k 16: must be in [1, 4] (the fewest samples of any problem in the two files)\n"
    )

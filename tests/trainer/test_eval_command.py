"""`guide-mega eval` end to end: the real HF engine on the tiny unigram Llama, the real reward pool, both hint
settings, and the files a user reads afterwards."""

import json

from guide_mega.cli import main
from guide_mega.config import dump_config
from guide_mega.evaluation.passk import EvalResults


def test_eval_writes_results_hint_lift_and_plot(tiny_run_config, unigram_model_dir, tmp_path, capsys):
    config_path = tmp_path / "eval.yaml"
    dump_config(tiny_run_config("eval"), config_path)
    output = tmp_path / "out"
    code = main(
        ["eval", "--checkpoint", str(unigram_model_dir), "--config", str(config_path), "--samples", "4",
         "--k", "1,2,4", "--hints", "both", "--limit", "5", "--output", str(output)]
    )  # fmt: skip
    assert code == 0
    plain, hinted = EvalResults.load(output / "results.json"), EvalResults.load(output / "results_hinted.json")
    assert [p.id for p in plain.problems] == [p.id for p in hinted.problems] == [f"q{i}" for i in range(5)]
    assert all(p.num_samples == 4 and p.greedy_correct is not None for p in plain.problems)
    # The unigram policy answers '1' (correct) in about a quarter of its samples, and its greedy answer is blank.
    assert 0 < sum(p.num_correct for p in plain.problems) < 20
    assert plain.greedy_pass_at_1() == 0.0
    assert plain.meta["left_out"]["beyond_limit"] == 3
    lift = json.loads((output / "hint_lift.json").read_text())
    assert lift["num_problems"] == 5 and set(lift["pass@k"]) == {"1", "2", "4"}
    assert lift["pass@k"]["4"]["lift"] == hinted.pass_at_k(4) - plain.pass_at_k(4)
    assert "| **all** |" in (output / "results.md").read_text()
    assert (output / "pass_at_k.png").stat().st_size > 0
    assert "hint lift" in capsys.readouterr().out


def test_eval_rejects_a_directory_without_a_model(tmp_path, capsys):
    data = tmp_path / "x.jsonl"
    data.write_text(json.dumps({"prompt": "Say one.", "answer": "1"}) + "\n")
    code = main(["eval", "--checkpoint", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == (
        f"guide-mega eval: error: --checkpoint {tmp_path}: not an HF model directory (no config.json there or in "
        f"{tmp_path / 'hf'}) and not a Megatron checkpoint (no guide_mega.json)\n"
    )


def test_eval_checks_its_data_before_loading_a_model(tmp_path, capsys):
    code = main(["eval", "--checkpoint", str(tmp_path), "--data", "x.jsonl", "--output", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == "guide-mega eval: error: --data: no such prompt file: x.jsonl\n"


def test_eval_refuses_a_k_beyond_its_samples(tmp_path, capsys):
    code = main(["eval", "--checkpoint", str(tmp_path), "--data", "x.jsonl", "--samples", "4", "--k", "1,8"])
    assert code == 2
    assert capsys.readouterr().err == "guide-mega eval: error: --k 1,8: every k must be in [1, --samples 4]\n"

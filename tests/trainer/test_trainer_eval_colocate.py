"""Evaluation during training (train.eval_every) and colocated mode's engine sleep/wake, on the tiny unigram Llama
with the real HF engine, reward pool and Megatron policy."""

import json

from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.evaluation.passk import EvalResults
from guide_mega.trainer import build_trainer, run_training


def test_eval_every_logs_held_out_metrics_and_keeps_results(tiny_run_config, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    rows = [{"id": f"h{i}", "prompt": f"Say one ({100 + i}).", "answer": "1"} for i in range(3)]
    rows.append({"id": "dup", "prompt": "Say one (0).", "answer": "1"})  # also a training prompt: left out
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tiny_run_config(
        "eval_run", **{"train.steps": 3, "train.eval_every": 2, "train.eval_samples": 3,
                       "data.eval_source": str(held_out), "checkpoint.every": 0}
    )  # fmt: skip
    run_training(config)
    run_dir = tmp_path / "eval_run"
    metrics = {row["step"]: row for row in read_metrics(run_dir / "metrics.jsonl")}
    assert "eval/pass@1" not in metrics[1]
    for step in (2, 3):  # every second step, and after the last
        results = EvalResults.load(run_dir / "eval" / f"step_{step}.json")
        assert sorted(p.id for p in results.problems) == ["h0", "h1", "h2"]
        assert all(p.num_samples == 3 for p in results.problems)
        assert metrics[step]["eval/pass@1"] == results.pass_at_k(1)
        assert metrics[step]["eval/pass@3"] == results.pass_at_k(3)
        assert metrics[step]["eval/num_problems"] == 3
    assert not (run_dir / "eval" / "step_1.json").exists()


def test_colocated_engine_sleeps_while_the_policy_trains(tiny_run_config):
    trainer = build_trainer(tiny_run_config("colocated", **{"train.colocate": True, "train.steps": 1}))
    engine, calls = trainer.collector.engine, []
    for name in ("generate", "sleep", "wake", "update_weights"):
        original = getattr(engine, name)
        setattr(engine, name, lambda *args, _name=name, _original=original: calls.append(_name) or _original(*args))
    policy_train = trainer.policy.train
    trainer.policy.train = lambda batch: calls.append("train") or policy_train(batch)
    try:
        trainer.fit()
    finally:
        trainer.close()
    first_train = calls.index("train")
    assert calls[first_train - 1] == "sleep" and calls[first_train + 1] == "wake"
    assert calls.index("update_weights") > calls.index("wake")
    assert "generate" not in calls[calls.index("sleep") : calls.index("wake")]

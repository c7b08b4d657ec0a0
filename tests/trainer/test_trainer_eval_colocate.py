"""Evaluation during training (train.eval_every) and colocated mode's engine sleep/wake, on the tiny unigram Llama
with the real HF engine, reward pool and Megatron policy."""

import dataclasses
import json

from guide_mega.build import build_trainer
from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.evaluation.passk import EvalResults
from guide_mega.trainer import Trainer, run_training
from guide_mega.training.checkpoint import weight_fingerprint


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
        generations = [json.loads(line) for line in (run_dir / "eval" / f"step_{step}_generations.jsonl").open()]
        sampled = [row for row in generations if not row["greedy"]]
        assert sorted(row["prompt_id"] for row in sampled) == sorted(["h0", "h1", "h2"] * 3)
        assert not any(row["guided"] for row in generations)  # held-out problems are evaluated without hints
        correct = {p.id: p.num_correct for p in results.problems}
        assert {i: sum(r["correct"] for r in sampled if r["prompt_id"] == i) for i in correct} == correct
    assert not (run_dir / "eval" / "step_1.json").exists()


class RecordingEngine:
    """The real engine, wrapped to note each call with the policy's weight fingerprint at that moment."""

    def __init__(self, engine, fingerprint):
        self.engine, self.fingerprint, self.calls = engine, fingerprint, []

    def _note(self, name):
        self.calls.append((name, self.fingerprint()))

    def generate(self, requests, sampling, *, seeds=None):
        self._note("generate")
        return self.engine.generate(requests, sampling, seeds=seeds)

    def update_weights(self, named_tensors):
        self._note("update_weights")
        return self.engine.update_weights(named_tensors)

    def sleep(self):
        self._note("sleep")
        return self.engine.sleep()

    def wake(self, *, parts):
        self._note("wake " + "+".join(parts))
        return self.engine.wake(parts=parts)

    def check_weights(self, named_tensors):
        return self.engine.check_weights(named_tensors)

    def close(self):
        return self.engine.close()


def test_colocated_engine_sleeps_while_the_policy_trains(tiny_run_config):
    """The policy's weights change only while the engine sleeps; its weights come back before the sync writes into
    them, and its KV cache after."""
    built = build_trainer(tiny_run_config("colocated", **{"train.colocate": True, "train.steps": 1}))
    engine = RecordingEngine(built.rollout.engine, lambda: weight_fingerprint(built.policy.module))
    rollout = dataclasses.replace(built.rollout, engine=engine)
    engines = dataclasses.replace(built.engines, local=engine)
    trainer = Trainer(built.config, policy=built.policy, critic=None, rollout=rollout, engines=engines,
                      run_log=built.run_log)  # fmt: skip
    try:
        trainer.fit()
    finally:
        trainer.close()
    names = [name for name, _ in engine.calls]
    sleep, wake = names.index("sleep"), names.index("wake weights")
    assert "generate" in names[:sleep] and "generate" not in names[sleep:]
    assert engine.calls[sleep][1] != engine.calls[wake][1], "the policy did not train while the engine slept"
    assert sleep < wake < names.index("update_weights") < names.index("wake kv_cache")
    assert {fingerprint for name, fingerprint in engine.calls if name == "update_weights"} == {engine.calls[wake][1]}

"""Evaluation and analysis: pass@k, the self-distillation / capability-gain decomposition, hint lift, plots."""

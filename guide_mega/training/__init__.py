"""Megatron-Core training backend (the only package that imports megatron): model build, HF <-> Megatron weight
conversion, forward-only logprobs, the Guide train step, the critic, checkpoints and the CPU shims."""

"""guide_mega: RL on verifiable rewards for reasoning LLMs with Guide, on Megatron-Core and SGLang."""

__version__ = "0.1.0"

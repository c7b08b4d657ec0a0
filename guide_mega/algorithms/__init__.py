"""Pure algorithm math (no distributed, engine or megatron imports): advantages, losses and Guide."""

"""Several processes: the frozen base sharded with FSDP2 (shard.py), with whole-tensor LoRA state for checkpoints and
export."""

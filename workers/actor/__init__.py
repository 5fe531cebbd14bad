"""The actor role: the trained policy under FSDP2 (log-probs, PPO/VLPO update, checkpoints)."""

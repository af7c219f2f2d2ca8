"""Training: optimizer, jitted steps, checkpointing, metrics, progress and the loop."""

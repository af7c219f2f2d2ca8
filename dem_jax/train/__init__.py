"""Training: optimizer, jitted steps, checkpointing and the loop."""

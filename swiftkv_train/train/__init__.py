"""Training: the distillation loop and what it needs around it (logging, checkpoints)."""

"""Training: the loop, losses, schedules, EMA, optimizers and checkpoints."""

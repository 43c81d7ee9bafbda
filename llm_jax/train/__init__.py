"""Training: optimizer, losses, pure steps, the loop that compiles them, checkpoints and run safety."""

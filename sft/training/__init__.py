"""The shared training stages: arguments, loss, trainer, interrupts, checkpoints and plots."""

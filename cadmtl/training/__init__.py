"""Training wing: arguments, the training step, task weighting, the task scheduler, optimiser helpers."""

"""Training: the trainer, optimiser schedules and EMA, callbacks, checkpoints and multi-process helpers."""

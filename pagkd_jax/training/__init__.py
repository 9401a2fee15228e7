"""Training: device mesh, optimiser, update functions, checkpoints, metric logs and the training loop."""

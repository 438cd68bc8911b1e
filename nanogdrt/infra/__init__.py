"""Plumbing around the core: train.py's options, start-up checks, the run folder and its lock,
resumable checkpoints, the training logs, data parallelism, the training step's loss scopes,
dataset preparation. The core never imports this package."""

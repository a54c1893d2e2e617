"""Training jobs: the trainer (a checkpointable Stateful), its loops, checkpoints, launch."""

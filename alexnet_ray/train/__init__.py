"""Config, the per-worker loop, Trainer.fit(), checkpoints, metrics, LR schedules."""

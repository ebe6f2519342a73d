"""Train stage: a plain per-worker loop (loop.py) that Ray Train scales (trainer.py) and torchrun can run."""

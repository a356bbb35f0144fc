"""What runs on every worker: the DDP training loop (``loop.train_gan``), its optimiser steps, losses,
augmentation (ADA), generator EMA, torch.compile wrapping and in-training evaluation."""

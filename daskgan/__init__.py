"""daskgan: train GANs with PyTorch DDP on a Dask cluster, streaming images from object storage."""

from daskgan.config import JobConfig, load_job
from daskgan.dispatch import run
from daskgan.launch import run_job
from daskgan.train import train_gan

__all__ = ["JobConfig", "load_job", "run", "run_job", "train_gan"]
__version__ = "0.1.0"

"""Training data from object storage: the dataset index and per-rank shards (``index``), decoding (``decode``),
the prefetching per-rank stream the training loop reads (``stream``), a torch ``Dataset`` for users' own loops
(``folder.S3ImageFolder``, dask-pytorch-ddp's name) and a generated shapes dataset (``synthetic``)."""

from daskgan.data.decode import DECODE_ERRORS, center_crop_resize, decode_image
from daskgan.data.folder import S3ImageFolder
from daskgan.data.index import IMAGE_SUFFIXES, ImageIndex, index_images, shard_indices
from daskgan.data.stream import Batch, ImageStream, StreamPosition

__all__ = ["DECODE_ERRORS", "IMAGE_SUFFIXES", "Batch", "ImageIndex", "ImageStream", "S3ImageFolder", "StreamPosition",
           "center_crop_resize", "decode_image", "index_images", "shard_indices"]

"""``S3ImageFolder``: dask-pytorch-ddp's map-style dataset of (PIL image, class index), on daskgan's fetch path.

For users' own DDP functions (the Saturn Cloud tutorial's shape): images under ``s3://<bucket>/<prefix>``, one
class per subfolder, read straight from the bucket with no local copy. A ``DataLoader`` that asks for whole
batches (torch calls ``__getitems__``) gets them in one concurrent fetch, as daskgan's own stream does; each
DataLoader worker process opens its own connection pool.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import fsspec
from torch.utils.data import Dataset

from daskgan.data.decode import decoding_one_image, open_image
from daskgan.data.index import index_images
from daskgan.run import storage
from daskgan.run.storage import StorageOptions


class S3ImageFolder(Dataset):
    """Images under ``s3://<s3_bucket>/<s3_prefix>``, labelled by their class folder (sorted names -> 0, 1, ...).

    ``transform`` receives the PIL image (RGB), ``target_transform`` the class index. ``anon`` reads a public
    bucket without credentials; ``storage_options`` go to s3fs (e.g. ``endpoint_url`` for MinIO or a local S3).
    """

    def __init__(self, s3_bucket: str, s3_prefix: str, transform: Callable | None = None,
                 target_transform: Callable | None = None, anon: bool = False,
                 storage_options: StorageOptions | None = None):
        self.s3_bucket, self.s3_prefix, self.anon = s3_bucket, s3_prefix.strip("/"), anon
        self.transform, self.target_transform = transform, target_transform
        self.storage_options = {**(storage_options or {}), **({"anon": True} if anon else {})}
        self.url = f"s3://{s3_bucket}/{self.s3_prefix}".rstrip("/")
        index = index_images(self.url, self.storage_options)
        self.all_files = list(index.paths)
        self.labels = list(index.labels)
        self.classes = list(index.classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self._fs: fsspec.AbstractFileSystem | None = None
        self._fs_pid: int | None = None

    def __len__(self) -> int:
        return len(self.all_files)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        """Several items from one concurrent fetch (torch's DataLoader calls this for a whole batch)."""
        paths = [self.all_files[i] for i in indices]
        fetched = storage.cat_objects(self._filesystem(), paths, on_error="raise")
        return [self._item(path, fetched[path], self.labels[i]) for path, i in zip(paths, indices)]

    def _item(self, path: str, data: bytes, label: int) -> tuple[Any, Any]:
        """The item of one image; one that does not decode raises ``UnreadableImage`` naming it."""
        with decoding_one_image(path), open_image(data) as opened:
            image = opened.convert("RGB")
        image = self.transform(image) if self.transform else image
        return image, self.target_transform(label) if self.target_transform else label

    def _filesystem(self) -> fsspec.AbstractFileSystem:
        """This process's filesystem: one made before a DataLoader forked its workers is not reused in them."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, _ = storage.filesystem(self.url, self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_fs_pid": None}

"""Tar shards written (by ``daskgan dataset``): plain ustar, uncompressed, as WebDataset writes them."""

from __future__ import annotations

import io
import tarfile


def tar_shard(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """One shard's bytes: each sample's members ``<key>.<extension>`` in order (plain ustar, uncompressed, as
    WebDataset writes them; mtime 0, so the same samples give the same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()

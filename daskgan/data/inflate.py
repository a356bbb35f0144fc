"""Inflation with a bound, for everything compressed that a dataset or a bucket hands us.

A few hundred KB of deflate inflate to hundreds of MB (a "zip bomb"; 300 KB of zip member made the stream's
process grow by 305 MiB per read), so nothing is inflated past what it declares or a fixed limit: a zip member
past its declared size or ``MAX_MEMBER_BYTES`` is skipped and counted as an unreadable image, a document
(``dataset.json``, a manifest) past ``MAX_DOCUMENT_BYTES`` is refused in one line.
"""

from __future__ import annotations

import zlib

MAX_MEMBER_BYTES = 64 * 2**20  # an encoded image: 4096 px square as an uncompressed RGB TIFF is 48 MiB
MAX_DOCUMENT_BYTES = 512 * 2**20  # a manifest or dataset.json: ~40 bytes an image, room for ~13M images
RAW_DEFLATE, GZIP = -15, 31  # zlib's window bits: a zip member's stream, gzip's (header and trailer checked)


class TooLarge(ValueError):
    """Compressed data that inflates past its bound."""


def inflate(data: bytes, limit: int, wbits: int = RAW_DEFLATE) -> bytes:
    """``data`` inflated (gzip: member after member), holding at most ``limit`` + 1 bytes of output at any time:
    ``TooLarge`` past ``limit``, ``zlib.error`` for a broken or truncated stream."""
    parts: list[bytes] = []
    remaining = limit
    while True:
        inflater = zlib.decompressobj(wbits)
        part = inflater.decompress(data, remaining + 1)
        if len(part) > remaining:
            raise TooLarge(f"inflates past {limit} bytes")
        if not inflater.eof:
            raise zlib.error("incomplete or truncated stream")
        parts.append(part)
        remaining -= len(part)
        data = inflater.unused_data
        if wbits != GZIP or not data:
            return b"".join(parts)

"""Inputs a scraped or third-party dataset may hold, built here byte by byte (issue #23, items 2 and 3):

- ``overflow_tiff``: a 260-byte BigTIFF whose strip offset is 2**63; Pillow's seek to it raises ``OverflowError``
  (checked by the tests on the installed Pillow), the class of error a fuzzed TIFF met in the issue;
- ``eps_named_png``: an EPS document, which Pillow renders by running Ghostscript (``gs`` from PATH);
- ``stub_gs``: a ``gs`` that only notes that it ran;
- ``zip_bomb``: an NVlabs-style zip (``00000/img00000000.png``, ..., ``dataset.json``) of ~300 KB, one member of
  which inflates to 300 MiB, built from one deflate block repeated (a compressor takes seconds for it).
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image

SHORT, LONG, LONG8 = 3, 4, 16  # TIFF field types


def overflow_tiff() -> bytes:
    """A 4 x 4 RGB BigTIFF, one strip, whose StripOffsets is 2**63."""
    pixels = bytes(4 * 4 * 3)
    tags = [(256, LONG, 4), (257, LONG, 4), (258, SHORT, 8), (259, SHORT, 1), (262, SHORT, 2),
            (273, LONG8, 2**63), (277, SHORT, 3), (278, LONG, 4), (279, LONG8, len(pixels))]
    ifd = 16 + len(pixels)
    header = b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd)
    entries = b"".join(struct.pack("<HHQQ", tag, kind, 1, value) for tag, kind, value in tags)
    return header + pixels + struct.pack("<Q", len(tags)) + entries + struct.pack("<Q", 0)


def eps_named_png() -> bytes:
    """An 8 x 8 point EPS drawing (what Pillow hands to Ghostscript)."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
            b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def stub_gs(folder: Path) -> tuple[Path, Path]:
    """A folder holding a ``gs`` that appends its arguments to a note; returns (the folder, the note)."""
    folder.mkdir(parents=True, exist_ok=True)
    note = folder / "gs-ran.txt"
    gs = folder / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {note}\nexit 0\n')
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder, note


def path_with(folder: Path) -> str:
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def png(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, (value * 7) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def zeros_deflated(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``mib`` MiB of zeros and its CRC-32: one fully flushed block per MiB, the same
    bytes each time (a full flush forgets the window, so the blocks do not depend on each other)."""
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    flushed = block.compress(bytes(2**20)) + block.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(bytes(2**20), crc)
    return flushed * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush(), crc


def zip_archive(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of (name, stored bytes, method, CRC-32, uncompressed size) members, as zipfile writes one."""
    body, directory = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        encoded = name.encode()
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                                 len(encoded), 0, 0, 0, 0, 0, len(body)) + encoded
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), size,
                            len(encoded), 0) + encoded + data
    count = len(members)
    return bytes(body + directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory),
                                                len(body), 0))


def zip_bomb(good: int = 6, bomb_mib: int = 300, declared: int | None = None,
             extra: dict[str, bytes] | None = None) -> bytes:
    """An NVlabs-style zip: ``good`` PNGs, then one deflated member inflating to ``bomb_mib`` MiB (its declared
    size ``declared`` when given: a bomb that lies about its size), the ``extra`` members and ``dataset.json``
    (unlabelled); all but the bomb stored, as NVlabs' tool stores them."""
    stored = {f"00000/img{i:08d}.png": png(i * 40) for i in range(good)}
    bomb, crc = zeros_deflated(bomb_mib)
    bombed = (f"00000/img{good:08d}.png", bomb, zipfile.ZIP_DEFLATED, crc,
              declared if declared is not None else bomb_mib * 2**20)
    stored.update({**(extra or {}), "dataset.json": json.dumps({"labels": None}).encode()})
    entries = [(name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)) for name, data in stored.items()]
    return zip_archive(entries[:good] + [bombed] + entries[good:])

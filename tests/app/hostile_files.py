"""Hostile dataset files, built fast by hand: zip archives written entry by entry (zipfile
takes ~16 s for 400,000 members) and deflate streams of zeros that inflate to any size
from a compressed piece repeated (compressing a GiB of zeros takes seconds)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

ZEROS = 16 << 20


@dataclass
class Member:
    name: str
    data: bytes | list[bytes]  # as stored (compressed when deflated)
    crc: int
    size: int  # unpacked
    method: int = zipfile.ZIP_STORED

    @property
    def stored_size(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else sum(map(len, self.data))


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


def stored(name: str, data: bytes) -> Member:
    return Member(name, data, zlib.crc32(data), len(data))


def deflated_zeros(name: str, dtype: str, rows: int) -> Member:
    """An .npy member of `rows` zeros, deflated: a few KiB a GiB."""
    header = npy_header(dtype, (rows,))
    total = rows * np.dtype(dtype).itemsize
    assert total % ZEROS == 0
    block = bytes(ZEROS)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    # a full flush resets the compressor, so each block of zeros compresses the same
    pieces = [deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)]
    piece = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(header)
    for _ in range(total // ZEROS):
        pieces.append(piece)
        crc = zlib.crc32(block, crc)
    pieces.append(deflate.flush())
    return Member(name, pieces, crc, len(header) + total, zipfile.ZIP_DEFLATED)


def zip_archive(members: Iterable[Member]) -> bytes:
    """A zip of `members`, with zip64 end records when there are more than 65,535."""
    out: list[bytes] = []
    index: list[bytes] = []
    offset = 0
    count = 0
    for m in members:
        name = m.name.encode()
        local = struct.pack(
            zipfile.structFileHeader,
            zipfile.stringFileHeader,
            20,
            0,
            0,
            m.method,
            0,
            0x21,
            m.crc,
            m.stored_size,
            m.size,
            len(name),
            0,
        )
        out += [local, name, *([m.data] if isinstance(m.data, bytes) else m.data)]
        index.append(
            struct.pack(
                zipfile.structCentralDir,
                zipfile.stringCentralDir,
                20,
                3,
                20,
                0,
                0,
                m.method,
                0,
                0x21,
                m.crc,
                m.stored_size,
                m.size,
                len(name),
                0,
                0,
                0,
                0,
                0o644 << 16,
                offset,
            )
            + name
        )
        offset += len(local) + len(name) + m.stored_size
        count += 1
    directory = b"".join(index)
    tail = []
    if count > 0xFFFF:
        tail.append(
            struct.pack(
                zipfile.structEndArchive64,
                zipfile.stringEndArchive64,
                44,
                45,
                45,
                0,
                0,
                count,
                count,
                len(directory),
                offset,
            )
        )
        tail.append(
            struct.pack(
                zipfile.structEndArchive64Locator,
                zipfile.stringEndArchive64Locator,
                0,
                offset + len(directory),
                1,
            )
        )
    shown = min(count, 0xFFFF)
    tail.append(
        struct.pack(
            zipfile.structEndArchive,
            zipfile.stringEndArchive,
            0,
            0,
            shown,
            shown,
            len(directory),
            offset,
            0,
        )
    )
    return b"".join([*out, directory, *tail])


def many_members(count: int) -> bytes:
    """An NPZ of `count` one-byte arrays."""
    data = io.BytesIO()
    np.save(data, np.zeros(1, np.int8))
    member = data.getvalue()
    crc = zlib.crc32(member)
    return zip_archive(Member(f"a{i}.npy", member, crc, len(member)) for i in range(count))


def wide_csv(columns: int) -> bytes:
    header = ",".join(f"c{i}" for i in range(columns))
    row = ",".join("0" for _ in range(columns))
    return f"{header}\n{row}\n".encode()

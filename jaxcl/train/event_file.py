"""TensorBoard's event file, written directly: TFRecord framing around hand-encoded ``Event`` protos.

tensorboardX writes the same bytes, but importing any part of it imports torch where torch is
installed (``tensorboardX.writer`` tries ``import torch`` when the package loads): seconds of every
run on a GPU machine whose image has torch, for a file of a few hundred scalars. The format is
small and fixed (TensorBoard reads files written in 2016):

  file    = record*; the first record is ``Event(wall_time, file_version="brain.Event:2")``
  record  = uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
            (little-endian; ``masked(c) = ((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32``)
  Event   = wall_time (1: double), step (2: int64), file_version (3: string), summary (5: Summary),
            session_log (7: SessionLog {status (1: enum; START = 1)})
  Summary = value (1: repeated Value {tag (1: string), simple_value (2: float),
            image (4: Image {height (1), width (2), colorspace (3), encoded_image_string (4: bytes)})})

References:
  tensorflow/core/util/event.proto, tensorflow/core/framework/summary.proto,
  tensorflow/core/lib/io/record_writer.cc (the framing and the CRC mask).
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Optional


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # the Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``.

    Examples:
      >>> hex(crc32c(b"123456789"))  # the standard check value
      '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord around ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# -- protocol buffer encoding (the few wire types the messages above use) ---------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def scalar(tag: str, value: float) -> bytes:
    """A ``Summary.Value`` holding a scalar."""
    return _bytes(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value)


def png_image(tag: str, png: bytes) -> bytes:
    """A ``Summary.Value`` holding a PNG image (its size read from the PNG's header)."""
    width, height = struct.unpack(">II", png[16:24])
    image = _int(1, height) + _int(2, width) + _int(3, 4) + _bytes(4, png)  # colorspace 4: RGBA
    return _bytes(1, tag.encode()) + _bytes(4, image)


def event(step: int, *, values: tuple[bytes, ...] = (), restart: bool = False,
          file_version: Optional[str] = None, wall_time: Optional[float] = None) -> bytes:
    """An ``Event`` at ``step``: a ``Summary`` of ``values``, a ``SessionLog.START`` (``restart``) or
    the file's version header."""
    data = _key(1, 1) + struct.pack("<d", time.time() if wall_time is None else wall_time) + _int(2, step)
    if file_version is not None:
        data += _bytes(3, file_version.encode())
    if values:
        data += _bytes(5, b"".join(_bytes(1, v) for v in values))
    if restart:
        data += _bytes(7, _int(1, 1))
    return data


class EventFile:
    """An event file ``<folder>/events.out.tfevents.<seconds>.<host><suffix>`` (TensorBoard's name)."""

    def __init__(self, folder: str, suffix: str = ""):
        self.path = os.path.join(folder, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}{suffix}")
        self._file = open(self.path, "wb")
        self.write(event(0, file_version="brain.Event:2"))

    def write(self, data: bytes) -> None:
        self._file.write(record(data))

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

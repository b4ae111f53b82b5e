"""The download's `Chunk` message (index, data) on the wire, written and read by hand at both ends.

It is the one message that carries the bundle's gigabytes. Building a protobuf message and serializing
it copies the data twice, and parsing one then reading `.data` copies it twice more; by hand the server
copies once (the header joined to the data) and the client not at all (a view into the received bytes).
The encoding is protobuf's own (`pb.Chunk`); a message in any other valid layout is parsed by protobuf."""
from __future__ import annotations

from typing import NamedTuple

from offsite.protos.offsite.v1 import coordinator_pb2 as pb

_INDEX, _DATA = 0x08, 0x12   # field 1 varint, field 2 length-delimited


class Chunk(NamedTuple):
    index: int
    data: memoryview | bytes


def encode(index: int, data: bytes) -> bytes:
    """pb.Chunk(index=index, data=data).SerializeToString(), with one copy of the data."""
    return (bytes([_INDEX]) + _varint(index) if index else b"") + bytes([_DATA]) + _varint(len(data)) + data


def decode(raw: bytes) -> Chunk:
    """The chunk in `raw`: a view of its data where it is laid out as `encode` writes it, else protobuf's parse."""
    view, at, index = memoryview(raw), 0, 0
    if raw[:1] == bytes([_INDEX]):
        index, at = _read_varint(view, 1)
    if at is not None and raw[at : at + 1] == bytes([_DATA]):
        size, start = _read_varint(view, at + 1)
        if start is not None and start + size == len(raw):
            return Chunk(index, view[start:])
    message = pb.Chunk.FromString(raw)
    return Chunk(message.index, message.data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(view: memoryview, at: int) -> tuple[int, int | None]:
    """(value, position after it); position None where no complete varint of at most 10 bytes starts at `at`."""
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(view):
            return 0, None
        byte = view[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
    return 0, None

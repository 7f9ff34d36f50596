"""What hostile clients send, made cheaply: for the tests and benchmarks of ``ctsam3d serve``."""

import struct
import zlib


def zlib_bomb(total_bytes: int, chunk_bytes: int = 16 << 20) -> bytes:
    """A valid zlib stream of ``total_bytes`` zeros in about 1 kB per MB, made without building the zeros:
    after a full flush, every further chunk of zeros compresses to the same bytes, so one is repeated."""
    chunk = bytes(chunk_bytes)
    count = total_bytes // chunk_bytes
    compressor = zlib.compressobj(9)
    first = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    middle = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH) == middle
    last = compressor.compress(chunk) + compressor.flush()
    checksum = 1
    for _ in range(count):
        checksum = zlib.adler32(chunk, checksum)
    return first + middle * (count - 2) + last[:-4] + struct.pack(">I", checksum)

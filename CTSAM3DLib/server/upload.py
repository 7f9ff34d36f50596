"""Receiving an uploaded array: inflated while it streams in, straight into a buffer of its stated size.

The compressed body is never kept whole, and nothing is inflated past the stated size: an upload costs
its array's bytes plus one bounded chunk, whatever the client sends (a 1 MB zlib body stating 1 GiB of
zeros used to cost 1.45 GB while it was inflated, and was refused only at the end).
"""

from __future__ import annotations

import math
import zlib
from typing import AsyncIterator, Tuple

import numpy as np
from starlette.concurrency import run_in_threadpool

from .. import protocol

INFLATE_STEP_BYTES = 8 << 20
"""Most bytes one step of inflating produces (a small compressed chunk may stand for a gigabyte)."""



def upload_overhead_bytes(raw_bytes: int) -> int:
    """What receiving an upload holds besides its array: the step being inflated and the chunk being read."""
    return min(raw_bytes + 1, INFLATE_STEP_BYTES) + (1 << 20)


class _Inflation:
    """A zlib stream inflated into ``buffer``, hashed as ``protocol.array_digest`` hashes the array."""

    def __init__(self, dtype: np.dtype, shape: Tuple[int, int, int]) -> None:
        self.expected = math.prod(shape) * dtype.itemsize
        self.buffer = np.empty(self.expected, dtype=np.uint8)
        self.filled = 0
        self.digest = protocol.digest_start(dtype, shape)
        self._inflater = zlib.decompressobj()

    def feed(self, chunk: bytes) -> None:
        while chunk:
            room = self.expected - self.filled
            try:
                data = self._inflater.decompress(chunk, min(room + 1, INFLATE_STEP_BYTES))
            except zlib.error as error:
                raise protocol.WireError(f"the body is not zlib-compressed data ({error})") from error
            if len(data) > room:
                raise protocol.WireError(f"the body decompresses to more than the {self.expected} bytes its dtype and "
                                     "shape state", status=413, kind=protocol.KIND_TOO_LARGE)
            self.buffer[self.filled:self.filled + len(data)] = np.frombuffer(data, dtype=np.uint8)
            self.digest.update(data)
            self.filled += len(data)
            chunk = self._inflater.unconsumed_tail
            if self._inflater.eof and self._inflater.unused_data:
                raise protocol.WireError(
                    f"{len(self._inflater.unused_data)} bytes follow the end of the compressed body")

    def finish(self) -> str:
        """The array's digest, once the stream ended with exactly the stated bytes."""
        if not self._inflater.eof:
            raise protocol.WireError(
                f"the compressed body is truncated: it gives {self.filled} of {self.expected} bytes")
        if self.filled != self.expected:
            raise protocol.WireError(f"the body decompresses to {self.filled} bytes, but its dtype and shape make "
                                 f"{self.expected}")
        return self.digest.hexdigest()


async def receive_array(chunks: AsyncIterator[bytes], dtype: np.dtype, shape: Tuple[int, int, int],
                        digest: str, compressed_limit: int) -> np.ndarray:
    """The array a compressed body streams in, once it inflates to exactly its stated size and has the
    digest it is named by; WireError (400, or 413 past ``compressed_limit`` bytes or the stated size)
    otherwise. Inflating runs off the event loop."""
    inflation = _Inflation(dtype, shape)
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > compressed_limit:
            raise protocol.WireError(f"the body exceeds the {compressed_limit} bytes this request takes", status=413,
                                 kind=protocol.KIND_TOO_LARGE)
        if chunk:
            await run_in_threadpool(inflation.feed, chunk)
    found = await run_in_threadpool(inflation.finish)
    if found != digest:
        raise protocol.WireError(f"the upload's SHA-256 (of its voxels, dtype and shape) is {found}, not the {digest} "
                             "it was sent as")
    return inflation.buffer.view(dtype).reshape(shape)

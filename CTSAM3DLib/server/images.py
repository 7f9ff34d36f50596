"""Uploaded arrays and the images sessions run on, each counted in the memory budget once.

``ImageCache`` keeps uploads by digest for later sessions (least recently used dropped first, also when
the budget needs room). ``SessionImages`` gives every session on the same upload and geometry the same
``SimpleITK.Image``, which sessions only read: 32 sessions on one scan hold it once, not 32 times.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .budget import MemoryBudget, Reservation


@dataclass
class _Cached:
    array: np.ndarray
    reservation: Reservation


class ImageCache:
    """Uploaded arrays by digest, the least recently used dropped once they hold more than
    ``capacity_bytes`` (the newest always stays, so that an image larger than the cache can still open a
    session), or when the budget needs room (``reclaim``)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._arrays: OrderedDict[str, _Cached] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._arrays)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def get(self, digest: str) -> Optional[np.ndarray]:
        with self._lock:
            cached = self._arrays.get(digest)
            if cached is None:
                return None
            self._arrays.move_to_end(digest)
            return cached.array

    def put(self, digest: str, array: np.ndarray, reservation: Reservation) -> None:
        """Keeps ``array`` (its bytes reserved in the budget by ``reservation``, which it now holds)."""
        array.flags.writeable = False
        with self._lock:
            dropped = [self._pop(digest)]
            self._arrays[digest] = _Cached(array, reservation)
            self._bytes += array.nbytes
            while self._bytes > self.capacity_bytes and len(self._arrays) > 1:
                dropped.append(self._pop(next(iter(self._arrays))))
        self._release(dropped)

    def reclaim(self, nbytes: int) -> int:
        """Drops the least recently used arrays until ``nbytes`` are freed (or none is left); returns the
        bytes freed. Sessions hold their own images (``SessionImages``), so nobody loses anything but the
        chance to skip an upload."""
        dropped = []
        with self._lock:
            while self._arrays and sum(item.array.nbytes for item in dropped) < nbytes:
                dropped.append(self._pop(next(iter(self._arrays))))
        self._release(dropped)
        return sum(item.array.nbytes for item in dropped)

    def _pop(self, digest: str) -> Optional[_Cached]:
        cached = self._arrays.pop(digest, None)
        if cached is not None:
            self._bytes -= cached.array.nbytes
        return cached

    @staticmethod
    def _release(dropped: list) -> None:
        for cached in dropped:
            if cached is not None:
                cached.reservation.release()


@dataclass
class _Shared:
    image: sitk.Image
    reservation: Reservation
    users: int = 0


@dataclass
class SessionImages:
    """Read-only ``SimpleITK.Image``s shared by the sessions that use the same array with the same
    geometry, each reserved in ``budget`` while some session holds it."""

    budget: MemoryBudget
    _images: Dict[Hashable, _Shared] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, key: Hashable, nbytes: int,
                make: Callable[[], sitk.Image]) -> Tuple[sitk.Image, Callable[[], None]]:
        """The image for ``key`` (made by ``make`` the first time, after ``nbytes`` were reserved for it) and
        the function that gives it back; OverBudgetError when it is not held and does not fit."""
        with self._lock:
            shared = self._images.get(key)
            if shared is not None:
                shared.users += 1
                return shared.image, self._giver(key)
        reservation = self.budget.reserve(nbytes, "the session's copy of the image")
        try:
            image = make()
        except BaseException:
            reservation.release()
            raise
        with self._lock:
            shared = self._images.get(key)
            if shared is None:
                shared = self._images[key] = _Shared(image, reservation)
            else:  # made meanwhile by another session: take that one
                reservation.release()
            shared.users += 1
            return shared.image, self._giver(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    def _giver(self, key: Hashable) -> Callable[[], None]:
        given = threading.Event()

        def give_back() -> None:
            if given.is_set():
                return
            given.set()
            with self._lock:
                shared = self._images[key]
                shared.users -= 1
                if shared.users:
                    return
                del self._images[key]
            shared.reservation.release()

        return give_back

"""Page-aligned, reusable buffers and two C-speed tests on them (address, all zero).

A backup reads each chunk into a buffer lent from a pool; a restore decompresses
each chunk into one (``mmap``, so page-aligned) and writes the data from there with
``O_DIRECT``. No copy, and no fresh memory per chunk: on this kind of machine a
first-touch page fault costs more than a copy of the page.
Python can compare ``bytes`` at memcmp speed but not a ``memoryview`` (20 times
slower, GIL held), so the zero test on a writable buffer calls libc's
``memcmp`` through ctypes, which lets go of the GIL.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections.abc import Iterator

_ZEROES_LEN = 4 << 20
_zeroes = ctypes.create_string_buffer(_ZEROES_LEN)  # zero-filled
_ZEROES_AT = ctypes.addressof(_zeroes)
LIBC = ctypes.CDLL(None, use_errno=True)  # the one handle on libc (fresh.py: fallocate)
_memcmp = LIBC.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_zero_bytes: dict[int, bytes] = {}


def address(view: memoryview) -> int | None:
    """The memory address of a writable buffer's first byte; None when read-only
    (or empty)."""
    if view.readonly or not view.c_contiguous or not view.nbytes:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte is zero, at memcmp speed whatever the buffer's type."""
    if isinstance(data, memoryview):
        view = data.cast("B")
        at = address(view)
        if at is not None:
            return _zero_memory(at, len(view))
        data = view.tobytes()
    zero = _zero_bytes.get(len(data))
    if zero is None:
        zero = _zero_bytes.setdefault(len(data), bytes(len(data)))
    return data == zero


def _zero_memory(at: int, n: int) -> bool:
    done = 0
    while done < n:
        step = min(n - done, _ZEROES_LEN)
        if _memcmp(at + done, _ZEROES_AT, step):
            return False
        done += step
    return True


class BufferPool:
    """Page-aligned buffers of one size that go round: lent for one chunk, given back
    after, and kept for the next job (at most ``keep`` of them) — fresh memory costs
    more in page faults than a copy, and costs it again in every backup."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = size, keep
        self._free: list[memoryview] = []
        self._lock = threading.Lock()

    def take(self) -> memoryview:
        with self._lock:
            if self._free:
                return self._free.pop()
        return memoryview(mmap.mmap(-1, self.size))

    def give(self, view: memoryview) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(view)

    @contextlib.contextmanager
    def lend(self) -> Iterator[memoryview]:
        view = self.take()
        try:
            yield view
        finally:
            self.give(view)


_pools: dict[int, BufferPool] = {}
_pools_lock = threading.Lock()


def shared_pool(size: int, keep: int) -> BufferPool:
    """The process's pool of ``size``-byte buffers (keeping at least ``keep``)."""
    with _pools_lock:
        pool = _pools.setdefault(size, BufferPool(size, keep))
        pool.keep = max(pool.keep, keep)
        return pool


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_kept = False


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep what is freed instead of handing it back to the
    kernel at once: every compressed chunk is a fresh 1–4 MiB object, and with the
    default (dynamic) thresholds each one came from fresh pages, faulted in one by one
    (10 % of an incremental backup's CPU here). Once per process."""
    global _kept
    if not _kept:
        _kept = True
        LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
        LIBC.mallopt(_M_TRIM_THRESHOLD, 256 << 20)

"""Page-aligned, reusable buffers and two C-speed tests on them (address, all zero).

A restore decompresses each chunk into its worker's own buffer (``mmap``, so
page-aligned) and writes the data from there with ``O_DIRECT``, with no copy
and no fresh memory per chunk (first-touch page faults cost more than a copy).
Python can compare ``bytes`` at memcmp speed but not a ``memoryview`` (20 times
slower, GIL held), so the zero test on a writable buffer calls libc's
``memcmp`` through ctypes, which lets go of the GIL.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

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


class ThreadBuffers:
    """One page-aligned buffer of ``size`` bytes per thread, kept for reuse."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()

    def get(self) -> memoryview:
        view: memoryview | None = getattr(self._local, "view", None)
        if view is None:
            view = self._local.view = memoryview(mmap.mmap(-1, self.size))
        return view

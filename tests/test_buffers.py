"""The zero test and aligned buffers that restores write from (unit tests of logic)."""

from __future__ import annotations

import pytest

from snapback.drivers.buffers import ThreadBuffers, address, is_zero


@pytest.mark.parametrize("size", [1, 4095, 64 << 10, 4 << 20, (4 << 20) + 3, 9 << 20])
def test_is_zero_finds_any_non_zero_byte_in_every_kind_of_buffer(size: int) -> None:
    view = memoryview(bytearray(size))
    kinds = (lambda v: v, lambda v: bytes(v), lambda v: bytearray(v), lambda v: v.toreadonly())
    for kind in kinds:
        assert is_zero(kind(view))
    for at in {0, size // 2, size - 1}:
        view[at] = 7
        for kind in kinds:
            assert not is_zero(kind(view)), (size, at)
        assert is_zero(view[:at]) and is_zero(view[at + 1 :])  # slices see only their part
        view[at] = 0


def test_thread_buffers_are_page_aligned_writable_and_reused() -> None:
    bufs = ThreadBuffers(4 << 20)
    view = bufs.get()
    at = address(view)
    assert at is not None and at % 4096 == 0 and len(view) == 4 << 20
    assert bufs.get() is view  # the same thread gets its buffer again
    assert address(memoryview(b"read-only")) is None

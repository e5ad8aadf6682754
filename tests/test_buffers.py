"""The zero test and aligned buffers that restores write from (unit tests of logic)."""

from __future__ import annotations

import pytest

from snapback.drivers.buffers import BufferPool, address, is_zero, shared_pool


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


def test_pooled_buffers_are_page_aligned_writable_reused_and_bounded() -> None:
    pool = BufferPool(4 << 20, keep=2)
    with pool.lend() as view:
        at = address(view)
        assert at is not None and at % 4096 == 0 and len(view) == 4 << 20
        with pool.lend() as other:
            assert other is not view  # lent out: never to two at once
    with pool.lend() as again:
        assert again is view or again is other  # given back, lent again
    many = [pool.take() for _ in range(5)]
    assert len({id(v) for v in many}) == 5
    for v in many:
        pool.give(v)
    assert len([pool.take() for _ in range(2)]) == 2 and not pool._free  # keeps 2
    assert shared_pool(1 << 20, 3) is shared_pool(1 << 20, 1)
    assert address(memoryview(b"read-only")) is None

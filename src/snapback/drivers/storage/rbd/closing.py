"""Images are closed a moment after their open, never at once.

librbd 16.2 (Debian 12's) has a use-after-free in ``ImageState::complete_action_unlock``:
the librados thread that completes an open wakes the thread waiting in ``rbd_open``,
then takes the image's lock again. When the opener has meanwhile used and closed the
image (a short open, use, close on a busy machine), that lock is freed memory, locking
it fails with EINVAL, and the process aborts: "terminate called after throwing an
instance of 'std::system_error' what(): Invalid argument". Stress runs here hit it
about once in 300 open-snapshot-clone-flatten-delete cycles, CI about once in a few
runs (found with a core dump and a throw hook; see docs/rbd-pool.md).

So no image is closed younger than a grace time. One opened read-only and younger
than ``GRACE_S`` is kept on a list instead; later opens close the ones that have come
of age, and whatever needs an image to have no watcher (remove, rename, move to the
trash) first waits for that image's own to come of age and closes them (``settle``).
The process's exit settles all of them before the cluster handle shuts down. One
opened for writing may own the image's exclusive lock, which a rollback elsewhere
cannot take from it: its close waits out ``GRACE_RW_S`` instead (most writes take
longer than that anyway).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GRACE_S = 0.5
GRACE_RW_S = 0.1


@dataclass(frozen=True, eq=False)
class _Late:
    due: float
    key: tuple[str, ...]
    image: Any


_lock = threading.Lock()
_late: list[_Late] = []


def close(image: Any, opened_at: float, key: tuple[str, ...], *, read_only: bool) -> None:
    """Close ``image`` (opened at ``opened_at``, monotonic) once it is safe to."""
    now = time.monotonic()
    if not read_only:
        time.sleep(max(0.0, opened_at + GRACE_RW_S - now))
        _close(image)
    elif now >= opened_at + GRACE_S:
        _close(image)
    else:
        with _lock:
            _late.append(_Late(opened_at + GRACE_S, key, image))
    reap()


def reap() -> None:
    """Close the kept images that have come of age (cheap; called on every open)."""
    _settle(lambda item, now: item.due <= now, wait=False)


def settle(key: tuple[str, ...] | None = None) -> None:
    """Close every kept image of ``key`` (all when None), waiting until they are safe."""
    _settle(lambda item, now: key is None or item.key == key or item.due <= now, wait=True)


def _settle(pick: Callable[[_Late, float], bool], *, wait: bool) -> None:
    now = time.monotonic()
    taken: list[_Late] = []
    with _lock:
        if not _late:
            return
        kept: list[_Late] = []
        for item in _late:
            (taken if pick(item, now) else kept).append(item)
        _late[:] = kept
    if wait and taken:
        time.sleep(max(0.0, max(i.due for i in taken) - now))
    for item in taken:
        _close(item.image)


def _close(image: Any) -> None:
    import rbd

    with contextlib.suppress(rbd.Error):  # closing has nothing left to report to
        image.close()

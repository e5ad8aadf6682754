"""Change tracking of local volumes with persistent qcow2 dirty bitmaps.

A backup starts a bitmap on the volume's head layer (``qemu-img bitmap --add
--enable``); QEMU then marks every write to that file, whether a stopped
volume is written by snapback or a running guest writes through libvirt.
Taking a snapshot makes a new head: the bitmaps of the old head are started
again on the new one, so the record of changes is the union of the bitmap over
the run of layers, from the head down, that carry it. Merging a removed
snapshot's layer writes through QEMU too, so the layer written to marks what
it received (more than changed, never less). A rollback makes a head without
them: tracking is lost there, and the next backup says so and compares hashes.

A bitmap flagged ``in-use`` in a file nobody has open was not stored cleanly
(QEMU died): it may miss writes, so it counts as lost.

A backup of a stopped volume reads its head and starts the next bitmap at one
point in time: the volume's lock is held from before the read to after the
bitmap, so nothing writes in between, and the ``qemu-img bitmap --add`` runs on
a thread while the head is read (``open_tracking``) instead of before it, as
does the ``--remove`` of the bitmap the chain no longer needs (the parent's
parent's): 12 to 17 ms each, about 5 % each of an incremental of the bench
disk. The read waits for that thread before QEMU opens the chain itself
(qemu-nbd for compressed clusters: the two would not share the file's lock).

The bitmaps of a layer are read from the file itself (imagefmt/qcow2_bitmaps.py,
a millisecond instead of a qemu-img and a qemu-nbd per layer); whatever that
reader does not expect is asked of QEMU instead.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from snapback.domain.errors import ToolFailed
from snapback.drivers.imagefmt import qcow2_bitmaps, qemu_img
from snapback.drivers.storage.base import TRACKER_PREFIX, BlockHandle
from snapback.drivers.storage.local import direct
from snapback.drivers.storage.local.meta import VolumeMeta
from snapback.drivers.storage.nbd import dirty_extents

if TYPE_CHECKING:
    from snapback.drivers.storage.local.pool import LocalPool


def start(head: Path, name: str) -> None:
    """Add the bitmap; already there (a recovery running this again) is fine. The
    usual case costs one qemu-img call, the rare one a look at the bitmaps."""
    try:
        qemu_img.bitmap(str(head), name, add=True)
    except ToolFailed:
        if name not in qemu_img.bitmaps(str(head)):
            raise


def open_tracking(
    head: Path, name: str, waits: contextlib.ExitStack, *, drop: Sequence[str] = ()
) -> BlockHandle:
    """The chain ending in ``head`` read-only, and bitmap ``name`` started on ``head``
    (the bitmaps in ``drop`` removed) while it is read. The wait for that, which
    raises what stopped it, goes on ``waits``, which the caller closes after the
    handle and before the volume's lock."""

    def bitmaps() -> None:
        start(head, name)
        have = _bitmaps(head) if drop else {}
        for old in drop:
            if old in have:
                stop(head, old)

    job = _Job(bitmaps)
    reader = direct.open_mapped(str(head), before_qemu=job.wait)
    if reader is None:  # QEMU reads this chain and holds its lock: the bitmaps first
        bitmaps()
        return direct.open_read_only(str(head))
    job.begin()
    waits.callback(job.wait)
    return reader


class _Job:
    """One call on a thread of its own; ``wait`` joins it and raises its error once."""

    def __init__(self, work: Callable[[], None]) -> None:
        self._work = work
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bitmap", daemon=True)

    def begin(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # handed to the thread that waits
            self._error = exc

    def wait(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


def stop(head: Path, name: str) -> None:
    """Remove the bitmap; already gone is fine."""
    try:
        qemu_img.bitmap(str(head), name, add=False)
    except ToolFailed:
        if name in qemu_img.bitmaps(str(head)):
            raise


def carry(source: Path, target: Path) -> None:
    """Start ``source``'s snapback bitmaps on ``target`` too (a new head on top of a
    frozen layer, or the layer a merge is about to write a head's data into)."""
    ours = [
        name
        for name, flags in qemu_img.bitmaps(str(source)).items()
        if name.startswith(TRACKER_PREFIX) and "in-use" not in flags
    ]
    if not ours:  # the usual case: one qemu-img info, nothing more
        return
    have = qemu_img.bitmaps(str(target))
    for name in ours:
        if name not in have:
            qemu_img.bitmap(str(target), name, add=True)


def names(head: Path) -> list[str]:
    """The snapback bitmaps of the head layer."""
    return sorted(n for n in _bitmaps(head) if n.startswith(TRACKER_PREFIX))


def changes(pool: LocalPool, meta: VolumeMeta, name: str) -> list[tuple[int, int]] | None:
    """Union of bitmap ``name`` over the layers carrying it, head first; None if lost."""
    found: list[tuple[int, int]] = []
    layer: str | None = meta.head
    first = True
    while layer is not None and layer in meta.layers:
        path = pool.layer_path(meta.name, layer)
        flags = _bitmaps(path).get(name)
        if flags is None:
            if first:
                return None
            break
        if "in-use" in flags or (first and "auto" not in flags):
            return None
        found += _dirty(path, name)
        first = False
        layer = meta.layers[layer]
    return merge(found)


def _bitmaps(path: Path) -> dict[str, list[str]]:
    try:
        return {n: b.flags for n, b in qcow2_bitmaps.read_bitmaps(str(path)).items()}
    except (qcow2_bitmaps.Unreadable, UnicodeDecodeError, OSError, struct.error):
        return qemu_img.bitmaps(str(path))


def _dirty(path: Path, name: str) -> list[tuple[int, int]]:
    try:
        return qcow2_bitmaps.dirty_ranges(str(path), name)
    except (qcow2_bitmaps.Unreadable, UnicodeDecodeError, OSError, struct.error):
        return dirty_extents(str(path), name)


def merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start_, length in sorted(extents):
        if out and start_ <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], start_ + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start_, length))
    return out

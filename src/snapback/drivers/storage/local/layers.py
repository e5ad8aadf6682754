"""Layer-file mechanics of the local pool: merging a removed snapshot's layer,
flattening, exporting, and finding what a crash left behind.

Each multi-step change first records ``meta.pending`` and is written so that
running it again after a crash finishes it (see ``finish_pending``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from snapback.domain.errors import Conflict, StorageError
from snapback.domain.models import DiskFormat
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.storage.base import BlockHandle, Debris, ProgressFn
from snapback.drivers.storage.local import tracking
from snapback.drivers.storage.local.meta import LOCK, META, Pending, VolumeMeta, flock, load

if TYPE_CHECKING:
    from snapback.drivers.storage.local.pool import LocalPool

FLATTEN_SUFFIX = ".flatten.tmp"
READ_ONLY = 0o444
WRITABLE = 0o644


def new_layer_id() -> str:
    return "l-" + uuid.uuid4().hex[:16]


class LockedHandle(BlockHandle):
    """A block handle that holds its volume's lock until closed."""

    def __init__(self, inner: BlockHandle, stack: contextlib.ExitStack) -> None:
        self._inner, self._stack = inner, stack
        self.parallel_writes = inner.parallel_writes
        self.parallel_reads = inner.parallel_reads

    @property
    def size(self) -> int:
        return self._inner.size

    def read(self, offset: int, length: int) -> bytes:
        return self._inner.read(offset, length)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        self._inner.read_into(offset, buf)

    def write(self, offset: int, data: bytes) -> None:
        self._inner.write(offset, data)

    def write_view(self, offset: int, data: memoryview) -> None:
        self._inner.write_view(offset, data)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._stack.close()


def export_file(
    src: str, dest: str, fmt: DiskFormat, *, progress: ProgressFn | None, total: int
) -> None:
    """Convert the chain ending in ``src`` into a new file ``dest`` (never overwritten)."""
    if os.path.lexists(dest):
        raise Conflict(f"{dest} already exists; refusing to overwrite it")
    part = dest + ".part"
    try:
        qemu_img.convert(src, "qcow2", part, fmt.value, progress=progress, total=total)
        os.replace(part, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise


def remove_tree(vdir: Path) -> None:
    shutil.rmtree(vdir)


def finish_pending(pool: LocalPool, meta: VolumeMeta) -> list[str]:
    """Finish the pending step of ``meta`` (the caller holds the volume lock)."""
    pending = meta.pending
    if pending is None:
        return []
    if pending.op == "merge":
        _merge(pool, meta, pending.layer)
    elif pending.op == "flatten":
        _finish_flatten(pool, meta, pending.layer)
    else:
        raise StorageError(f"unknown pending step {pending.op!r} in {pool.name}/{meta.name}")
    meta.pending = None
    with pool.meta_lock():
        pool.save(meta)
    return [f"{pool.name}/{meta.name}: finished {pending.op} of layer {pending.layer}"]


def _merge(pool: LocalPool, meta: VolumeMeta, layer: str) -> None:
    """Fold ``layer`` (a removed snapshot's) into the layers backed by it, then drop it.

    One child: commit the child's data down into ``layer`` and move the result
    over the child's file (cost: the child's data). Several children: rebase
    each onto ``layer``'s own backing, copying what differs (safe rebase).
    Either way every child reads exactly what it read before.
    """
    path = pool.layer_path(meta.name, layer)
    kids, base = meta.children_of(layer), meta.layers[layer]
    if path.exists() and len(kids) == 1:
        kid = pool.layer_path(meta.name, kids[0])
        mode = kid.stat().st_mode & 0o777
        os.chmod(path, 0o644)
        tracking.carry(kid, path)  # the merged file marks all it gets: tracking survives
        qemu_img.commit(str(kid))
        os.chmod(path, mode)
        os.replace(path, kid)
    elif path.exists() and kids:
        backing = pool.backing_of(meta, layer)
        for child in kids:
            kid = pool.layer_path(meta.name, child)
            qemu_img.rebase(str(kid), backing, safe=True)
            meta.layers[child] = base
            with pool.meta_lock():
                pool.save(meta)
    for child in kids:
        meta.layers[child] = base
    del meta.layers[layer]
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def flatten(pool: LocalPool, meta: VolumeMeta, progress: ProgressFn | None) -> None:
    """Copy the clone's bottom layer with everything below it into a new file, then swap."""
    bottom = meta.bottom()
    path = pool.layer_path(meta.name, bottom)
    tmp = path.with_name(path.name + FLATTEN_SUFFIX)
    total = int(qemu_img.info(str(path), "qcow2").get("virtual-size", meta.size))
    try:
        qemu_img.convert(str(path), "qcow2", str(tmp), "qcow2", progress=progress, total=total)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with pool.meta_lock():
        meta.pending = Pending("flatten", bottom)
        pool.save(meta)
    finish_pending(pool, meta)


def _finish_flatten(pool: LocalPool, meta: VolumeMeta, bottom: str) -> None:
    path = pool.layer_path(meta.name, bottom)
    tmp = path.with_name(path.name + FLATTEN_SUFFIX)
    if tmp.exists():
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    meta.parent = None


def find_debris(pool: LocalPool) -> list[Debris]:
    found = []
    for entry in sorted(pool.dir.iterdir()):
        if not entry.is_dir():
            found.append(Debris(str(entry), "stray file in the pool folder"))
        elif not (entry / META).is_file():
            found.append(
                Debris(
                    str(entry),
                    "volume folder without metadata (unfinished create, import or delete)",
                )
            )
        else:
            known = {META, LOCK} | {f"{layer}.qcow2" for layer in load(entry).layers}
            for f in sorted(entry.iterdir()):
                if f.name not in known:
                    reason = (
                        "temporary file of an unfinished copy"
                        if ".tmp" in f.name or f.name.endswith(".part")
                        else "layer file nothing uses"
                    )
                    found.append(Debris(str(f), reason))
    return found


def remove_debris(pool: LocalPool, item: Debris) -> None:
    """Remove one piece of debris unless an operation is still working on it (Busy)."""
    path = Path(item.path)
    if path.parent != pool.dir and path.parent.parent != pool.dir:
        raise StorageError(f"{path} is not inside pool {pool.name}")
    if path.parent == pool.dir and path.is_dir():
        with flock(path / LOCK, timeout=0, what=f"folder {path}"):
            if (path / META).exists():
                return  # finished meanwhile: not debris after all
            shutil.rmtree(path)
    elif path.parent == pool.dir:
        path.unlink(missing_ok=True)
    else:
        with pool.locked(path.parent.name, timeout=0) as meta:
            if path.name not in {f"{layer}.qcow2" for layer in meta.layers}:
                path.unlink(missing_ok=True)

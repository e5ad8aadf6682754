"""The local driver's own metadata: one ``meta.json`` per volume, plus locks.

The driver keeps its truth on disk next to the data (as RBD keeps its header
objects), so it needs no catalogue. ``meta.json`` is replaced atomically
(temp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snapback.domain.errors import Busy, StorageError

META = "meta.json"
LOCK = ".lock"


@dataclass
class SnapMeta:
    layer: str
    size: int
    created_at: float
    protected: bool = False


@dataclass
class ParentMeta:
    pool: str
    volume: str
    snapshot: str


@dataclass
class Pending:
    """A multi-step change the driver started; ``recover()`` finishes it."""

    op: str  # "merge": fold ``layer`` into its children, then drop it
    layer: str


@dataclass
class VolumeMeta:
    name: str
    head: str
    size: int
    layers: dict[str, str | None]  # layer -> the layer it is backed by in this volume
    snapshots: dict[str, SnapMeta] = field(default_factory=dict)
    parent: ParentMeta | None = None
    pending: Pending | None = None
    version: int = 1

    def children_of(self, layer: str) -> list[str]:
        return [child for child, base in self.layers.items() if base == layer]

    def bottom(self) -> str:
        """The layer that has no backing inside this volume (the one a clone's parent backs)."""
        return next(layer for layer, base in self.layers.items() if base is None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeMeta:
        return cls(
            name=data["name"],
            head=data["head"],
            size=int(data["size"]),
            layers=dict(data["layers"]),
            snapshots={k: SnapMeta(**v) for k, v in data.get("snapshots", {}).items()},
            parent=ParentMeta(**data["parent"]) if data.get("parent") else None,
            pending=Pending(**data["pending"]) if data.get("pending") else None,
            version=int(data.get("version", 1)),
        )


def load(volume_dir: Path) -> VolumeMeta:
    try:
        with open(volume_dir / META, encoding="utf-8") as f:
            return VolumeMeta.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"cannot read volume metadata in {volume_dir}: {exc}") from exc


def save(volume_dir: Path, meta: VolumeMeta) -> None:
    write_atomic(volume_dir / META, json.dumps(meta.to_json(), indent=1, sort_keys=True).encode())


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def flock(path: Path, *, timeout: float | None, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path``; Busy after ``timeout`` seconds (None: wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise Busy(f"{what} is busy with another operation; try again later") from exc
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)

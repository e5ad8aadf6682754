"""The scripted tour: the main job on embedded defaults (README quick start).

It walks the life of a volume the way an operator would: create, write, snapshot,
protect, clone, write to the clone, flatten, roll back, export, upload as an image,
and reports each step with what it cost and what the bytes say.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from snapback.domain.models import DiskFormat
from snapback.domain.names import SnapshotRef
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from snapback.services.gc import GcService
from snapback.services.images import ImageService
from snapback.services.snapshots import SnapshotService
from snapback.services.volumes import VolumeService

MIB = 1 << 20


@dataclass(frozen=True)
class TourStep:
    action: str
    seconds: float
    result: str


def timed(action: str, fn: Callable[[], str]) -> TourStep:
    t0 = time.perf_counter()
    result = fn()
    return TourStep(action, round(time.perf_counter() - t0, 4), result)


class Tour:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.volumes = VolumeService(ctx)
        self.snapshots = SnapshotService(ctx)
        self.images = ImageService(ctx)

    def _write(self, name: str, offset: int, data: bytes) -> None:
        with self.ctx.sessions() as s:
            vol = live_volume(s, self.ctx.settings.default_pool, name)
        with self.ctx.pool(vol.pool).open(vol.storage_name) as h:
            h.write(offset, data)

    def _read(self, name: str, offset: int, length: int) -> bytes:
        with self.ctx.sessions() as s:
            vol = live_volume(s, self.ctx.settings.default_pool, name)
        with self.ctx.pool(vol.pool).open(vol.storage_name) as h:
            return h.read(offset, length)

    def run(self, on_step: Callable[[TourStep], None]) -> list[TourStep]:
        steps = []
        for step in self._steps():
            on_step(step)
            steps.append(step)
        return steps

    def _steps(self) -> Iterator[TourStep]:
        yield from self._snapshot_steps()
        yield from self._image_steps()

    def _snapshot_steps(self) -> Iterator[TourStep]:
        """A volume, a snapshot before a bad upgrade, a clone of it, the rollback."""
        v, s = self.volumes, self.snapshots
        yield timed(
            "volume create web-root --size 256M",
            lambda: f"{v.create('web-root', 256 * MIB).size} bytes, thin",
        )
        data = b"release 1.0 of the web site\n".ljust(MIB, b".")
        yield timed("write 1 MiB at 0 and at 128 MiB", lambda: self._fill(data))
        yield timed(
            "snapshot create web-root@release-1",
            lambda: f"protected={s.create(SnapshotRef('web-root', 'release-1')).protected}",
        )
        yield timed(
            "snapshot protect web-root@release-1",
            lambda: (
                f"protected={s.set_protected(SnapshotRef('web-root', 'release-1'), True).protected}"
            ),
        )
        yield timed(
            "write release 2.0 over it (the bad upgrade)",
            lambda: self._fill(b"release 2.0, broken\n".ljust(MIB, b"!")),
        )
        yield timed(
            "volume clone web-root@release-1 web-test",
            lambda: f"parent={v.clone(SnapshotRef('web-root', 'release-1'), 'web-test').parent}",
        )
        yield timed("clone reads its parent's data", lambda: self._read("web-test", 0, 27).decode())
        yield timed(
            "volume flatten web-test",
            lambda: (
                f"parent={v.flatten('web-test').parent}, clone still reads "
                f"{self._read('web-test', 128 * MIB, 11).decode()!r}"
            ),
        )
        yield timed(
            "snapshot rollback web-root@release-1",
            lambda: f"web-root reads {self._rollback_check()!r} again",
        )

    def _image_steps(self) -> Iterator[TourStep]:
        """The clone exported, made an image, the old volume deleted, gc."""
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "web.raw")
            yield timed("volume export web-test --disk-format raw", lambda: self._export(raw))
            yield timed(
                "image create web-1.0 --file web.raw --disk-format raw", lambda: self._upload(raw)
            )
        yield timed(
            "volume delete web-root (its snapshot has no clones left)", lambda: self._delete_root()
        )
        yield timed("gc", lambda: f"{len(GcService(self.ctx).run().debris)} debris found")

    def _fill(self, data: bytes) -> str:
        self._write("web-root", 0, data)
        self._write("web-root", 128 * MIB, data)
        return f"wrote {2 * len(data)} bytes"

    def _rollback_check(self) -> str:
        self.snapshots.rollback(SnapshotRef("web-root", "release-1"))
        return self._read("web-root", 0, 27).decode()

    def _export(self, path: str) -> str:
        self.volumes.export("web-test", path, DiskFormat.RAW)
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return f"{os.path.getsize(path)} bytes, sha256 {digest[:16]}..."

    def _upload(self, path: str) -> str:
        img = self.images.create("web-1.0", path, DiskFormat.RAW, {"os_distro": "demo"})
        return f"{img.status}, checksum {img.checksum[:16] if img.checksum else '-'}..."

    def _delete_root(self) -> str:
        self.snapshots.set_protected(SnapshotRef("web-root", "release-1"), False)
        return self.volumes.delete("web-root")

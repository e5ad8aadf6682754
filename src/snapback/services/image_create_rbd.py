"""The RBD direct snapshot flow of ``instance image-create`` (nova's ``direct_snapshot``).

When the instance's root disk and the image pool are both RBD on one cluster,
no byte goes through the host:

1. (freeze) snapshot the root disk and protect it (thaw);
2. clone that snapshot into the image pool as the image's volume;
3. flatten the clone (``--flatten now``), or let a job do it later
   (``background``: the image is usable at once), or never (the dependency
   stays, recorded in the catalogue: the clone's parent is the root disk's
   snapshot, so deletes in any order wait for each other instead of failing);
4. snapshot and protect the clone: the ``base`` future instances clone from;
5. once flattened, unprotect and remove the source snapshot.

Every storage object is journaled *before* it is made (its name is chosen
first), so the recovery can always find and remove what a crash left.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from snapback.catalog.models import Image, ImageProperty, Snapshot, Volume
from snapback.domain.errors import HasDependents, NotFound
from snapback.domain.models import OperationStatus, SnapshotStatus, VolumeStatus
from snapback.drivers.storage.base import ProgressFn, StoragePool
from snapback.services import journal
from snapback.services.catalog_queries import clones_of
from snapback.services.context import Context
from snapback.services.volumes import VolumeService, purge, volume_lock

KIND = "instance.image_create_rbd"
FLATTEN = ("now", "background", "never")
SOURCE_PROP = "snapback.source_snapshot"  # the root disk's snapshot the image was cloned from


def same_cluster(ctx: Context, pool_a: str, pool_b: str) -> bool:
    a, b = ctx.settings.pools.get(pool_a), ctx.settings.pools.get(pool_b)
    return bool(a and b and a.driver == b.driver == "rbd" and a.conf == b.conf)


def new_storage() -> str:
    return "s-" + uuid.uuid4().hex[:20]


class GuestHold:
    """The guest's pause around the storage's snapshot call alone (the driver enters
    it once the volume is open and leaves it before closing): its file systems
    frozen when ``freeze`` says it froze them, then thawed; ``seconds`` is how long
    that took, what the guest saw."""

    def __init__(self, freeze: Callable[[], bool], thaw: Callable[[], object]) -> None:
        self._freeze, self._thaw = freeze, thaw
        self.frozen, self.seconds, self._t0 = False, 0.0, 0.0

    def __enter__(self) -> None:
        self._t0 = time.monotonic()
        self.frozen = self._freeze()

    def __exit__(self, *exc: object) -> None:
        try:
            if self.frozen:
                self._thaw()
        finally:
            self.seconds = time.monotonic() - self._t0


class DirectFlow:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.volumes = VolumeService(ctx)

    def run(
        self,
        op: journal.OpHandle,
        *,
        image_id: str,
        root_id: str,
        flatten: str,
        freeze: Callable[[], bool],
        thaw: Callable[[], object],
        progress: ProgressFn | None,
    ) -> dict[str, str]:
        """Steps 1-5 inside the caller's journaled operation; returns image properties."""
        with self.ctx.sessions() as s:
            root = s.get(Volume, root_id)
            assert root is not None
            root_pool, root_storage, size = root.pool, root.storage_name, root.size
        src_driver = self.ctx.pool(root_pool)
        img_pool = self.ctx.settings.image_pool
        img_driver = self.ctx.pool(img_pool)
        src_snap, pause, frozen = self._snapshot_root(op, src_driver, root_storage, freeze, thaw)
        snap_id = self._record_source(op, root_id, image_id, src_snap)
        vol = self.volumes._new_row(
            f"image-{image_id}", img_pool, size, kind="image", parent_snapshot_id=snap_id
        )
        op.step("volume", volume_id=vol.id)
        src_driver.clone(root_storage, src_snap, img_driver, vol.storage_name)
        op.step("cloned")
        copy_start = time.monotonic()
        if flatten == "now":
            flatten_volume(self.ctx, vol.id, progress)
            op.step("flattened")
        copy = time.monotonic() - copy_start
        self._make_base(op, img_driver, vol.id, vol.storage_name)
        self._record_image(img_driver, image_id, vol.id, vol.storage_name)
        return {
            "snapback.flatten": "done" if flatten == "now" else flatten,
            SOURCE_PROP: snap_id,
            "snapback.time_guest_pause_s": f"{pause:.3f}",
            "snapback.time_copy_s": f"{copy:.3f}",
            "snapback.consistency_frozen": "yes" if frozen else "no",
        }

    @staticmethod
    def _snapshot_root(
        op: journal.OpHandle,
        driver: StoragePool,
        storage: str,
        freeze: Callable[[], bool],
        thaw: Callable[[], object],
    ) -> tuple[str, float, bool]:
        """Step 1: snapshot the root disk (frozen if the guest lets us), then protect it.

        Returns the snapshot's storage name, the guest's pause and whether it was frozen.
        """
        src_snap = new_storage()
        op.step("snapping", storage=src_snap)
        hold = GuestHold(freeze, thaw)
        driver.create_snapshot(storage, src_snap, protect=True, around=hold)
        if hold.frozen:  # journaled once the image is closed, not inside the hold
            op.step("thawed")
        return src_snap, hold.seconds, hold.frozen

    def _record_source(
        self, op: journal.OpHandle, root_id: str, image_id: str, src_snap: str
    ) -> str:
        """Catalogue the root disk's protected snapshot; returns its id."""
        with self.ctx.transaction() as s:
            row = Snapshot(
                volume_id=root_id,
                name=f"image-{image_id[:8]}",
                storage_name=src_snap,
                protected=True,
                status=SnapshotStatus.AVAILABLE,
            )
            s.add(row)
            s.flush()
            snap_id = row.id
        op.step("snapped", snapshot_id=snap_id)
        return snap_id

    def _make_base(
        self, op: journal.OpHandle, driver: StoragePool, vol_id: str, storage: str
    ) -> None:
        """Step 4: the protected ``base`` snapshot of the clone; the volume is then read-only."""
        base = new_storage()
        op.step("basing", storage=base)
        driver.create_snapshot(storage, base, protect=True)
        with self.ctx.transaction() as s:
            s.add(
                Snapshot(
                    volume_id=vol_id,
                    name="base",
                    storage_name=base,
                    protected=True,
                    status=SnapshotStatus.AVAILABLE,
                )
            )
            row_v = s.get(Volume, vol_id)
            assert row_v is not None
            row_v.status, row_v.read_only = VolumeStatus.AVAILABLE, True
        op.step("snapshotted")

    def _record_image(self, driver: StoragePool, image_id: str, vol_id: str, storage: str) -> None:
        """Point the image at its volume, with the volume's sizes."""
        info = driver.volume_info(storage)
        with self.ctx.transaction() as s:
            img = s.get(Image, image_id)
            assert img is not None
            img.volume_id, img.size, img.virtual_size = vol_id, info.allocated, info.size
            img.disk_format = "raw"

    def after_activation(self, op: journal.OpHandle, image_id: str, flatten: str) -> None:
        """The caller holds the root volume's lock."""
        if flatten == "now":
            release_source_snapshot(self.ctx, image_id, locked=True)
            op.step("cleaned")
        elif flatten == "background":
            start_background_flatten(self.ctx, image_id)


def flatten_volume(ctx: Context, vol_id: str, progress: ProgressFn | None = None) -> None:
    """Flatten an image's volume and record that it has no parent any more."""
    with ctx.sessions() as s:
        vol = s.get(Volume, vol_id)
        assert vol is not None
        pool, storage = vol.pool, vol.storage_name
    driver = ctx.pool(pool)
    if driver.parent(storage) is not None:
        driver.flatten(storage, progress)
    with ctx.transaction() as s:
        row = s.get(Volume, vol_id)
        assert row is not None
        row.parent_snapshot_id = None


def _image_volume(ctx: Context, image_id: str) -> tuple[str | None, dict[str, str]]:
    with ctx.sessions() as s:
        img = s.get(Image, image_id)
        if img is None:
            return None, {}
        return img.volume_id, {p.key: p.value for p in img.properties}


def release_source_snapshot(ctx: Context, image_id: str, *, locked: bool = False) -> bool:
    """Remove the root-disk snapshot an image was cloned from, once nothing reads it.

    True when it is gone (or there was none); False while clones still need it.
    """
    _, props = _image_volume(ctx, image_id)
    snap_id = props.get(SOURCE_PROP)
    if not snap_id:
        return True
    with ctx.sessions() as s:
        snap = s.get(Snapshot, snap_id)
        if snap is None or snap.status == SnapshotStatus.DELETED:
            return True
        if clones_of(s, snap.id):
            return False
        vol = snap.volume
        pool, storage, snap_storage, vol_id = vol.pool, vol.storage_name, snap.storage_name, vol.id
    with contextlib.nullcontext() if locked else ctx.lock(volume_lock(vol_id)):
        drop_snapshot(ctx.pool(pool), storage, snap_storage)
        with ctx.transaction() as s:
            row = s.get(Snapshot, snap_id)
            assert row is not None
            row.status, row.protected = SnapshotStatus.DELETED, False
    return True


def drop_snapshot(driver: StoragePool, volume: str, snapshot: str) -> None:
    """Unprotect (when it has no clones) and remove a snapshot; gone already is fine."""
    with contextlib.suppress(NotFound):
        if driver.children(volume, snapshot):
            raise HasDependents(f"snapshot {volume}@{snapshot} has clones", [])
        snaps = {s.name: s for s in driver.list_snapshots(volume)}
        if snapshot not in snaps:
            return
        if snaps[snapshot].protected:
            driver.unprotect_snapshot(volume, snapshot)
        driver.delete_snapshot(volume, snapshot)


def finish_flatten(ctx: Context, image_id: str, progress: ProgressFn | None = None) -> str:
    """The background job (and gc): flatten the image's volume, drop the source snapshot."""
    vol_id, props = _image_volume(ctx, image_id)
    if vol_id is None or props.get("snapback.flatten") not in ("background", "running"):
        return "nothing to do"
    with ctx.lock(f"flatten-{image_id}", timeout=0):
        _set_flatten_prop(ctx, image_id, "running")
        flatten_volume(ctx, vol_id, progress)
        release_source_snapshot(ctx, image_id)
        _set_flatten_prop(ctx, image_id, "done")
    return "flattened"


def _set_flatten_prop(ctx: Context, image_id: str, value: str) -> None:
    with ctx.transaction() as s:
        img = s.get(Image, image_id)
        assert img is not None
        props = {p.key: p.value for p in img.properties}
        props["snapback.flatten"] = value
        img.properties = [ImageProperty(key=k, value=v) for k, v in sorted(props.items())]


def start_background_flatten(ctx: Context, image_id: str) -> None:
    """A detached ``snapback image flatten`` that outlives this command (gc retries it)."""
    log = ctx.settings.home / "jobs"
    log.mkdir(exist_ok=True)
    with open(log / f"flatten-{image_id}.log", "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "snapback", "image", "flatten", image_id],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "SNAPBACK_HOME": str(ctx.settings.home)},
        )


def recover_direct(ctx: Context, op: journal.OperationRecord) -> OperationStatus | None:
    """The storage half of recovery; None when the flow had not reached storage."""
    image_id = op.payload["image_id"]
    if op.reached("activated"):
        if op.payload.get("flatten") == "now":
            release_source_snapshot(ctx, image_id)
        return OperationStatus.RECOVERED
    vol_id = op.data("volume").get("volume_id")
    if vol_id:
        purge(ctx, vol_id)
    src = op.data("snapping").get("storage")
    if src:
        with ctx.sessions() as s:
            root = s.get(Volume, op.payload["root_volume_id"])
            assert root is not None
            pool, storage = root.pool, root.storage_name
        drop_snapshot(ctx.pool(pool), storage, src)
        snap_id = op.data("snapped").get("snapshot_id")
        if snap_id:
            with ctx.transaction() as s:
                row = s.get(Snapshot, snap_id)
                if row is not None:
                    row.status, row.protected = SnapshotStatus.DELETED, False
    return None

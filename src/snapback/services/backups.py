"""Backups of volumes into a repository, restore, verify (docs/repository-format.md).

A backup takes a temporary storage snapshot of the volume (journaled: the
snapshot's name is recorded before it is made, so a crash leaves nothing that
``gc`` cannot explain), reads only the allocated ranges of that snapshot in
4 MiB chunks aligned to disk offsets, skips zero chunks, stores each distinct
chunk once, then writes the index and, last, the backup record. With a parent
backup of the same volume, chunks whose content id equals the parent's at the
same position are not stored again ("hash-compare" change detection); the
index stays complete on its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from snapback.catalog.models import Snapshot, Volume
from snapback.domain.errors import Conflict, InvalidInput, NotFound
from snapback.domain.models import OperationStatus, Progress, SnapshotStatus
from snapback.drivers.storage.base import ProgressFn, StoragePool
from snapback.repository.repo import Repository, new_backup_id, open_backend
from snapback.services import journal
from snapback.services.backup_io import restore_chunks, store_chunks
from snapback.services.catalog_queries import instance_using, live_volume
from snapback.services.context import Context
from snapback.services.volumes import VolumeService, purge, volume_lock

CREATE, RESTORE = "backup.create", "backup.restore"
MODES = ("auto", "full", "incremental")


@dataclass(frozen=True)
class VerifyReport:
    backup: str
    chunks: int
    checked_bytes: int
    missing: list[str]
    damaged: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.damaged


def chunk_ranges(size: int, chunk: int, extents: list[tuple[int, int]]) -> Iterator[int]:
    """Positions of the chunks that overlap an allocated extent, in order."""
    seen = -1
    for start, length in sorted(extents):
        first, last = start // chunk, (start + length - 1) // chunk
        for n in range(max(first, seen + 1), min(last, (size - 1) // chunk) + 1):
            seen = n
            yield n


class BackupService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.volumes = VolumeService(ctx)

    def open_repo(self, url: str, passphrase: str | None) -> Repository:
        return Repository.open(open_backend(url), passphrase)

    # -- create ---------------------------------------------------------------------
    def create(
        self,
        volume: str,
        repo_url: str,
        *,
        pool: str | None = None,
        mode: str = "auto",
        passphrase: str | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        if mode not in MODES:
            raise InvalidInput(f"unknown mode {mode!r} (use {', '.join(MODES)})")
        repo = self.open_repo(repo_url, passphrase)
        pool_name = pool or self.ctx.settings.default_pool
        with self.ctx.sessions() as s:
            vol = live_volume(s, pool_name, volume)
            user = instance_using(s, vol.id)
            runner = user.name if user is not None and user.status == "active" else None
        driver = self.ctx.pool(pool_name)
        if runner and driver.driver == "local":
            raise Conflict(
                f"volume {pool_name}/{volume} is in use by running instance {runner}; "
                "a local volume is backed up while its instance is stopped"
            )
        parent = self._parent(repo, vol.id) if mode != "full" else None
        if mode == "incremental" and parent is None:
            raise NotFound(f"no earlier backup of {pool_name}/{volume} in {repo_url}")
        backup_id = new_backup_id()
        snap = "b-" + uuid.uuid4().hex[:20]
        started = time.monotonic()
        with (
            self.ctx.lock(volume_lock(vol.id)),
            journal.operation(
                self.ctx, CREATE, f"{pool_name}/{volume}", volume_id=vol.id, backup=backup_id
            ) as op,
            repo.backup_lock(backup_id, parent["id"] if parent else None) as lock_held,
        ):
            since, tracking, note = tracking_base(driver, vol.storage_name, parent)
            op.step("snapping", storage=snap, since=since)
            driver.create_snapshot(vol.storage_name, snap)  # on failure: the recovery drops it
            changed = driver.changed_extents(vol.storage_name, snap, since) if since else None
            disk, stats = self._store_disk(repo, driver, vol, snap, parent, progress, changed)
            keep = driver.supports_trash  # RBD: the snapshot is the next backup's diff base
            if not keep:
                driver.delete_snapshot(vol.storage_name, snap)
                op.step("unsnapped")
            stats["seconds"] = round(time.monotonic() - started, 3)
            record = {
                "id": backup_id,
                "created_at": time.time(),
                "kind": "volume",
                "source": {
                    "name": vol.name,
                    "pool": pool_name,
                    "driver": driver.driver,
                    "volume_id": vol.id,
                },
                "parent": parent["id"] if parent else None,
                "mode": "incremental" if parent else "full",
                "change_tracking": tracking,
                "note": note,
                "source_snapshot": snap if keep else None,
                "disks": [disk],
                "instance": None,
                "stats": stats,
            }
            lock_held()  # gc must not have swept while we wrote chunks
            repo.put_record(record)
            op.step("recorded")
            if keep:
                rotate_snapshots(self.ctx, vol.id, snap, backup_id, since)
                op.step("rotated")
        return record

    def _parent(self, repo: Repository, volume_id: str) -> dict[str, Any] | None:
        mine = [
            r
            for r in (repo.get_record(b) for b in repo.backup_ids())
            if r.get("source", {}).get("volume_id") == volume_id
        ]
        return max(mine, key=lambda r: float(r["created_at"])) if mine else None

    def _store_disk(
        self,
        repo: Repository,
        driver: StoragePool,
        vol: Volume,
        snap: str,
        parent: dict[str, Any] | None,
        progress: ProgressFn | None,
        changed: list[tuple[int, int, bool]] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        chunk = repo.config.chunk_size
        size = next(s for s in driver.list_snapshots(vol.storage_name) if s.name == snap).size
        bad = repo.quarantined()  # failed verification: stored again, never reused
        ids, before, todo = self._plan_reads(repo, driver, vol, snap, size, parent, changed, bad)
        with driver.open(vol.storage_name, snapshot=snap) as handle:
            got = store_chunks(repo, handle, size, todo, ids, before, bad, progress)
        stats = got.as_dict()
        pending = set(todo)
        stats["reused_chunks"] += sum(1 for n, c in enumerate(ids) if c and n not in pending)
        index = {"disk": vol.name, "size": size, "chunk_size": chunk, "chunks": ids}
        index_id = repo.put_index(index)
        disk = {"target": "vda", "volume": vol.name, "size": size, "index": index_id}
        return disk, stats

    @staticmethod
    def _plan_reads(
        repo: Repository,
        driver: StoragePool,
        vol: Volume,
        snap: str,
        size: int,
        parent: dict[str, Any] | None,
        changed: list[tuple[int, int, bool]] | None,
        bad: set[str],
    ) -> tuple[list[str | None], list[str | None], list[int]]:
        """(chunk ids known without reading, the parent's ids, positions to read).

        With change tracking only the changed chunks (and quarantined ones) are read,
        the others keep the parent's ids; otherwise every allocated chunk is read."""
        chunk = repo.config.chunk_size
        count = (size + chunk - 1) // chunk
        before: list[str | None] = []
        if parent is not None:
            old = repo.get_index(parent["disks"][0]["index"])
            if old.get("size") == size:
                before = list(old["chunks"])
        if changed is not None and len(before) == count:
            todo = set(chunk_ranges(size, chunk, [(o, n) for o, n, _ in changed]))
            todo |= {n for n, c in enumerate(before) if c in bad}
            return [c if c not in bad else None for c in before], before, sorted(todo)
        extents = driver.allocated_extents(vol.storage_name, snap)
        return [None] * count, before, list(chunk_ranges(size, chunk, extents))

    # -- reading ---------------------------------------------------------------------------
    def list_backups(self, repo_url: str, passphrase: str | None = None) -> list[dict[str, Any]]:
        repo = self.open_repo(repo_url, passphrase)
        records = [repo.get_record(b) for b in repo.backup_ids()]
        return sorted(records, key=lambda r: float(r["created_at"]))

    def show(self, backup_id: str, repo_url: str, passphrase: str | None = None) -> dict[str, Any]:
        return self.open_repo(repo_url, passphrase).get_record(backup_id)

    def pick(self, repo_url: str, volume: str, at: float, passphrase: str | None = None) -> str:
        """The last backup of ``volume`` taken at or before ``at`` (unix time)."""
        found = [
            r
            for r in self.list_backups(repo_url, passphrase)
            if r["source"]["name"] == volume and float(r["created_at"]) <= at
        ]
        if not found:
            raise NotFound(f"no backup of {volume} taken at or before that time in {repo_url}")
        return str(max(found, key=lambda r: float(r["created_at"]))["id"])

    # -- restore ---------------------------------------------------------------------------
    def restore(
        self,
        backup_id: str,
        repo_url: str,
        to_volume: str,
        *,
        pool: str | None = None,
        passphrase: str | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        repo = self.open_repo(repo_url, passphrase)
        record = repo.get_record(backup_id)
        disk = record["disks"][0]
        index = repo.get_index(disk["index"])
        pool_name = pool or self.ctx.settings.default_pool
        with journal.operation(
            self.ctx, RESTORE, f"{pool_name}/{to_volume}", backup=backup_id
        ) as op:
            view = self.volumes.create(to_volume, int(index["size"]), pool_name)
            op.step("volume", volume_id=view.id)
            with self.ctx.sessions() as s:
                storage = live_volume(s, pool_name, to_volume).storage_name
            chunk = int(index["chunk_size"])
            wanted = [(n, cid) for n, cid in enumerate(index["chunks"]) if cid]
            with self.ctx.pool(pool_name).open(storage) as handle:
                restore_chunks(repo, handle, chunk, wanted, progress)
            op.step("written")
        return {"backup": backup_id, "volume": f"{pool_name}/{to_volume}", "chunks": len(wanted)}

    # -- verify ------------------------------------------------------------------------------
    def verify(
        self,
        backup_id: str,
        repo_url: str,
        *,
        read_data: bool = False,
        passphrase: str | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> VerifyReport:
        from snapback.repository.repo import chunk_key
        from snapback.repository.sealing import DamagedObject

        repo = self.open_repo(repo_url, passphrase)
        record = repo.get_record(backup_id)
        missing, damaged, checked, total = [], [], 0, 0
        for disk in record["disks"]:
            try:
                index = repo.get_index(disk["index"])
            except NotFound:
                missing.append(f"index {disk['index']}")
                continue
            except DamagedObject:
                damaged.append(f"index {disk['index']}")
                continue
            ids = sorted({c for c in index["chunks"] if c})
            total += len(ids)
            for done, cid in enumerate(ids, 1):
                if not read_data:
                    if repo.backend.stat(chunk_key(cid)) is None:
                        missing.append(cid)
                else:
                    try:
                        checked += len(repo.get_chunk(cid))
                    except NotFound:
                        missing.append(cid)
                    except DamagedObject:
                        damaged.append(cid)
                        repo.quarantine(cid)  # never reused by a later backup
                if progress is not None:
                    progress(Progress(done, len(ids)))
        return VerifyReport(backup_id, total, checked, missing, damaged)


def tracking_base(
    driver: StoragePool, storage: str, parent: dict[str, Any] | None
) -> tuple[str | None, str, str | None]:
    """(snapshot to diff from, change tracking, note) for a backup with ``parent``.

    RBD keeps each backup's snapshot as the next one's base (as cinder-backup
    does); when it is gone, the backup falls back to comparing chunk hashes and
    says so, and tracking starts again from the new snapshot."""
    if parent is None:
        return None, "none", None
    if not driver.supports_trash:
        return None, "hash-compare", None
    prev = parent.get("source_snapshot")
    if prev and any(s.name == prev for s in driver.list_snapshots(storage)):
        return str(prev), "rbd-diff", None
    return (
        None,
        "hash-compare",
        "change tracking lost (the last backup's snapshot is gone): compared chunk hashes; "
        "tracking starts again from this backup",
    )


def rotate_snapshots(
    ctx: Context, vol_id: str, snap: str, backup_id: str, previous: str | None
) -> None:
    """Catalogue the kept snapshot (so gc explains it); drop the one it replaces."""
    with ctx.transaction() as s:
        vol = s.get(Volume, vol_id)
        assert vol is not None
        if not any(x.storage_name == snap and x.status == "available" for x in vol.snapshots):
            s.add(Snapshot(volume_id=vol_id, name=f"backup-{backup_id}", storage_name=snap,
                           status=SnapshotStatus.AVAILABLE))  # fmt: skip
        old = [x for x in vol.snapshots if previous and x.storage_name == previous]
        for row in old:
            row.status = SnapshotStatus.DELETED
        pool, storage = vol.pool, vol.storage_name
    if previous:
        driver = ctx.pool(pool)
        if any(x.name == previous for x in driver.list_snapshots(storage)):
            driver.delete_snapshot(storage, previous)


@journal.recovery(CREATE)
def _recover_create(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """Remove the temporary snapshot; the repository keeps only unreferenced chunks."""
    snap = op.data("snapping").get("storage")
    if snap and op.reached("recorded") and not op.reached("unsnapped"):  # the next diff base
        since = op.data("snapping").get("since")
        rotate_snapshots(ctx, op.payload["volume_id"], snap, op.payload["backup"], since)
        return OperationStatus.RECOVERED
    if snap and not op.reached("unsnapped"):
        with ctx.sessions() as s:
            vol = s.get(Volume, op.payload["volume_id"])
            pool, storage = (vol.pool, vol.storage_name) if vol else (None, None)
        if pool and storage:
            driver = ctx.pool(pool)
            if any(x.name == snap for x in driver.list_snapshots(storage)):
                driver.delete_snapshot(storage, snap)
    return OperationStatus.RECOVERED if op.reached("recorded") else OperationStatus.ROLLED_BACK


@journal.recovery(RESTORE)
def _recover_restore(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    if op.reached("written"):
        return OperationStatus.RECOVERED
    vol_id = op.data("volume").get("volume_id")
    if vol_id:
        purge(ctx, vol_id)
    return OperationStatus.ROLLED_BACK

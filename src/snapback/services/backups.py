"""Backups of volumes and instances into a repository, restore, verify
(docs/backups.md, docs/repository-format.md).

A backup fixes each disk's point in time (backup_capture: an RBD snapshot, or a
dirty bitmap started on a stopped local disk; all disks of an instance at once,
the guest frozen meanwhile when it runs), journaled before anything is made so
a crash leaves nothing ``gc`` cannot explain. It reads only what changed since
the parent (or every allocated range) in 4 MiB chunks aligned to disk offsets,
skips zero chunks, stores each distinct chunk once (backup_io), then writes the
indexes and, last, the backup record. Each index is complete on its own.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from snapback.domain.errors import Conflict, InvalidInput, NotFound
from snapback.domain.models import OperationStatus, Progress
from snapback.drivers.hypervisor import snapshot_ops as ops
from snapback.drivers.storage.base import TRACKER_PREFIX, ProgressFn
from snapback.repository.repo import Repository, new_backup_id, open_backend
from snapback.services import backup_capture as cap
from snapback.services import backup_catalog, journal
from snapback.services import backup_restore as restore_mod
from snapback.services.backup_io import store_chunks, store_file
from snapback.services.backup_jobs import Job, instance_job
from snapback.services.backup_live import Points
from snapback.services.backup_live import points as backup_points
from snapback.services.backup_verify import VerifyReport, verify_backup
from snapback.services.catalog_queries import instance_using, live_volume
from snapback.services.context import Context
from snapback.services.volumes import VolumeService, volume_lock

CREATE, RESTORE = "backup.create", "backup.restore"
MODES = ("auto", "full", "incremental")


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
        pool_name = pool or self.ctx.settings.default_pool
        with self.ctx.sessions() as s:
            vol = live_volume(s, pool_name, volume)
            user = instance_using(s, vol.id)
            runner = user.name if user is not None and user.status == "active" else None
        driver = self.ctx.pool(pool_name)
        if runner and driver.tracks_changes_by == "bitmap":
            raise Conflict(
                f"volume {pool_name}/{volume} is in use by running instance {runner}; back up "
                f"the instance instead ('backup create --instance {runner}')"
            )
        source = {"name": vol.name, "pool": pool_name, "driver": driver.driver, "volume_id": vol.id}
        job = Job("volume", source, ("volume_id", vol.id), [("vda", vol)], running=bool(runner))
        return self._run(job, repo_url, mode, passphrase, progress)

    def create_instance(
        self,
        instance: str,
        repo_url: str,
        *,
        mode: str = "auto",
        quiesce: str = "auto",
        passphrase: str | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        job = instance_job(self.ctx, instance, quiesce)
        return self._run(job, repo_url, mode, passphrase, progress)

    def _run(
        self,
        job: Job,
        repo_url: str,
        mode: str,
        passphrase: str | None,
        progress: ProgressFn | None,
    ) -> dict[str, Any]:
        if mode not in MODES:
            raise InvalidInput(f"unknown mode {mode!r} (use {', '.join(MODES)})")
        repo = self.open_repo(repo_url, passphrase)
        newest = self._parent(repo, *job.key)
        parent = newest if mode != "full" else None
        if mode == "incremental" and parent is None:
            raise NotFound(f"no earlier backup of {job.label} in {repo_url}")
        backup_id = new_backup_id()
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            for vol_id in sorted({vol.id for _, vol in job.disks}):  # one order: no deadlock
                stack.enter_context(self.ctx.lock(volume_lock(vol_id)))
            op = stack.enter_context(
                journal.operation(self.ctx, CREATE, job.label, backup=backup_id, domain=job.domain)
            )
            lock_held = stack.enter_context(
                repo.backup_lock(backup_id, parent["id"] if parent else None)
            )
            plans = [
                cap.plan_disk(
                    self.ctx.pool(vol.pool),
                    vol,
                    target,
                    backup_id,
                    parent,
                    domain=job.domain,
                    live=job.live_local,
                    replaces=newest if parent is None else None,
                )
                for target, vol in job.disks
            ]
            op.step("snapping", disks=[p.to_json() for p in plans])
            disks, totals = self._store_disks(repo, op, job, plans, progress)
            boot_files = _store_boot_files(repo, job)
            stats: dict[str, Any] = {**totals, "seconds": round(time.monotonic() - started, 3)}
            record = job.record(backup_id, parent, plans, disks, stats)
            if boot_files:
                record["boot_files"] = boot_files
            lock_held()  # gc must not have swept while we wrote chunks
            self._commit(repo, repo_url, op, plans, record)
        return record

    def _store_disks(
        self,
        repo: Repository,
        op: journal.OpHandle,
        job: Job,
        plans: list[cap.DiskPlan],
        progress: ProgressFn | None,
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Take the points in time, then store each disk: (disks for the record, totals)."""
        disks: list[dict[str, Any]] = []
        totals = {"read_bytes": 0, "new_chunks": 0, "new_bytes": 0, "reused_chunks": 0}
        with backup_points(self.ctx, op, job, plans) as points:
            for plan in plans:
                disk, got = self._store_disk(repo, plan, points, progress)
                disks.append(disk)
                totals = {k: totals[k] + got[k] for k in totals}
        return disks, totals

    def _commit(
        self,
        repo: Repository,
        repo_url: str,
        op: journal.OpHandle,
        plans: list[cap.DiskPlan],
        record: dict[str, Any],
    ) -> None:
        """Write the record (the backup exists from here), keep this backup's bases and
        drop the parent's, then catalogue it; the caller still holds the volume locks."""
        repo.put_record(record)
        entry = backup_catalog.entry_of(repo_url, repo.config.id, record)
        op.step("recorded", catalog=entry)  # recovery catalogues it from here
        for plan in plans:
            cap.finish(self.ctx, plan, str(record["id"]))
        op.step("rotated")
        # still under the volume locks: gc never sees this backup's bitmap or diff-base
        # snapshot unexplained
        backup_catalog.record_entry(self.ctx, entry)

    def _parent(self, repo: Repository, key: str, value: str) -> dict[str, Any] | None:
        """The newest backup of this source. Backup ids begin with their UTC creation
        time, so records are read newest first and the first match is the one: the
        cost follows the backups made since, not the repository's whole history."""
        for backup_id in reversed(repo.backup_ids()):
            record = repo.get_record(backup_id)
            if record.get("source", {}).get(key) == value:
                return record
        return None

    def _store_disk(
        self,
        repo: Repository,
        plan: cap.DiskPlan,
        points: Points,
        progress: ProgressFn | None,
    ) -> tuple[dict[str, Any], dict[str, int]]:
        changed = points.changed[plan.target]
        driver = self.ctx.pool(plan.pool)
        chunk = repo.config.chunk_size
        size = cap.point_size(driver, plan)
        count = (size + chunk - 1) // chunk
        bad = repo.quarantined()  # failed verification: stored again, never reused
        before: list[str | None] = []
        if plan.parent_index is not None:
            old = repo.get_index(plan.parent_index)
            if old.get("size") == size:
                before = list(old["chunks"])
        if changed is not None and len(before) == count:
            # With change tracking only the changed chunks (and quarantined ones) are
            # read; the others keep the parent's ids.
            todo = set(chunk_ranges(size, chunk, changed))
            todo |= {n for n, c in enumerate(before) if c in bad}
            ids = [c if c not in bad else None for c in before]
        else:
            if changed is not None:
                cap.lost(plan)  # resized since the parent: compare hashes
            todo = set(chunk_ranges(size, chunk, points.allocated(plan)))
            ids = [None] * count
        with points.open(plan) as handle:
            got = store_chunks(repo, handle, size, sorted(todo), ids, before, bad, progress)
        stats = got.as_dict()
        stats["reused_chunks"] += sum(1 for n, c in enumerate(ids) if c and n not in todo)
        index = {"disk": plan.volume, "size": size, "chunk_size": chunk, "chunks": ids}
        index_id = repo.put_index(index)
        disk = {
            "target": plan.target,
            "volume": plan.volume,
            "volume_id": plan.volume_id,
            "pool": plan.pool,
            "driver": driver.driver,
            "size": size,
            "index": index_id,
            "snapshot": plan.snap,
            "change_tracking": plan.tracking,
            "note": plan.note,
        }
        return disk, stats

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

    # -- restore (backup_restore.py) --------------------------------------------------
    def restore(
        self,
        backup_id: str,
        repo_url: str,
        to_volume: str,
        *,
        pool: str | None = None,
        disk: str | None = None,
        passphrase: str | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        repo = self.open_repo(repo_url, passphrase)
        record = repo.get_record(backup_id)
        entry = restore_mod.pick_disk(record, disk)
        pool_name = pool or self.ctx.settings.default_pool
        _, chunks = restore_mod.restore_disk(
            self.ctx, repo, backup_id, entry, to_volume, pool_name, progress
        )
        return {
            "backup": backup_id,
            "volume": f"{pool_name}/{to_volume}",
            "disk": entry.get("target", "vda"),
            "chunks": chunks,
        }

    def restore_instance(
        self,
        backup_id: str,
        repo_url: str,
        to_instance: str,
        *,
        pool: str | None = None,
        start: bool = False,
        passphrase: str | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        repo = self.open_repo(repo_url, passphrase)
        pool_name = pool or self.ctx.settings.default_pool
        return restore_mod.restore_instance(
            self.ctx, repo, backup_id, to_instance, pool_name, start, progress
        )

    # -- verify (backup_verify.py) -------------------------------------------------------
    def verify(
        self,
        backup_id: str,
        repo_url: str,
        *,
        read_data: bool = False,
        passphrase: str | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> VerifyReport:
        repo = self.open_repo(repo_url, passphrase)
        return verify_backup(repo, backup_id, read_data=read_data, progress=progress)


def _store_boot_files(repo: Repository, job: Job) -> list[dict[str, Any]]:
    """What the instance boots (kernel, ramdisk), for a restore without its images."""
    stored = []
    for boot in job.boot:
        index_id, size = store_file(repo, boot.path, f"{boot.role} {boot.image_name}")
        image = {"id": boot.image_id, "name": boot.image_name}
        stored.append({"role": boot.role, "index": index_id, "size": size, "image": image})
    return stored


@journal.recovery(CREATE)
def _recover_create(ctx: Context, op: journal.OperationRecord) -> OperationStatus:
    """Resume a guest left paused, thaw one left frozen; before the record, drop this
    backup's snapshots or bitmaps (the repository keeps only unreferenced chunks,
    which gc removes); after it, keep them as the next diff base, drop the parent's
    and catalogue the backup."""
    domain = op.payload.get("domain")
    if domain:
        from snapback.drivers.hypervisor.backup_job import end_job, job_dir

        end_job(ctx.hypervisor, str(domain))  # a pull-mode job outlives its reader
        tracker = TRACKER_PREFIX + str(op.payload["backup"])
        shutil.rmtree(job_dir(ctx.settings.work, tracker), ignore_errors=True)
        if op.reached("pausing") and not op.reached("resumed"):
            ops.resume_quietly(ctx.hypervisor, str(domain))
        if op.reached("frozen") and not op.reached("thawed"):
            ops.thaw_quietly(ctx.hypervisor, str(domain), ops.THAW_WAIT_S)
    plans = [cap.DiskPlan.from_json(d) for d in op.data("snapping").get("disks", [])]
    if op.reached("recorded"):
        if not op.reached("rotated"):
            for plan in plans:
                cap.finish(ctx, plan, str(op.payload["backup"]))
        entry = op.data("recorded").get("catalog")
        if entry:  # journals older than this field: ``repo rebuild-catalog`` adds it
            backup_catalog.record_entry(ctx, entry)
        return OperationStatus.RECOVERED
    for plan in plans:
        cap.undo(ctx, plan)
    return OperationStatus.ROLLED_BACK

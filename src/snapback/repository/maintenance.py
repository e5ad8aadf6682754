"""Repository upkeep: gc (with the lock handshake of docs/repository-format.md) and check."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field

from snapback.domain.errors import NotFound
from snapback.repository.backends import Backend
from snapback.repository.repo import Repository, chunk_key, lock_stale, record_indexes
from snapback.repository.sealing import DamagedObject


@dataclass
class GcReport:
    backups: int = 0
    referenced_chunks: int = 0
    unreferenced_chunks: int = 0
    unreferenced_indexes: int = 0
    freed_bytes: int = 0
    removed: bool = False
    skipped: str | None = None  # why nothing was removed
    stale_locks: list[str] = field(default_factory=list)


def referenced(repo: Repository) -> tuple[set[str], set[str], int]:
    """(index ids, chunk ids, backups) that the backup records reference."""
    indexes: set[str] = set()
    chunks: set[str] = set()
    ids = repo.backup_ids()
    for backup_id in ids:
        record = repo.get_record(backup_id)
        for index_id in record_indexes(record):
            indexes.add(index_id)
            chunks.update(c for c in repo.get_index(index_id)["chunks"] if c)
    return indexes, chunks, len(ids)


def gc(repo: Repository, *, dry_run: bool = False) -> GcReport:
    """Remove indexes and chunks no backup record references.

    Never while a backup runs: the gc lock is written first, then the backup
    locks are read; a live one means "sweep skipped" (the report says so).
    """
    report = GcReport()
    with repo.gc_lock(secrets.token_hex(6)) as safe:
        indexes, chunks, report.backups = referenced(repo)
        report.referenced_chunks = len(chunks)
        doomed = [
            (info.key, info.size)
            for info in repo.backend.list_objects("chunks/")
            if info.key.rsplit("/", 1)[1] not in chunks
        ]
        doomed += [
            (info.key, info.size)
            for info in repo.backend.list_objects("indexes/")
            if info.key.rsplit("/", 1)[1] not in indexes
        ]
        report.unreferenced_chunks = sum(1 for k, _ in doomed if k.startswith("chunks/"))
        report.unreferenced_indexes = len(doomed) - report.unreferenced_chunks
        report.freed_bytes = sum(size for _, size in doomed)
        if dry_run:
            report.skipped = "dry run"
        elif not safe:
            report.skipped = "backups are running; sweep skipped (run gc again later)"
        else:
            for key, _ in doomed:
                repo.backend.delete(key)
            report.removed = True
        report.stale_locks = unlock(repo.backend, dry_run=dry_run)
    return report


def unlock(backend: Backend, *, everything: bool = False, dry_run: bool = False) -> list[str]:
    """The locks of dead processes (``lock_stale``), removed unless ``dry_run``; with
    ``everything``, every lock (the operator knows no snapback uses the repository)."""
    found = []
    for info in backend.list_objects("locks/"):
        with contextlib.suppress(NotFound, ValueError):
            dead = everything or lock_stale(json.loads(backend.get(info.key)), time.time())
            if dead:
                found.append(info.key)
                if not dry_run:
                    backend.delete(info.key)
    return found


@dataclass
class CheckReport:
    backups: int = 0
    chunks: int = 0
    read_bytes: int = 0
    problems: list[str] = field(default_factory=list)  # one line each: what and which backups
    unreferenced: int = 0


def check(repo: Repository, *, read_data: bool = False) -> CheckReport:
    """Every record readable, every index and chunk present (and intact with read_data);
    each damaged or missing object is named with the backups it breaks."""
    report = CheckReport()
    users: dict[str, list[str]] = {}
    for backup_id in repo.backup_ids():
        report.backups += 1
        try:
            record = repo.get_record(backup_id)
        except (NotFound, DamagedObject) as exc:
            report.problems.append(f"backup {backup_id}: record unreadable ({exc})")
            continue
        for index_id in record_indexes(record):
            try:
                index = repo.get_index(index_id)
            except (NotFound, DamagedObject) as exc:
                report.problems.append(f"index {index_id} ({exc}) breaks {backup_id}")
                continue
            for cid in {c for c in index["chunks"] if c}:
                users.setdefault(cid, []).append(backup_id)
    report.chunks = len(users)
    for cid, backups in sorted(users.items()):
        problem = None
        if read_data:
            try:
                report.read_bytes += len(repo.get_chunk(cid))
            except NotFound:
                problem = "missing"
            except DamagedObject:
                problem = "damaged (quarantined: the next backup of that data stores it again)"
                repo.quarantine(cid)
        elif repo.backend.stat(chunk_key(cid)) is None:
            problem = "missing"
        if problem:
            report.problems.append(f"chunk {cid} {problem}; breaks {', '.join(sorted(backups))}")
    stored = {i.key.rsplit("/", 1)[1] for i in repo.backend.list_objects("chunks/")}
    report.unreferenced = len(stored - set(users))
    return report


@dataclass
class SyncReport:
    copied: dict[str, int] = field(default_factory=dict)  # prefix -> objects copied
    copied_bytes: int = 0
    present: int = 0


PROBE = b"snapback content-id probe"


def sync(source: Repository, target: Repository) -> SyncReport:
    """Copy what ``target`` lacks, in the format's write order (chunks, indexes, records),
    so an interrupted sync leaves the target consistent and a rerun finishes it. Sealed
    objects are copied as they are: both repositories must name content alike (both
    unencrypted, or the target made with ``repo init --copy-keys-from``)."""
    from snapback.repository.sealing import RepositoryError

    if source.sealer.content_id(PROBE) != target.sealer.content_id(PROBE):
        raise RepositoryError(
            f"{target.backend.url} names content differently from {source.backend.url}; "
            "make it with 'repo init OTHER --copy-keys-from SOURCE' (or both unencrypted)"
        )
    report = SyncReport()
    for prefix in ("chunks/", "indexes/", "backups/"):
        have = {i.key for i in target.backend.list_objects(prefix)}
        for info in source.backend.list_objects(prefix):
            if info.key in have:
                report.present += 1
                continue
            blob = source.backend.get(info.key)
            target.backend.put(info.key, blob)
            report.copied[prefix.rstrip("/")] = report.copied.get(prefix.rstrip("/"), 0) + 1
            report.copied_bytes += len(blob)
    return report

"""``backup verify``: is every object a backup needs present and, with ``read_data``,
whole? A chunk that fails its checks is quarantined, so no later backup reuses it
(docs/backups.md, docs/repository-format.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from snapback.domain.errors import NotFound
from snapback.domain.models import Progress
from snapback.repository.repo import Repository, chunk_key, record_indexes
from snapback.repository.sealing import DamagedObject


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


def verify_backup(
    repo: Repository,
    backup_id: str,
    *,
    read_data: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> VerifyReport:
    """Check the backup's indexes and chunks: present (a ``stat`` each), or, with
    ``read_data``, read, authenticated, decompressed and hashed against their names."""
    record = repo.get_record(backup_id)
    missing: list[str] = []
    damaged: list[str] = []
    checked = total = 0
    for index_id in record_indexes(record):
        try:
            index = repo.get_index(index_id)
        except NotFound:
            missing.append(f"index {index_id}")
            continue
        except DamagedObject:
            damaged.append(f"index {index_id}")
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

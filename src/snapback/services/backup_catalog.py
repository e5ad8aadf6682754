"""The catalogue's list of backups: a cache of the repositories' backup records.

The repository is the truth (docs/repository-format.md: a record holds all a
restore needs). The catalogue keeps one ``BackupEntry`` per backup and
repository location so that "which repositories do I know", "how many backups
are there" and "the newest backup of this volume" are answered without reading
every record. ``rebuild`` makes a location's entries exactly its records again,
from the repository alone (after a lost catalogue, or backups written or
deleted elsewhere). A caller that acts on an entry reads the record itself: an
entry may be stale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from snapback.catalog.models import BackupEntry
from snapback.domain.errors import NotFound
from snapback.repository.repo import Repository
from snapback.repository.sealing import DamagedObject
from snapback.services.context import Context


def location(repo_url: str) -> str:
    """The form a repository is catalogued under: a folder's absolute path, a URL as given."""
    if "://" in repo_url:
        return repo_url
    return os.path.abspath(os.path.expanduser(repo_url))


@dataclass(frozen=True)
class EntryFields:
    """What the catalogue keeps of one backup record (instance or volume shape)."""

    backup_id: str
    kind: str
    source_name: str | None
    source_pool: str | None
    source_id: str | None
    created_at: float
    parent_id: str | None
    mode: str | None
    summary: str

    @classmethod
    def of(cls, record: dict[str, Any]) -> EntryFields:
        source = _dict(record.get("source"))
        instance = _dict(record.get("instance"))
        disks = [d for d in record.get("disks") or () if isinstance(d, dict)]
        summary = {
            "disks": len(disks),
            "size": sum(int(d.get("size") or 0) for d in disks),
            "stats": _dict(record.get("stats")),
        }
        return cls(
            backup_id=str(record["id"]),
            kind=str(record.get("kind") or "volume"),
            source_name=_text(source.get("name") or source.get("instance") or instance.get("name")),
            source_pool=_text(source.get("pool")),
            source_id=_text(source.get("volume_id") or source.get("instance_id")),
            created_at=float(record.get("created_at") or 0.0),
            parent_id=_text(record.get("parent")),
            mode=_text(record.get("mode")),
            summary=json.dumps(summary, sort_keys=True),
        )

    def apply(self, row: BackupEntry) -> bool:
        """Copy into ``row``; True when something changed."""
        changed = False
        for name, value in self.__dict__.items():
            if getattr(row, name) != value:
                setattr(row, name, value)
                changed = True
        return changed


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _entry(s: Session, loc: str, backup_id: str) -> BackupEntry | None:
    return s.scalars(
        select(BackupEntry).where(
            BackupEntry.repo_location == loc, BackupEntry.backup_id == backup_id
        )
    ).one_or_none()


def _upsert(s: Session, loc: str, repo_id: str, fields: EntryFields) -> str:
    """'added', 'updated' or 'unchanged'."""
    row = _entry(s, loc, fields.backup_id)
    if row is None:
        row = BackupEntry(repo_location=loc, repo_id=repo_id)
        fields.apply(row)
        s.add(row)
        return "added"
    changed = fields.apply(row)
    if row.repo_id != repo_id:
        row.repo_id, changed = repo_id, True
    return "updated" if changed else "unchanged"


def record(ctx: Context, repo_url: str, repo_id: str, record_dict: dict[str, Any]) -> str:
    """Catalogue one backup record (idempotent); 'added', 'updated' or 'unchanged'."""
    return record_entry(ctx, entry_of(repo_url, repo_id, record_dict))


def entry_of(repo_url: str, repo_id: str, record_dict: dict[str, Any]) -> dict[str, Any]:
    """What ``record_entry`` needs, as JSON: a backup journals it so that its recovery
    can catalogue the backup without the repository's URL, passphrase or record."""
    fields = EntryFields.of(record_dict)
    return {"location": location(repo_url), "repo_id": repo_id, "fields": asdict(fields)}


def record_entry(ctx: Context, entry: dict[str, Any]) -> str:
    """Catalogue an ``entry_of`` (idempotent); 'added', 'updated' or 'unchanged'."""
    fields = EntryFields(**entry["fields"])
    with ctx.transaction() as s:
        return _upsert(s, str(entry["location"]), str(entry["repo_id"]), fields)


def forget(ctx: Context, repo_url: str, backup_id: str) -> bool:
    """Drop a backup's entry (its record was deleted); True when there was one."""
    with ctx.transaction() as s:
        row = _entry(s, location(repo_url), backup_id)
        if row is None:
            return False
        s.delete(row)
        return True


def _read_records(repo: Repository) -> tuple[list[dict[str, Any]], list[str]]:
    """(readable records, ids of unreadable ones) of a repository."""
    records, unreadable = [], []
    for backup_id in repo.backup_ids():
        try:
            doc = repo.get_record(backup_id)
            EntryFields.of(doc)  # a record we cannot catalogue counts as unreadable
        except (NotFound, DamagedObject, ValueError, TypeError, KeyError):
            unreadable.append(backup_id)
            continue
        records.append(doc)
    return records, unreadable


def rebuild(ctx: Context, repo: Repository, repo_url: str) -> dict[str, Any]:
    """Make the entries of ``repo_url`` exactly the backup records in ``repo``.

    Adds the missing, refreshes the changed, removes the entries whose record is
    gone (an unreadable record keeps its entry: it is damaged, not gone; ``repo
    check`` names it). Reads the repository only."""
    loc = location(repo_url)
    records, unreadable = _read_records(repo)
    outcome: dict[str, list[str]] = {"added": [], "updated": [], "unchanged": []}
    with ctx.transaction() as s:
        for doc in records:
            outcome[_upsert(s, loc, repo.config.id, EntryFields.of(doc))].append(str(doc["id"]))
        keep = {str(doc["id"]) for doc in records} | set(unreadable)
        present = s.scalars(
            select(BackupEntry.backup_id).where(BackupEntry.repo_location == loc)
        ).all()
        removed = sorted(b for b in present if b not in keep)
        _delete(s, loc, removed)
    return {
        "repository": loc,
        "repo_id": repo.config.id,
        "backups": len(records),
        "added": sorted(outcome["added"]),
        "updated": sorted(outcome["updated"]),
        "unchanged": len(outcome["unchanged"]),
        "removed": removed,
        "unreadable": unreadable,
    }


def _delete(s: Session, loc: str, backup_ids: Iterable[str]) -> None:
    ids = list(backup_ids)
    if ids:
        s.execute(
            delete(BackupEntry).where(
                BackupEntry.repo_location == loc, BackupEntry.backup_id.in_(ids)
            )
        )


def latest(ctx: Context, repo_url: str, source_volume_id: str) -> str | None:
    """The newest catalogued backup of a volume (or instance) id in a repository."""
    with ctx.sessions() as s:
        found = s.scalars(
            select(BackupEntry.backup_id)
            .where(
                BackupEntry.repo_location == location(repo_url),
                BackupEntry.source_id == source_volume_id,
            )
            .order_by(BackupEntry.created_at.desc(), BackupEntry.backup_id.desc())
            .limit(1)
        ).first()
    return found


def entries(ctx: Context, repo_url: str) -> list[dict[str, Any]]:
    """A repository's catalogued backups, oldest first."""
    with ctx.sessions() as s:
        rows = s.scalars(
            select(BackupEntry)
            .where(BackupEntry.repo_location == location(repo_url))
            .order_by(BackupEntry.created_at, BackupEntry.backup_id)
        ).all()
        return [_as_dict(r) for r in rows]


def _as_dict(row: BackupEntry) -> dict[str, Any]:
    return {
        "id": row.backup_id,
        "repository": row.repo_location,
        "repo_id": row.repo_id,
        "kind": row.kind,
        "source": {"name": row.source_name, "pool": row.source_pool, "id": row.source_id},
        "created_at": row.created_at,
        "parent": row.parent_id,
        "mode": row.mode,
        "summary": json.loads(row.summary or "{}"),
    }


def known_repos(ctx: Context) -> list[dict[str, Any]]:
    """Every repository location the catalogue knows: its id, backups and newest one."""
    with ctx.sessions() as s:
        rows = s.execute(
            select(
                BackupEntry.repo_location,
                BackupEntry.repo_id,
                func.count(),
                func.max(BackupEntry.created_at),
            )
            .group_by(BackupEntry.repo_location, BackupEntry.repo_id)
            .order_by(BackupEntry.repo_location, BackupEntry.repo_id)
        ).all()
    return [
        {"repository": loc, "repo_id": rid, "backups": int(n), "newest": newest}
        for loc, rid, n, newest in rows
    ]

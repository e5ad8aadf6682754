"""Import an export archive (``archive``) into a repository.

Two passes over the file. The first checks everything and writes nothing:
member names, types, order and sizes (each refused before it is read), the
keys (the header's key check must match the target's), every sealed object
opened as a restore would (authentication, bounded decompression, content id =
name), the set of chunks = exactly what the indexes name, and the manifest's
sha256 of every member. The second writes what the target lacks in the
format's write order — chunks, indexes, the record last — under a backup lock
(gc never sweeps an import's chunks), checking each chunk's sha256 again in
case the file changed in between. So a damaged or hostile archive gets one
error and leaves the target as it was; an interrupted import leaves only
unreferenced objects, and running it again finishes it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from snapback.domain.errors import InvalidInput, NotFound
from snapback.repository.archive import (
    BACKUP,
    BACKUP_ID,
    CHUNK_MEMBER,
    CONFIG,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    HEADER,
    INDEX_MEMBER,
    MANIFEST,
    MANIFEST_MEMBER,
    SINGLE,
    SMALL_MEMBER,
    check_chunk,
    classify,
    key_check,
    open_index,
    open_record,
    sealed_cap,
)
from snapback.repository.repo import Repository, record_indexes
from snapback.repository.sealing import MAX_PLAIN, DamagedObject, RepositoryError

READ_LIMIT = sealed_cap(MAX_PLAIN)  # no single read of the file may ask for more


class ArchiveRefused(InvalidInput):
    """The file is not a usable export archive; nothing was imported."""


@dataclass
class ImportReport:
    backup: str
    source_repository: str
    written: dict[str, int] = field(default_factory=dict)  # chunks/indexes/backups written
    present: int = 0  # objects the target already had
    written_bytes: int = 0
    record: dict[str, Any] = field(default_factory=dict, repr=False)


class _Guarded:
    """The archive file for tarfile, refusing any single read over ``READ_LIMIT`` (a
    hostile pax or long-name header declaring gigabytes is refused, not allocated)."""

    def __init__(self, f: IO[bytes], refuse: Callable[[str], ArchiveRefused]) -> None:
        self.f, self.refuse = f, refuse

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > READ_LIMIT:
            raise self.refuse(f"a member or header declares {size} bytes, over any cap")
        return self.f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


class _Checker:
    """The first pass: one method per member kind, each refusing what is wrong."""

    def __init__(self, repo: Repository, where: str) -> None:
        self.repo, self.where = repo, where
        self.header: dict[str, Any] = {}
        self.backup_id = ""
        self.record: dict[str, Any] = {}
        self.record_blob = b""
        self.indexes: dict[str, bytes] = {}
        self.wanted_indexes: set[str] = set()
        self.wanted_chunks: set[str] = set()
        self.seen_chunks: set[str] = set()
        self.sums: dict[str, dict[str, Any]] = {}

    def refuse(self, why: str) -> ArchiveRefused:
        return ArchiveRefused(f"{self.where} is not a usable snapback export: {why}; nothing "
                              "was imported")  # fmt: skip

    def cap(self, kind: int) -> int:
        if kind in (HEADER, CONFIG):
            return SMALL_MEMBER
        if kind == CHUNK_MEMBER:
            return sealed_cap(self.repo.config.chunk_size)
        return MANIFEST_MEMBER if kind == MANIFEST else sealed_cap(MAX_PLAIN)

    def on_header(self, _oid: str, data: bytes) -> None:
        doc = _json_or_none(data)
        if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
            raise self.refuse("its first member is not a snapback export header")
        if not isinstance(doc.get("version"), int) or doc["version"] > EXPORT_VERSION:
            raise self.refuse(
                f"archive version {doc.get('version')!r}; this snapback reads up to "
                f"{EXPORT_VERSION}: upgrade snapback"
            )
        if not BACKUP_ID.fullmatch(str(doc.get("backup", ""))):
            raise self.refuse("the header names no valid backup id")
        self.header, self.backup_id = doc, str(doc["backup"])
        self._check_keys(doc)

    def _check_keys(self, doc: dict[str, Any]) -> None:
        """Sealed objects are imported as they are: the target must hold the same keys."""
        source = doc.get("repository")
        if not isinstance(source, dict):
            raise self.refuse("the header does not describe the source repository")
        target = self.repo.config
        if source.get("chunk_size") != target.chunk_size:
            raise self.refuse(
                f"chunk size {source.get('chunk_size')} differs from the target's "
                f"{target.chunk_size}"
            )
        if bool(source.get("encrypted")) != target.encrypted or doc.get("key_check") != key_check(
            self.repo
        ):
            state = "encrypted" if source.get("encrypted") else "unencrypted"
            raise RepositoryError(
                f"{self.where} holds objects sealed by repository {source.get('id')} "
                f"({state}), whose keys {self.repo.backend.url} does not share; import into "
                "that repository, or into one made with 'repo init NEW --copy-keys-from "
                "THAT' (unencrypted archives: an unencrypted repository)"
            )

    def on_config(self, _oid: str, data: bytes) -> None:
        doc = _json_or_none(data)
        repo_doc = self.header.get("repository")
        if not isinstance(doc, dict) or not isinstance(repo_doc, dict):
            raise self.refuse("the config member is not readable")
        if doc.get("id") != repo_doc.get("id"):
            raise self.refuse("the config is not the one of the repository the header names")

    def on_backup(self, oid: str, data: bytes) -> None:
        if oid != self.backup_id:
            raise self.refuse(f"it holds record {oid}, its header names {self.backup_id}")
        self.record = open_record(self.repo, oid, data)
        self.record_blob = data
        self.wanted_indexes = set(record_indexes(self.record))

    def on_index(self, oid: str, data: bytes) -> None:
        if oid not in self.wanted_indexes:
            raise self.refuse(f"index {oid} is not one the record names")
        self.wanted_chunks |= open_index(self.repo, oid, data)
        self.indexes[oid] = data

    def on_chunk(self, oid: str, data: bytes) -> None:
        if not self.indexes.keys() == self.wanted_indexes:
            raise self.refuse("chunks come before all the indexes")
        if oid not in self.wanted_chunks:
            raise self.refuse(f"chunk {oid} is not named by the backup's indexes")
        check_chunk(self.repo, oid, data)
        self.seen_chunks.add(oid)

    def on_manifest(self, _oid: str, data: bytes) -> None:
        doc = _json_or_none(data)
        members = doc.get("members") if isinstance(doc, dict) else None
        if not isinstance(members, dict):
            raise self.refuse("the manifest is not readable")
        if set(members) != set(self.sums):
            raise self.refuse("the manifest does not list exactly the archive's members")
        for name, got in self.sums.items():
            if members[name] != got:
                raise self.refuse(f"member {name} does not match the manifest's sha256")
        if self.indexes.keys() != self.wanted_indexes or self.seen_chunks != self.wanted_chunks:
            missing = len(self.wanted_indexes - set(self.indexes))
            missing += len(self.wanted_chunks - self.seen_chunks)
            raise self.refuse(f"{missing} objects the backup needs are not in it")


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _members(tar: tarfile.TarFile, checker: _Checker) -> Iterator[tuple[str, int, str, bytes]]:
    """(kind, object id, data) of each member in turn, after the structural checks."""
    last = -1
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as exc:
            raise checker.refuse(f"unreadable tar ({exc})") from exc
        if member is None:
            break
        cast(Any, tar).members.clear()  # tarfile keeps every member; we never look back
        try:
            kind, oid = classify(member.name)
        except ValueError as exc:
            raise checker.refuse(str(exc)) from exc
        if not member.isfile() or member.issparse() or member.type == tarfile.CONTTYPE:
            raise checker.refuse(f"member {member.name!r} is not a plain file")
        if last == MANIFEST or kind < last or (kind == last and kind in SINGLE):
            raise checker.refuse(f"member {member.name!r} is out of place")
        if last < BACKUP and kind != last + 1:
            raise checker.refuse("it does not start with its header, config and record")
        if member.size > checker.cap(kind):
            raise checker.refuse(f"member {member.name!r} is {member.size} bytes, over its cap")
        extracted = tar.extractfile(member)
        assert extracted is not None
        try:
            data = extracted.read()
        except tarfile.TarError as exc:
            raise checker.refuse(f"member {member.name!r} is cut short ({exc})") from exc
        if len(data) != member.size:
            raise checker.refuse(f"member {member.name!r} is cut short")
        last = kind
        yield member.name, kind, oid, data
    if last != MANIFEST:
        raise checker.refuse("it ends before its manifest (cut short?)")


def _open_tar(f: IO[bytes], checker: _Checker) -> tarfile.TarFile:
    f.seek(0)
    try:
        return tarfile.open(fileobj=cast(IO[bytes], _Guarded(f, checker.refuse)), mode="r:")
    except tarfile.TarError as exc:
        raise checker.refuse(f"not a tar file ({exc})") from exc


def _check(repo: Repository, f: IO[bytes], where: str) -> _Checker:
    checker = _Checker(repo, where)
    handlers = {
        HEADER: checker.on_header,
        CONFIG: checker.on_config,
        BACKUP: checker.on_backup,
        INDEX_MEMBER: checker.on_index,
        CHUNK_MEMBER: checker.on_chunk,
        MANIFEST: checker.on_manifest,
    }
    with _open_tar(f, checker) as tar:
        for name, kind, oid, data in _members(tar, checker):
            if kind != MANIFEST:
                checker.sums[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            try:
                handlers[kind](oid, data)
            except DamagedObject as exc:
                raise checker.refuse(f"member {name} is damaged ({exc})") from exc
    return checker


def _put(repo: Repository, key: str, data: bytes, report: ImportReport, kind: str) -> None:
    if repo.backend.exists(key) or not repo.backend.put(key, data):
        report.present += 1
        return
    report.written[kind] = report.written.get(kind, 0) + 1
    report.written_bytes += len(data)


def _write(repo: Repository, f: IO[bytes], checked: _Checker) -> ImportReport:
    source = checked.header["repository"]
    report = ImportReport(checked.backup_id, str(source.get("id")), record=checked.record)
    bad = repo.quarantined()
    lock_id = f"{checked.backup_id}.import-{secrets.token_hex(4)}"
    with repo.backup_lock(lock_id, checked.record.get("parent")) as held:
        done: set[str] = set()
        with _open_tar(f, checked) as tar:
            for name, kind, oid, data in _members(tar, checked):
                if kind != CHUNK_MEMBER:
                    continue
                if hashlib.sha256(data).hexdigest() != checked.sums[name]["sha256"]:
                    raise checked.refuse(f"member {name} changed while it was being imported")
                if oid in bad:  # a quarantined chunk: storing it again repairs its backups
                    repo.backend.delete(f"quarantine/{oid}")
                _put(repo, name, data, report, "chunks")
                done.add(oid)
        if done != checked.wanted_chunks:
            raise checked.refuse("the file changed while it was being imported")
        for iid, blob in sorted(checked.indexes.items()):
            _put(repo, f"indexes/{iid}", blob, report, "indexes")
        held()  # gc must not have swept while we wrote
        _put(repo, f"backups/{checked.backup_id}", checked.record_blob, report, "backups")
    return report


def import_backup(repo: Repository, path: str | Path) -> ImportReport:
    """Check the archive at ``path`` entirely, then store what ``repo`` lacks of it."""
    where = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - two passes over one open file
    except FileNotFoundError as exc:
        raise NotFound(f"{where} does not exist") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot read {where}: {exc.strerror}") from exc
    with f:
        checked = _check(repo, f, where)
        return _write(repo, f, checked)

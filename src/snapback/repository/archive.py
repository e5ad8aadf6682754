"""One backup as a self-contained archive file (docs/repository-format.md, "Export archives").

The archive is a plain POSIX tar (pax) file whose members are, in this order:

1. ``snapback-export.json``: what the archive holds and which keys sealed it;
2. ``config``: the source repository's config, as stored;
3. ``backups/<backup-id>``: the backup record, sealed, as stored;
4. ``indexes/<id>``: each disk's index, sealed, as stored;
5. ``chunks/<id[0:2]>/<id>``: every chunk the indexes name, sealed, as stored;
6. ``manifest.json``: the sha256 and size of every member above.

Member names are repository keys, so an importer writes each object under the
name it had; it never builds a path from a member name. Export reads each
object once, checks it as a restore would, and writes the file under
``FILE.tmp``, renamed to ``FILE`` only when complete (never over an existing file).
Import lives in ``archive_import``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from snapback.domain.errors import Conflict, InvalidInput, NotFound
from snapback.repository.maintenance import PROBE
from snapback.repository.repo import Repository, chunk_key, record_indexes
from snapback.repository.sealing import CHUNK, INDEX, MAX_PLAIN, RECORD, DamagedObject

EXPORT_FORMAT, EXPORT_VERSION = "snapback-export", 1
HEADER_NAME, CONFIG_NAME, MANIFEST_NAME = "snapback-export.json", "config", "manifest.json"
MAX_DISKS = 256
SMALL_MEMBER = 1 << 20  # header and config
MANIFEST_MEMBER = MAX_PLAIN

# member kinds, in the order the archive must hold them
HEADER, CONFIG, BACKUP, INDEX_MEMBER, CHUNK_MEMBER, MANIFEST = range(6)
SINGLE = {HEADER, CONFIG, BACKUP, MANIFEST}

_BACKUP_ID = r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}"
_HEX64 = r"[0-9a-f]{64}"
_NAMES = [
    (HEADER, re.compile(re.escape(HEADER_NAME))),
    (CONFIG, re.compile(CONFIG_NAME)),
    (BACKUP, re.compile(rf"backups/({_BACKUP_ID})")),
    (INDEX_MEMBER, re.compile(rf"indexes/({_HEX64})")),
    (CHUNK_MEMBER, re.compile(rf"chunks/([0-9a-f]{{2}})/({_HEX64})")),
    (MANIFEST, re.compile(re.escape(MANIFEST_NAME))),
]
HEX64 = re.compile(_HEX64)
BACKUP_ID = re.compile(_BACKUP_ID)


def sealed_cap(plain: int) -> int:
    """The largest sealed object a plaintext of ``plain`` bytes may become (zstd's
    worst case plus the header, nonce and tag), so a member over it is refused unread."""
    return plain + (plain >> 7) + 4096


def classify(name: str) -> tuple[int, str]:
    """(member kind, object id) of an archive member name; ValueError for any other name."""
    for kind, pattern in _NAMES:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        if kind == CHUNK_MEMBER:
            if m.group(2)[:2] != m.group(1):
                break
            return kind, m.group(2)
        return kind, m.group(1) if m.groups() else ""
    raise ValueError(f"unexpected member {name!r}")


# -- opening sealed objects as a restore would --------------------------------------------


def open_record(repo: Repository, backup_id: str, blob: bytes) -> dict[str, Any]:
    """The record sealed in ``blob``, checked: names itself, names well-formed indexes."""
    key = f"backups/{backup_id}"
    doc = _json(repo.sealer.open(RECORD, key, blob), key)
    if not isinstance(doc, dict) or doc.get("id") != backup_id:
        raise DamagedObject(f"{key} does not name itself")
    disks = doc.get("disks")
    if not isinstance(disks, list) or not 0 < len(disks) <= MAX_DISKS:
        raise DamagedObject(f"{key} lists no disks (or too many)")
    boot = doc.get("boot_files", [])
    if not isinstance(boot, list) or len(boot) > MAX_DISKS:
        raise DamagedObject(f"{key} lists its boot files wrongly")
    for entry in [*disks, *boot]:
        if not isinstance(entry, dict) or not HEX64.fullmatch(str(entry.get("index", ""))):
            raise DamagedObject(f"{key} names an index that is not a content id")
    return doc


def open_index(repo: Repository, index_id: str, blob: bytes) -> set[str]:
    """The chunk ids an index sealed in ``blob`` names, after checking it is that index."""
    key = f"indexes/{index_id}"
    plain = repo.sealer.open(INDEX, key, blob)
    if repo.sealer.content_id(plain) != index_id:
        raise DamagedObject(f"{key} does not hold what its name says")
    doc = _json(plain, key)
    chunks = doc.get("chunks") if isinstance(doc, dict) else None
    if not isinstance(chunks, list):
        raise DamagedObject(f"{key} has no chunk list")
    ids = {c for c in chunks if c is not None}
    if not all(isinstance(c, str) and HEX64.fullmatch(c) for c in ids):
        raise DamagedObject(f"{key} names a chunk that is not a content id")
    return ids


def check_chunk(repo: Repository, chunk_id: str, blob: bytes) -> None:
    key = chunk_key(chunk_id)
    plain = repo.sealer.open(CHUNK, key, blob, max_plain=repo.config.chunk_size)
    if repo.chunk_id(plain) != chunk_id:
        raise DamagedObject(f"chunk {chunk_id} does not hold the data its name says")


def _json(plain: bytes, what: str) -> Any:
    try:
        return json.loads(plain)
    except ValueError as exc:
        raise DamagedObject(f"{what} is not readable JSON") from exc


def key_check(repo: Repository) -> str:
    """Names the keys that seal a repository's objects without revealing them (a keyed
    hash of a fixed text): equal for repositories sharing keys, and for unencrypted ones."""
    return repo.sealer.content_id(PROBE)


# -- export ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    backup: str
    file: str
    indexes: int
    chunks: int
    bytes: int


class _TarWriter:
    """Writes members and remembers each one's sha256 and size for the manifest."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by finish()
        self.members: dict[str, dict[str, Any]] = {}
        self.now = int(time.time())

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self.now, 0o600
        self.tar.addfile(info, io.BytesIO(data))
        self.members[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def finish(self, backup_id: str) -> None:
        manifest = {"format": EXPORT_FORMAT, "backup": backup_id, "members": self.members}
        self.add(MANIFEST_NAME, json.dumps(manifest, indent=0, sort_keys=True).encode())
        self.tar.close()


def _fetch(repo: Repository, key: str, backup_id: str) -> bytes:
    try:
        return repo.backend.get(key)
    except NotFound as exc:
        raise NotFound(
            f"backup {backup_id} cannot be exported: {key} is missing from "
            f"{repo.backend.url} ('repo check' names what is broken)"
        ) from exc


def export_backup(repo: Repository, backup_id: str, path: str | Path) -> ExportReport:
    """Write backup ``backup_id`` and everything it needs into the archive ``path``."""
    target = Path(path)
    if not BACKUP_ID.fullmatch(backup_id):
        raise InvalidInput(f"invalid backup id {backup_id!r}")
    if target.exists() or target.is_symlink():
        raise Conflict(f"{target} exists; export never overwrites a file")
    record_blob = _fetch(repo, f"backups/{backup_id}", backup_id)
    record = open_record(repo, backup_id, record_blob)
    indexes: dict[str, bytes] = {}
    chunk_ids: set[str] = set()
    for iid in record_indexes(record):
        indexes[iid] = _fetch(repo, f"indexes/{iid}", backup_id)
        chunk_ids |= open_index(repo, iid, indexes[iid])
    header = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "backup": backup_id,
        "exported_at": time.time(),
        "repository": {
            "id": repo.config.id,
            "chunk_size": repo.config.chunk_size,
            "encrypted": repo.config.encrypted,
        },
        "key_check": key_check(repo),
        "objects": {"indexes": len(indexes), "chunks": len(chunk_ids)},
    }
    with _new_file(target) as f:
        out = _TarWriter(f)
        out.add(HEADER_NAME, json.dumps(header, indent=1, sort_keys=True).encode())
        out.add(CONFIG_NAME, repo.backend.get("config"))
        out.add(f"backups/{backup_id}", record_blob)
        for iid, blob in sorted(indexes.items()):
            out.add(f"indexes/{iid}", blob)
        for cid in sorted(chunk_ids):
            blob = _fetch(repo, chunk_key(cid), backup_id)
            check_chunk(repo, cid, blob)  # a damaged chunk is named now, not at import
            out.add(chunk_key(cid), blob)
        out.finish(backup_id)
    return ExportReport(backup_id, str(target), len(indexes), len(chunk_ids), target.stat().st_size)


@contextlib.contextmanager
def _new_file(target: Path) -> Iterator[IO[bytes]]:
    """``target.tmp`` opened for writing (refused if it exists), synced and renamed to
    ``target`` on success (never over an existing file), removed on failure."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise Conflict(
            f"{tmp} exists: another export is writing it, or one was interrupted (remove it)"
        ) from exc
    except OSError as exc:
        raise InvalidInput(f"cannot create {tmp}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)  # unlike rename, never replaces a file that appeared
        except FileExistsError as exc:
            raise Conflict(f"{target} appeared meanwhile; export never overwrites a file") from exc
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

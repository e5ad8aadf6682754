"""A backup repository on a backend (docs/repository-format.md).

``Repository.init`` writes ``config`` (and a key file when encrypted);
``Repository.open`` reads them back. Chunks, indexes and backup records go in
through ``put_*`` in the format's write order; every read checks what it got.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from snapback.domain.errors import Conflict, InvalidInput, NotFound
from snapback.repository.backends import Backend, BackendError
from snapback.repository.backends.local import LocalBackend
from snapback.repository.sealing import (
    CHUNK,
    DEFAULT_HASH,
    INDEX,
    RECORD,
    DamagedObject,
    MasterKeys,
    RepositoryError,
    Sealer,
    open_keys,
    seal_keys,
)

FORMAT, VERSION = "snapback-repository", 1
CHUNK_SIZE = 4 << 20
LOCK_REFRESH_S = 60.0
LOCK_STALE_S = 15 * 60.0


def open_backend(url: str) -> Backend:
    """A repository location: a folder path, or ``s3://bucket[/prefix]?endpoint=...``."""
    if url.startswith("s3://"):
        s3 = importlib.import_module("snapback.repository.backends.s3")  # needs boto3
        backend: Backend = s3.S3Backend.from_url(url, dict(os.environ))
        return backend
    if "://" in url:
        raise InvalidInput(f"unknown repository location {url!r} (a folder or s3://...)")
    return LocalBackend(url)


def chunk_key(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def new_backup_id() -> str:
    """``YYYYMMDDTHHMMSS.ffffffZ-<8 hex>``: sorts in time order, unique."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Config:
    id: str
    chunk_size: int
    encrypted: bool
    hash: str = DEFAULT_HASH


class Repository:
    def __init__(self, backend: Backend, config: Config, sealer: Sealer) -> None:
        self.backend, self.config, self.sealer = backend, config, sealer

    # -- life ------------------------------------------------------------------------
    @classmethod
    def init(
        cls, backend: Backend, passphrase: str | None = None, *, keys_from: Repository | None = None
    ) -> Repository:
        """A new repository; ``keys_from``: share that repository's master keys (same
        content ids, so ``repo sync`` copies objects as they are). A missing S3 bucket
        is created."""
        backend.prepare()
        if backend.exists("config"):
            raise Conflict(f"{backend.url} already holds a repository")
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "id": str(uuid.uuid4()),
            "chunk_size": CHUNK_SIZE,
            "hash": keys_from.config.hash if keys_from is not None else DEFAULT_HASH,
            "compression": "zstd",
            "encryption": None,
        }
        keys = keys_from.sealer.keys if keys_from is not None else None
        if keys is not None and passphrase is None:
            raise InvalidInput("the source repository is encrypted: give a passphrase")
        if passphrase is not None:
            if len(passphrase) < 8:
                raise InvalidInput("a repository passphrase needs at least 8 characters")
            keys = keys or MasterKeys.generate()
            doc["encryption"] = {"cipher": "aes-256-gcm", "kdf": "argon2id"}
            backend.put(f"keys/{secrets.token_hex(8)}", seal_keys(keys, passphrase))
        if not backend.put("config", json.dumps(doc, indent=1).encode()):
            raise Conflict(f"{backend.url} already holds a repository")
        config = Config(doc["id"], CHUNK_SIZE, keys is not None, doc["hash"])
        return cls(backend, config, Sealer(keys, id_hash=config.hash))

    @classmethod
    def open(cls, backend: Backend, passphrase: str | None = None) -> Repository:
        try:
            doc = json.loads(backend.get("config"))
        except NotFound as exc:
            raise NotFound(f"{backend.url} holds no snapback repository ('repo init' it)") from exc
        except ValueError as exc:
            raise DamagedObject(f"{backend.url}: config is not readable JSON") from exc
        if doc.get("format") != FORMAT:
            raise RepositoryError(f"{backend.url} is not a snapback repository")
        if int(doc.get("version", 0)) > VERSION:
            raise RepositoryError(
                f"{backend.url} has format version {doc['version']}; this snapback reads "
                f"up to {VERSION}: upgrade snapback"
            )
        keys = None
        if doc.get("encryption"):
            if passphrase is None:
                raise InvalidInput(
                    "the repository is encrypted: give its passphrase "
                    "(SNAPBACK_REPO_PASSPHRASE or --passphrase-file)"
                )
            keys = cls._unlock(backend, passphrase)
        id_hash = str(doc.get("hash", "blake2b-256"))
        config = Config(doc["id"], int(doc["chunk_size"]), keys is not None, id_hash)
        return cls(backend, config, Sealer(keys, id_hash=id_hash))

    @staticmethod
    def _unlock(backend: Backend, passphrase: str) -> MasterKeys:
        from snapback.repository.sealing import WrongPassphrase

        last: Exception | None = None
        for info in backend.list_objects("keys/"):
            try:
                return open_keys(backend.get(info.key), passphrase)
            except WrongPassphrase as exc:
                last = exc
        raise last or RepositoryError(f"{backend.url} is encrypted but has no key file")

    # -- chunks ----------------------------------------------------------------------
    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        return self.sealer.content_id(data)

    def put_chunk(
        self,
        data: bytes | bytearray | memoryview,
        chunk_id: str | None = None,
        *,
        repairs: bool = False,
    ) -> tuple[str, bool]:
        """Store a chunk once; (id, True when new). ``repairs``: the chunk is in
        quarantine, and storing it again mends the backups that name it."""
        cid = chunk_id or self.chunk_id(data)
        key = chunk_key(cid)
        if self.backend.exists(key):  # safe: gc does not sweep while our lock lives
            return cid, False
        if repairs:
            self.backend.delete(f"quarantine/{cid}")
        written = self.backend.put_parts(key, self.sealer.seal_parts(CHUNK, key, data))
        if not written:  # appeared meanwhile (another backup): it is fresh
            return cid, False
        return cid, True

    def get_chunk(self, chunk_id: str) -> bytes:
        key = chunk_key(chunk_id)
        data = self.sealer.open(CHUNK, key, self.backend.get(key), max_plain=self.config.chunk_size)
        if self.chunk_id(data) != chunk_id:
            raise DamagedObject(f"chunk {chunk_id} does not hold the data its name says")
        return data

    def prefetch_chunk(self, chunk_id: str) -> None:
        """A hint: this chunk will be read soon."""
        self.backend.prefetch(chunk_key(chunk_id))

    def get_chunk_into(self, chunk_id: str, out: memoryview) -> memoryview:
        """``get_chunk`` into the caller's buffer (at least a chunk long); the filled part."""
        key = chunk_key(chunk_id)
        data = self.sealer.open_into(
            CHUNK, key, self.backend.get(key), out[: self.config.chunk_size]
        )
        if self.chunk_id(data) != chunk_id:
            raise DamagedObject(f"chunk {chunk_id} does not hold the data its name says")
        return data

    def quarantine(self, chunk_id: str) -> None:
        """Move a chunk that failed its checks out of ``chunks/`` (kept for forensics in
        ``quarantine/``), so no later backup reuses it: the next one that reads the same
        data stores it again, which also repairs the older backups naming it."""
        key = chunk_key(chunk_id)
        with contextlib.suppress(NotFound):
            self.backend.put(f"quarantine/{chunk_id}", self.backend.get(key), overwrite=True)
        self.backend.delete(key)

    def quarantined(self) -> set[str]:
        return {i.key.rsplit("/", 1)[1] for i in self.backend.list_objects("quarantine/")}

    # -- indexes and records ------------------------------------------------------------
    def _put_json(self, kind: int, prefix: str, doc: dict[str, Any], name: str | None) -> str:
        plain = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        oid = name or self.sealer.content_id(plain)
        key = f"{prefix}/{oid}"
        if not self.backend.put(key, self.sealer.seal(kind, key, plain)) and name is not None:
            raise Conflict(f"{key} already exists in {self.backend.url}")
        return oid

    def _get_json(self, kind: int, prefix: str, oid: str, *, content_named: bool) -> dict[str, Any]:
        key = f"{prefix}/{oid}"
        try:
            blob = self.backend.get(key)
        except NotFound as exc:
            raise NotFound(f"{key} is missing from {self.backend.url}") from exc
        plain = self.sealer.open(kind, key, blob)
        if content_named and self.sealer.content_id(plain) != oid:
            raise DamagedObject(f"{key} does not hold what its name says")
        try:
            doc = json.loads(plain)
        except (ValueError, RecursionError) as exc:  # nested past Python's stack
            raise DamagedObject(f"{key} is not readable") from exc
        if not isinstance(doc, dict):
            raise DamagedObject(f"{key} is not readable: not a JSON object")
        return doc

    def put_index(self, doc: dict[str, Any]) -> str:
        return self._put_json(INDEX, "indexes", doc, None)

    def get_index(self, index_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._get_json(INDEX, "indexes", index_id, content_named=True)
        return doc

    def put_record(self, record: dict[str, Any]) -> str:
        return self._put_json(RECORD, "backups", record, str(record["id"]))

    def get_record(self, backup_id: str) -> dict[str, Any]:
        if "/" in backup_id or not backup_id:
            raise InvalidInput(f"invalid backup id {backup_id!r}")
        doc: dict[str, Any] = self._get_json(RECORD, "backups", backup_id, content_named=False)
        if doc.get("id") != backup_id:
            raise DamagedObject(f"backup record {backup_id} names itself {doc.get('id')!r}")
        return doc

    def backup_ids(self) -> list[str]:
        return sorted(i.key.split("/", 1)[1] for i in self.backend.list_objects("backups/"))

    def delete_record(self, backup_id: str) -> None:
        self.get_record(backup_id)  # exists and is ours
        self.backend.delete(f"backups/{backup_id}")

    # -- locks ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def backup_lock(
        self, backup_id: str, parent: str | None, wait: float = 600.0
    ) -> Iterator[Callable[[], None]]:
        """Announce a running backup (gc then sweeps nothing); waits while a gc sweeps.

        Yields ``held()``: it raises if the lock's heartbeat lapsed (gc may then have
        swept), so a backup calls it before writing its record."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock("backup", backup_id, {"parent": parent}) as held:
                if not self.live_locks("gc"):
                    yield held
                    return
            if time.monotonic() > deadline:
                raise RepositoryError(f"{self.backend.url}: a gc has been sweeping for too long")
            time.sleep(1.0)

    @contextlib.contextmanager
    def gc_lock(self, gc_id: str) -> Iterator[bool]:
        """Hold the gc lock; yields True when no backup runs (sweeping is safe)."""
        with self._lock("gc", gc_id, {}) as held:
            yield not self.live_locks("backup")
            held()

    @contextlib.contextmanager
    def _lock(self, kind: str, lock_id: str, extra: dict[str, Any]) -> Iterator[Callable[[], None]]:
        """Write ``locks/<kind>-<id>``, refresh it in the background, remove it at the end.

        Yields ``held()``, which raises when the heartbeat could not be written for so
        long that others may take the lock for a dead one's."""
        key = f"locks/{kind}-{lock_id}"
        started = time.time()
        stop = threading.Event()
        beat_at, beat_error = [started], [""]

        def write() -> None:
            doc = {"kind": kind, "id": lock_id, "started": started, "at": time.time(), **extra}
            doc |= holder()
            self.backend.put(key, json.dumps(doc).encode(), overwrite=True)
            beat_at[0] = time.time()

        write()

        def refresh() -> None:
            while not stop.wait(LOCK_REFRESH_S):
                try:
                    write()
                except BackendError as exc:  # retried next minute; held() reports a lapse
                    beat_error[0] = str(exc)

        def held() -> None:
            if time.time() - beat_at[0] >= LOCK_STALE_S - LOCK_REFRESH_S:
                raise RepositoryError(
                    f"the {kind} lock on {self.backend.url} lapsed ({beat_error[0]}); "
                    "nothing was committed: run it again"
                )

        thread = threading.Thread(target=refresh, daemon=True)
        thread.start()
        try:
            yield held
        finally:
            stop.set()
            thread.join()
            self.backend.delete(key)

    def live_locks(self, kind: str) -> list[dict[str, Any]]:
        now, found = time.time(), []
        for info in self.backend.list_objects("locks/"):
            if not info.key.startswith(f"locks/{kind}-"):
                continue
            with contextlib.suppress(NotFound, ValueError):
                doc = json.loads(self.backend.get(info.key))
                if not lock_stale(doc, now):
                    found.append(doc)
        return found


def holder() -> dict[str, Any]:
    """Who writes a lock: enough for a process on the same machine to tell at once
    that the holder died (this kernel's boot id, the pid namespace, the pid and that
    pid's start time, since pids are reused); the host name is for people."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(),
            "pid": pid, "pid_started": _started(pid)}  # fmt: skip


def lock_stale(doc: dict[str, Any], now: float) -> bool:
    """A lock whose heartbeat is older than ``LOCK_STALE_S``, or one written on this
    running kernel, in this pid namespace, by a process that no longer runs (killed:
    nobody waits out its 15 minutes). A lock of another machine, container or boot
    is judged by its heartbeat alone."""
    if now - float(doc.get("at", 0)) >= LOCK_STALE_S:
        return True
    boot = _boot_id()
    if boot is None or doc.get("boot") != boot or doc.get("pidns") != _pid_namespace():
        return False
    try:
        pid = int(doc["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return pid > 0 and _started(pid) != doc.get("pid_started")


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks after boot); None when it does not run."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) "
    try:
        return int(fields[19])  # field 22 of proc(5); fields here start at field 3
    except (IndexError, ValueError):
        return None


def record_indexes(record: dict[str, Any]) -> list[str]:
    """Every index a backup record references: its disks', then its boot files'."""
    entries = [*record["disks"], *record.get("boot_files", [])]
    return [str(e["index"]) for e in entries]

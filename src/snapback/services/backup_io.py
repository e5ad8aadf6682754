"""Moving chunks between a disk and a repository, on worker threads.

Reads stay on the calling thread, in disk order (a block handle is not shared);
the costly parts — the zero test, SHA-256, zstd, AES-GCM and the backend's
write or HTTP request — run on a small pool of threads, all of which release
the GIL. At most ``IN_FLIGHT`` chunks are held at once, so memory stays flat
whatever the disk's size (docs/backups.md, "How fast").
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

from snapback.domain.errors import InvalidInput
from snapback.domain.models import Progress
from snapback.drivers.buffers import BufferPool, is_zero, keep_freed_memory, shared_pool
from snapback.drivers.storage.base import BlockHandle, ProgressFn
from snapback.repository.repo import Repository

# Twice the cores: a worker waiting on fsync or a write leaves its core to another.
WORKERS = max(4, min(8, 2 * (os.cpu_count() or 2)))
IN_FLIGHT = 2 * WORKERS
SPARSE_BLOCK = 64 << 10
T = TypeVar("T")


@dataclass
class StoreStats:
    read_bytes: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    reused_chunks: int = 0
    zero_chunks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {
            "read_bytes": self.read_bytes,
            "new_chunks": self.new_chunks,
            "new_bytes": self.new_bytes,
            "reused_chunks": self.reused_chunks,
        }


def data_runs(data: memoryview, block: int = SPARSE_BLOCK) -> list[tuple[int, int]]:
    """(offset, length) runs of ``data`` that are not all zero, in ``block`` steps."""
    runs: list[tuple[int, int]] = []
    if is_zero(data):
        return runs
    for off in range(0, len(data), block):
        piece = data[off : off + block]
        if is_zero(piece):
            continue
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + len(piece))
        else:
            runs.append((off, len(piece)))
    return runs


def _bounded_map(
    items: Iterable[tuple[int, T]],
    work: Callable[[int, T], None],
    progress: Callable[[int], None],
) -> None:
    """Run ``work`` on each item on the pool, at most ``IN_FLIGHT`` at once; the
    first error stops the feed and is raised once the running ones have ended."""
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="chunks") as pool:
        running: set[Future[None]] = set()
        done = 0
        try:
            for n, item in items:
                while len(running) >= IN_FLIGHT:
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()
                        done += 1
                    progress(done)
                running.add(pool.submit(work, n, item))
            for f in running:
                f.result()
                done += 1
            progress(done)
        except BaseException:
            for f in running:
                f.cancel()
            raise


@dataclass
class _Storer:
    """Files each chunk read: its id in ``ids``, the chunk in the repository if new."""

    repo: Repository
    ids: list[str | None]
    before: list[str | None]
    bad: set[str]
    stats: StoreStats

    def __call__(self, n: int, data: memoryview) -> None:
        stats = self.stats
        if is_zero(data):
            self.ids[n] = None
            with stats._lock:
                stats.zero_chunks += 1
            return
        cid = self.repo.chunk_id(data)
        if n < len(self.before) and self.before[n] == cid and cid not in self.bad:
            new = False
        else:
            cid, new = self.repo.put_chunk(data, cid, repairs=cid in self.bad)
        self.ids[n] = cid
        with stats._lock:
            if new:
                stats.new_chunks += 1
                stats.new_bytes += len(data)
            else:
                stats.reused_chunks += 1


def store_chunks(
    repo: Repository,
    handle: BlockHandle,
    size: int,
    todo: list[int],
    ids: list[str | None],
    before: list[str | None],
    bad: set[str],
    progress: ProgressFn | None,
) -> StoreStats:
    """Read chunk positions ``todo`` and fill ``ids``: None for zero chunks, else the
    content id, storing chunks the repository lacks. A chunk equal to the parent's
    (``before``) at the same position is known to be stored, unless quarantined.

    A handle that takes reads from several threads is read by the workers, each into
    its own buffer, so a read waiting on the disk holds up one worker, not the feed;
    another is read on this thread, in disk order, feeding the workers."""
    chunk = repo.config.chunk_size
    stats = StoreStats()
    storer = _Storer(repo, ids, before, bad, stats)

    def report(done: int) -> None:
        if progress is not None:
            progress(Progress(done * chunk, len(todo) * chunk))

    def span(n: int) -> tuple[int, int]:
        return n * chunk, min(chunk, size - n * chunk)

    keep_freed_memory()
    buffers = shared_pool(chunk, IN_FLIGHT + 1)
    if handle.parallel_reads:

        def read_and_store(n: int, _: None) -> None:
            offset, length = span(n)
            with buffers.lend() as buf:
                handle.read_into(offset, buf[:length])
                with stats._lock:
                    stats.read_bytes += length
                storer(n, buf[:length])

        _bounded_map(((n, None) for n in todo), read_and_store, report)
    else:
        _fed_map(handle, buffers, todo, span, storer, stats, report)
    return stats


def _fed_map(
    handle: BlockHandle,
    buffers: BufferPool,
    todo: list[int],
    span: Callable[[int], tuple[int, int]],
    storer: _Storer,
    stats: StoreStats,
    report: Callable[[int], None],
) -> None:
    """``store_chunks`` for a handle read on one thread, in disk order."""

    def reads() -> Iterable[tuple[int, memoryview]]:
        for n in todo:
            buf = buffers.take()
            offset, length = span(n)
            handle.read_into(offset, buf[:length])
            stats.read_bytes += length
            yield n, buf

    def store(n: int, buf: memoryview) -> None:
        try:
            storer(n, buf[: span(n)[1]])
        finally:
            buffers.give(buf)

    _bounded_map(reads(), store, report)


def restore_chunks(
    repo: Repository,
    handle: BlockHandle,
    chunk: int,
    wanted: list[tuple[int, str]],
    progress: ProgressFn | None,
) -> None:
    """Fetch, check and write each (position, chunk id); zero runs stay holes.

    Fetching and checking run on the pool, each worker decompressing into its own
    page-aligned buffer; writes too when the handle takes them from several threads
    (qemu-nbd then works on several at once), else through one lock. The fresh
    qcow2 writes straight from the worker's buffer, other handles take a copy."""
    write_lock = threading.Lock() if not handle.parallel_writes else contextlib.nullcontext()
    keep_freed_memory()
    buffers = shared_pool(chunk, IN_FLIGHT + 1)

    def work(n: int, cid: str) -> None:
        with buffers.lend() as buf:
            data = repo.get_chunk_into(cid, buf)
            runs = data_runs(data)
            with write_lock:
                for off, length in runs:
                    handle.write_view(n * chunk + off, data[off : off + length])

    def report(done: int) -> None:
        if progress is not None:
            progress(Progress(done * chunk, len(wanted) * chunk))

    def feed() -> Iterable[tuple[int, str]]:
        """The wanted chunks in order, each announced ``IN_FLIGHT`` places ahead: the
        backend may start reading it (the folder: readahead) while workers decompress."""
        for i, (n, cid) in enumerate(wanted):
            if i == 0:
                for _, ahead in wanted[:IN_FLIGHT]:
                    repo.prefetch_chunk(ahead)
            elif i + IN_FLIGHT < len(wanted):
                repo.prefetch_chunk(wanted[i + IN_FLIGHT][1])
            yield n, cid

    _bounded_map(feed(), work, report)


def store_file(repo: Repository, path: str, label: str) -> tuple[str, int]:
    """A small file (a kernel, a ramdisk) as chunks and an index, as a disk would be;
    (index id, size). What the repository holds already costs a hash."""
    chunk = repo.config.chunk_size
    ids: list[str | None] = []
    storer = _Storer(repo, ids, [], repo.quarantined(), StoreStats())
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(chunk):
            size += len(piece)
            ids.append(None)
            storer(len(ids) - 1, memoryview(piece))
    index = {"disk": label, "size": size, "chunk_size": chunk, "chunks": ids}
    return repo.put_index(index), size


def restore_file(repo: Repository, index_id: str, dest: str, limit: int) -> None:
    """Write the bytes of a file stored by ``store_file`` into the new file ``dest``
    (at most ``limit`` bytes: a record is not trusted with the size)."""
    index = repo.get_index(index_id)
    size, chunk = int(index["size"]), int(index["chunk_size"])
    if size > limit:
        raise InvalidInput(f"{index['disk']} is {size} bytes: over the {limit} allowed")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for n, cid in enumerate(index["chunks"]):
            if cid:
                os.pwrite(fd, repo.get_chunk(cid), n * chunk)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)

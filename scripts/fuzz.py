#!/usr/bin/env python3
"""Fuzzing campaigns for snapback's two hostile-input edges (not a pytest test).

Usage::

    .venv/bin/python scripts/fuzz.py [--target inspector|repository|all]
                                     [--seconds N] [--seed S] [--out DIR] [--max-cases N]

``inspector``
    Seeds are small images made with ``qemu-img``/``qemu-io`` in a temp folder (qcow2 v2
    and v3, with data, converted, compressed, a backing file, extended L2, small clusters,
    an internal snapshot, a bitmap, raw, VMDK, VPC). Each case stacks 1-3 mutations (bit
    flips, random bytes, qcow2 header fields set to boundary values, header extensions,
    L1/L2/refcount entries, L1 aliasing, truncation, appending, header transplant) and
    calls ``inspect()``. Oracle: it returns or raises ``UnsafeImage`` within 5 s; an image
    it accepts is handed to ``qemu-img info``/``qemu-img check`` (under prlimit, 10 s),
    which must not crash or hang, nor see a backing file, data file, encryption or
    another virtual size than the inspector reported.

``repository``
    A plain and an encrypted repository in a temp folder, each with chunks (one of
    4 MiB), an index and a backup record. Each case rewrites one stored object file
    (bit flips, truncation, header kind/flags/length, zstd bombs, multi-frame and
    skippable-frame payloads, swapped objects, re-sealed other plaintext in the plain
    repository) and reads it back with get_chunk/get_chunk_into/get_index/get_record.
    Oracle: the original content comes back or ``RepositoryError`` (``DamagedObject``)
    is raised, within 5 s, with a bounded peak memory.

Findings are deduplicated by signature; the first few inputs of each are written to the
output folder with a one-line description in ``findings.txt``. Exit status 1 when any
finding, else 0. The case sequence is deterministic for a given ``--seed`` (encryption
nonces and keys are not: they come from ``os.urandom`` inside snapback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import zstandard

from snapback.domain.errors import UnsafeImage
from snapback.domain.models import DiskFormat
from snapback.drivers.imagefmt.inspector import InspectedImage, inspect
from snapback.repository.backends.local import LocalBackend
from snapback.repository.repo import CHUNK_SIZE, Repository, chunk_key
from snapback.repository.sealing import (
    CHUNK,
    HEADER,
    INDEX,
    MAX_PLAIN,
    RECORD,
    MasterKeys,
    RepositoryError,
)

MIB = 1 << 20
CALL_TIMEOUT_S = 5.0
QEMU_TIMEOUT_S = 10.0
PRLIMIT = ["prlimit", "--as=2147483648", "--cpu=20", "--"]
KEEP_PER_SIGNATURE = 5
SNAPBACK_SRC = str(Path(__file__).resolve().parent.parent / "src" / "snapback")

# --------------------------------------------------------------------------------------
# Findings


class CallTimeout(BaseException):
    """Raised by SIGALRM inside a fuzzed call that ran past its time limit."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise CallTimeout()


@dataclass
class Recorder:
    out: Path
    counts: Counter[str] = field(default_factory=Counter)
    first_file: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    written: int = 0

    def add(
        self,
        target: str,
        signature: str,
        description: str,
        data: bytes,
        suffix: str = ".bin",
        detail: str = "",
        extra: dict[str, bytes] | None = None,
    ) -> None:
        self.counts[signature] += 1
        if self.counts[signature] > KEEP_PER_SIGNATURE:
            return
        self.written += 1
        name = f"{target}-{self.written:04d}{suffix}"
        (self.out / name).write_bytes(data)
        for ext, blob in (extra or {}).items():
            (self.out / f"{name}{ext}").write_bytes(blob)
        one_line = " ".join(description.split())
        (self.out / f"{name}.txt").write_text(f"{one_line}\nsignature: {signature}\n\n{detail}")
        with open(self.out / "findings.txt", "a") as f:
            f.write(f"{name}\t{one_line}\n")
        self.first_file.setdefault(signature, name)
        self.descriptions.setdefault(signature, one_line)

    def total(self, prefix: str = "") -> int:
        return sum(n for sig, n in self.counts.items() if sig.startswith(prefix))


def _where(exc: BaseException) -> str:
    """The innermost frame of the traceback inside snapback (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(SNAPBACK_SRC)]
    if not frames:
        return "?"
    pick = (ours or frames)[-1]
    return f"{os.path.relpath(pick.filename, SNAPBACK_SRC)}:{pick.lineno}"


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class Limits:
    """Wall-clock limit for one call (SIGALRM) and its peak memory (VmHWM, tracemalloc)."""

    def __init__(self) -> None:
        self.hwm_ok = True
        signal.signal(signal.SIGALRM, _on_alarm)

    def start(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.rss0 = _status_kib("VmRSS")
        if self.hwm_ok:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                self.hwm_ok = False
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()
        self.traced0 = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def stop(self) -> tuple[float, int]:
        """(seconds, peak growth in bytes)."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.monotonic() - self.started
        grown = 0
        if self.hwm_ok:
            grown = (_status_kib("VmHWM") - self.rss0) * 1024
        if tracemalloc.is_tracing():
            grown = max(grown, tracemalloc.get_traced_memory()[1] - self.traced0)
        return elapsed, grown


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------------------
# Inspector: seeds


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes


def _seed_recipes(d: Path, rng: random.Random) -> list[tuple[str, Callable[[Path], None]]]:
    raw_src = d / "src.raw"

    def make_raw_src() -> None:
        body = bytearray(2 * MIB)
        for off in (0, 300_000, MIB, 2 * MIB - 70_000):
            body[off : off + 65536] = rng.randbytes(16384) * 4
        raw_src.write_bytes(bytes(body))

    make_raw_src()

    def create(opts: str, size: str = "16M") -> Callable[[Path], None]:
        return lambda p: _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(p), size)

    def with_data(opts: str, writes: list[str], size: str = "16M") -> Callable[[Path], None]:
        def make(p: Path) -> None:
            create(opts, size)(p)
            cmds: list[str] = []
            for w in writes:
                cmds += ["-c", w]
            _run("qemu-io", "-f", "qcow2", *cmds, str(p))

        return make

    def convert(opts: list[str]) -> Callable[[Path], None]:
        return lambda p: _run(
            "qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(raw_src), str(p)
        )

    def backing(p: Path) -> None:
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw_src), "-F", "raw", str(p))

    def snapshot(p: Path) -> None:
        with_data("compat=1.1", ["write -P 0x11 0 128k"])(p)
        _run("qemu-img", "snapshot", "-c", "snap1", str(p))
        _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 64k 64k", str(p))

    def bitmap(p: Path) -> None:
        with_data("compat=1.1", ["write -P 0x33 0 64k"])(p)
        _run("qemu-img", "bitmap", "--add", str(p), "b0")

    def raw(p: Path) -> None:
        p.write_bytes(raw_src.read_bytes()[: MIB // 2])

    def other(fmt: str) -> Callable[[Path], None]:
        return lambda p: _run("qemu-img", "create", "-q", "-f", fmt, str(p), "4M")

    writes = ["write -P 0x5a 0 192k", "write -P 0xa5 8M 64k", "write -z 12M 64k"]
    return [
        ("v3-empty.qcow2", create("compat=1.1")),
        ("v2-empty.qcow2", create("compat=0.10")),
        ("v3-data.qcow2", with_data("compat=1.1", writes)),
        ("v2-data.qcow2", with_data("compat=0.10", writes)),
        ("converted.qcow2", convert([])),
        ("compressed.qcow2", convert(["-c"])),
        ("backing.qcow2", backing),
        ("extl2.qcow2", with_data("extended_l2=on", ["write -P 0x77 4k 8k", "write 1M 64k"])),
        (
            "c4k.qcow2",
            with_data(
                "cluster_size=4096",
                ["write -P 1 0 8k", "write -P 2 4M 4k", "write -P 3 9M 4k", "write 15M 4k"],
            ),
        ),
        ("c512.qcow2", with_data("cluster_size=512", ["write -P 4 0 4k", "write 3M 1k"], "4M")),
        ("c2m.qcow2", with_data("cluster_size=2M", ["write -P 5 0 4k"], "8M")),
        ("snapshot.qcow2", snapshot),
        ("bitmap.qcow2", bitmap),
        ("disk.raw", raw),
        ("disk.vmdk", other("vmdk")),
        ("disk.vpc", other("vpc")),
    ]


def make_seeds(d: Path, rng: random.Random) -> list[Seed]:
    seeds: list[Seed] = []
    for name, recipe in _seed_recipes(d, rng):
        p = d / name
        try:
            recipe(p)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            print(f"  seed {name} skipped: {exc}", file=sys.stderr)
            continue
        seeds.append(Seed(name, p.read_bytes()))
    return seeds


# --------------------------------------------------------------------------------------
# Inspector: mutations

QCOW2_FIELDS: list[tuple[str, int, str]] = [
    ("magic", 0, ">I"),
    ("version", 4, ">I"),
    ("backing_offset", 8, ">Q"),
    ("backing_len", 16, ">I"),
    ("cluster_bits", 20, ">I"),
    ("size", 24, ">Q"),
    ("crypt", 32, ">I"),
    ("l1_size", 36, ">I"),
    ("l1_offset", 40, ">Q"),
    ("refcount_offset", 48, ">Q"),
    ("refcount_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"),
    ("snapshots_offset", 64, ">Q"),
    ("incompatible", 72, ">Q"),
    ("compatible", 80, ">Q"),
    ("autoclear", 88, ">Q"),
    ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
    ("compression_type", 104, ">B"),
]
FLAG_FIELDS = {"incompatible", "compatible", "autoclear", "crypt"}
EXT_TYPES = [0, 0xE2792ACA, 0x44415441, 0x0537BE77, 0x6803F857, 0x23852875]
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _get(data: bytes | bytearray, off: int, fmt: str) -> int:
    n = struct.calcsize(fmt)
    if off + n > len(data):
        return 0
    value: int = struct.unpack_from(fmt, data, off)[0]
    return value


def _put(data: bytearray, off: int, fmt: str, value: int) -> None:
    n = struct.calcsize(fmt)
    if off + n <= len(data):
        struct.pack_into(fmt, data, off, value & ((1 << (8 * n)) - 1))


def _cluster(data: bytes | bytearray) -> int:
    bits = _get(data, 20, ">I")
    return 1 << bits if 9 <= bits <= 21 else 65536


def _boundary(rng: random.Random, data: bytearray, bits: int, current: int) -> int:
    size, cluster = len(data), _cluster(data)
    cands = [
        0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 31, 32, 63, 64, 255, 511, 512, 4095, 4096,
        65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63,
        2**64 - 1, size, size - 1, size + 1, size - 8, size + 8, size - 512, size + 512,
        size - cluster, size + cluster, size // cluster * cluster, current + 1, current - 1,
        current * 2, current // 2, current ^ (1 << rng.randrange(bits)),
        rng.randrange(size // cluster + 2) * cluster, rng.getrandbits(bits),
    ]  # fmt: skip
    return rng.choice(cands) & ((1 << bits) - 1)


def m_bitflip(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    if not data:
        return "bitflip(empty)"
    n = rng.choice([1, 1, 1, 2, 4, 8])
    span = min(len(data), 512) if rng.random() < 0.5 else len(data)
    where = []
    for _ in range(n):
        pos = rng.randrange(span)
        data[pos] ^= 1 << rng.randrange(8)
        where.append(pos)
    return f"bitflip@{where}"


def m_randbytes(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    if not data:
        return "randbytes(empty)"
    n = rng.randint(1, 16)
    span = min(len(data), 4096) if rng.random() < 0.6 else len(data)
    pos = rng.randrange(span)
    data[pos : pos + n] = rng.randbytes(len(data[pos : pos + n]))
    return f"randbytes@{pos}+{n}"


def m_header_field(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    name, off, fmt = rng.choice(QCOW2_FIELDS)
    bits = 8 * struct.calcsize(fmt)
    current = _get(data, off, fmt)
    if name == "cluster_bits" and rng.random() < 0.5:
        value = rng.randrange(0, 70)
    elif name == "version" and rng.random() < 0.5:
        value = rng.choice([0, 1, 2, 3, 4])
    elif name in FLAG_FIELDS and rng.random() < 0.6:
        value = current ^ (1 << rng.randrange(min(bits, 64)))
    else:
        value = _boundary(rng, data, bits, current)
    _put(data, off, fmt, value)
    return f"{name}={value:#x}"


def _extensions(data: bytes | bytearray) -> list[tuple[int, int, int]]:
    version = _get(data, 4, ">I")
    start = _get(data, 100, ">I") if version == 3 else 72
    limit = min(len(data), _cluster(data), 65536)
    found: list[tuple[int, int, int]] = []
    pos = start
    while pos + 8 <= limit and len(found) < 64:
        ext_type, ext_len = struct.unpack_from(">II", data, pos)
        found.append((pos, ext_type, ext_len))
        if ext_type == 0:
            break
        pos += 8 + (ext_len + 7) // 8 * 8
    return found


def m_extension(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    exts = _extensions(data)
    if not exts:
        return m_header_field(rng, data, seeds)
    pos, _ext_type, ext_len = rng.choice(exts)
    what = rng.random()
    if what < 0.3:
        new_type = rng.choice([*EXT_TYPES, rng.getrandbits(32)])
        _put(data, pos, ">I", new_type)
        return f"ext@{pos}.type={new_type:#x}"
    if what < 0.6:
        new_len = _boundary(rng, data, 32, ext_len)
        _put(data, pos + 4, ">I", new_len)
        return f"ext@{pos}.len={new_len:#x}"
    end = exts[-1][0]  # insert one before the end marker (or the last walked one)
    kind, body = rng.choice(
        [
            (0xE2792ACA, b"raw"),
            (0x44415441, b"/etc/passwd"),
            (0x0537BE77, rng.randbytes(16)),
            (0x6803F857, rng.randbytes(48)),
            (0x23852875, rng.randbytes(24)),
            (rng.getrandbits(32), rng.randbytes(rng.randrange(40))),
        ]
    )
    blob = struct.pack(">II", kind, len(body)) + body + bytes(-len(body) % 8) + bytes(8)
    data[end : end + len(blob)] = blob[: max(0, len(data) - end)]
    return f"ext-insert@{end}:{kind:#x}"


def _tables(data: bytes | bytearray) -> tuple[int, int, int, int, list[int]]:
    """(cluster, l1 offset, l1 entries in the file, refcount table offset, L2 offsets)."""
    cluster = _cluster(data)
    l1_off, l1_size = _get(data, 40, ">Q"), _get(data, 36, ">I")
    rt_off = _get(data, 48, ">Q")
    l1_avail = max(0, min(l1_size, (len(data) - l1_off) // 8)) if l1_off < len(data) else 0
    l2s = []
    for i in range(min(l1_avail, 4096)):
        entry = _get(data, l1_off + 8 * i, ">Q") & OFFSET_MASK
        if entry and entry + 8 <= len(data):
            l2s.append(entry)
    return cluster, l1_off, l1_avail, rt_off, l2s


def _table_value(rng: random.Random, data: bytearray, current: int, l2s: list[int]) -> int:
    size, cluster = len(data), _cluster(data)
    csize_shift = 62 - (cluster.bit_length() - 1 - 8)
    cands = [
        0,
        1,
        current | 1 << 63,
        current & ~(1 << 63),
        current ^ (1 << 62),
        current + 512,
        current + cluster,
        size // cluster * cluster,
        size // cluster * cluster + cluster,
        (size + cluster) | 1 << 63,
        rng.choice(l2s) | 1 << 63 if l2s else 0,
        _get(data, 40, ">Q") | 1 << 63,
        _get(data, 48, ">Q") | 1 << 63,
        1 << 63,
        1 << 55,
        (1 << 56) - cluster,
        1 << 62 | rng.randrange(size + 1) | rng.getrandbits(8) << csize_shift,
        1 << 62 | (size + rng.randrange(1, 1 << 20)),
        rng.getrandbits(64),
    ]
    return rng.choice(cands) & ((1 << 64) - 1)


def m_tables(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    cluster, l1_off, l1_avail, rt_off, l2s = _tables(data)
    what = rng.random()
    if what < 0.35 and l1_avail:
        pos = l1_off + 8 * rng.randrange(l1_avail)
        value = _table_value(rng, data, _get(data, pos, ">Q"), l2s)
        _put(data, pos, ">Q", value)
        return f"l1[{(pos - l1_off) // 8}]={value:#x}"
    if what < 0.8 and l2s:
        l2 = rng.choice(l2s)
        n = max(1, min(cluster, len(data) - l2) // 8)
        pos = l2 + 8 * rng.randrange(n)
        value = _table_value(rng, data, _get(data, pos, ">Q"), l2s)
        _put(data, pos, ">Q", value)
        return f"l2@{l2}[{(pos - l2) // 8}]={value:#x}"
    if 0 < rt_off < len(data):
        n = max(1, min(cluster, len(data) - rt_off) // 8)
        pos = rt_off + 8 * rng.randrange(n)
        value = _table_value(rng, data, _get(data, pos, ">Q"), l2s)
        _put(data, pos, ">Q", value)
        return f"reftable[{(pos - rt_off) // 8}]={value:#x}"
    return m_bitflip(rng, data, seeds)


def m_l1_alias(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    """A new L1 table at the end of the file whose entries all name one L2 table:
    a small file that makes the inspector read the same cluster over and over."""
    cluster, _l1_off, _l1_avail, _rt, l2s = _tables(data)
    if not l2s or _get(data, 0, ">I") != 0x514649FB:
        return m_tables(rng, data, seeds)
    n = rng.choice([256, 1024, 4096, 20000, 65536])
    l2 = rng.choice(l2s)
    data.extend(bytes(-len(data) % cluster))
    new_off = len(data)
    data.extend(struct.pack(">Q", l2 | 1 << 63) * n)
    data.extend(bytes(-len(data) % cluster))
    _put(data, 40, ">Q", new_off)
    _put(data, 36, ">I", n)
    return f"l1-alias(n={n}, l2={l2:#x}, cluster={cluster})"


def m_snapshot_table(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    nb, off = _get(data, 60, ">I"), _get(data, 64, ">Q")
    if not nb or off >= len(data):
        return m_header_field(rng, data, seeds)
    pos = off + rng.randrange(min(256, len(data) - off))
    data[pos] = rng.choice([0, 0xFF, rng.getrandbits(8), data[pos] ^ 0x80])
    return f"snapshot-table@{pos}"


def m_truncate(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    cluster = _cluster(data)
    cands = [
        rng.randrange(len(data) + 1),
        len(data) - rng.randint(1, 16),
        len(data) // cluster * cluster - cluster,
        rng.randrange(len(data) // cluster + 1) * cluster,
        rng.choice([0, 1, 4, 8, 71, 72, 103, 104, 511, 512]),
    ]
    n = max(0, min(len(data), rng.choice(cands)))
    del data[n:]
    return f"truncate({n})"


def m_append(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    what = rng.random()
    if what < 0.4:
        extra = rng.randbytes(rng.randint(1, 4096))
    elif what < 0.7:
        extra = bytes(-len(data) % 512 or 512)
    else:
        extra = rng.choice([b"conectix" + bytes(504), b"koly" + bytes(508), bytes(65536)])
    data.extend(extra)
    return f"append({len(extra)})"


def m_transplant(rng: random.Random, data: bytearray, seeds: list[Seed]) -> str:
    other = rng.choice(seeds)
    n = rng.choice([72, 104, 512, 4096])
    data[:n] = other.data[:n]
    return f"transplant({other.name}[:{n}])"


INSPECTOR_MUTATORS: list[tuple[Callable[[random.Random, bytearray, list[Seed]], str], int]] = [
    (m_bitflip, 20),
    (m_randbytes, 10),
    (m_header_field, 25),
    (m_extension, 8),
    (m_tables, 15),
    (m_l1_alias, 2),
    (m_snapshot_table, 3),
    (m_truncate, 8),
    (m_append, 5),
    (m_transplant, 4),
]


# --------------------------------------------------------------------------------------
# Inspector: campaign


@dataclass
class Stats:
    cases: int = 0
    accepted: int = 0
    refused: int = 0
    qemu_runs: int = 0
    qemu_refused: int = 0
    check_flagged: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    extra: Counter[str] = field(default_factory=Counter)


def _qemu(args: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [*PRLIMIT, *args], capture_output=True, text=True, timeout=QEMU_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return None


def _qemu_findings(path: Path, found: InspectedImage, stats: Stats) -> list[tuple[str, str]]:
    """(signature, description) of what qemu-img says against the inspector's verdict."""
    out: list[tuple[str, str]] = []
    fmt = found.format.value
    stats.qemu_runs += 1
    info = _qemu(["qemu-img", "info", "--output=json", "-f", fmt, str(path)])
    failed = _died("info", f"qemu-img info -f {fmt}", info)
    if failed is not None:
        out.append(failed)
    elif info is None or info.returncode != 0:
        stats.qemu_refused += 1
    else:
        doc = json.loads(info.stdout)
        specific = (doc.get("format-specific") or {}).get("data") or {}
        for key in ("backing-filename", "full-backing-filename"):
            if key in doc:
                out.append(
                    (f"qemu-info:{key}", f"inspector accepted, qemu-img sees {key}={doc[key]!r}")
                )
        if "data-file" in specific:
            out.append(
                ("qemu-info:data-file", f"qemu-img sees data-file={specific['data-file']!r}")
            )
        if doc.get("encrypted"):
            out.append(("qemu-info:encrypted", "inspector accepted, qemu-img says encrypted"))
        if doc.get("virtual-size") != found.virtual_size:
            out.append(
                (
                    f"qemu-info:virtual-size:{fmt}",
                    f"inspector says virtual size {found.virtual_size}, qemu-img info says "
                    f"{doc.get('virtual-size')}",
                )
            )
    if fmt == "qcow2":
        stats.qemu_runs += 1
        check = _qemu(["qemu-img", "check", "-f", "qcow2", str(path)])
        failed = _died("check", "qemu-img check", check)
        if failed is not None:
            out.append(failed)
        elif check is not None and check.returncode != 0:
            stats.check_flagged += 1
            stats.extra[f"qemu-img check exit {check.returncode}"] += 1
    return out


def _died(
    op: str, what: str, result: subprocess.CompletedProcess[str] | None
) -> tuple[str, str] | None:
    """A finding when qemu-img hung (``result`` None) or died of a signal."""
    if result is None:
        return f"qemu-{op}:hang", f"{what} hung past {QEMU_TIMEOUT_S} s"
    if result.returncode < 0:
        sig = -result.returncode
        return (
            f"qemu-{op}:signal{sig}",
            f"{what} died of signal {sig}: {result.stderr.strip()[:200]}",
        )
    return None


def run_inspector(args: argparse.Namespace, rec: Recorder, work: Path, limits: Limits) -> Stats:
    stats = Stats()
    rng = random.Random(f"{args.seed}-inspector")
    t0 = time.monotonic()
    seeds = make_seeds(work, rng)
    stats.setup_seconds = time.monotonic() - t0
    print(f"inspector: {len(seeds)} seeds ({', '.join(s.name for s in seeds)})")
    for s in seeds:  # the seeds themselves, sanity only (not counted as findings)
        try:
            got = inspect(str(work / s.name))
            stats.extra[f"seed {s.name}: accepted {got.format.value}"] += 1
        except UnsafeImage:
            stats.extra[f"seed {s.name}: refused"] += 1
    path = work / "case.img"
    names = [m for m, _ in INSPECTOR_MUTATORS]
    weights = [w for _, w in INSPECTOR_MUTATORS]
    deadline = time.monotonic() + args.seconds
    start = time.monotonic()
    while time.monotonic() < deadline and stats.cases < args.max_cases:
        seed = rng.choice(seeds)
        data = bytearray(seed.data)
        steps = [m(rng, data, seeds) for m in rng.choices(names, weights, k=rng.randint(1, 3))]
        declared = rng.choice([None, None, DiskFormat.RAW, DiskFormat.QCOW2])
        path.write_bytes(data)
        stats.cases += 1
        how = f"seed={seed.name} declared={declared and declared.value} mutations={steps}"
        found: InspectedImage | None = None
        limits.start(CALL_TIMEOUT_S)
        try:
            found = inspect(str(path), declared)
        except UnsafeImage:
            stats.refused += 1
        except CallTimeout as exc:
            limits.stop()
            rec.add(
                "inspector",
                f"inspector:timeout:{_where(exc)}",
                f"inspect() still running after {CALL_TIMEOUT_S} s (at {_where(exc)}); {how}",
                bytes(data),
                detail=_format_exc(exc),
            )
            continue
        except Exception as exc:  # the oracle: any other error is the finding, kept whole
            limits.stop()
            rec.add(
                "inspector",
                f"inspector:{type(exc).__name__}:{_where(exc)}",
                f"inspect() raised {type(exc).__name__}: {exc} (at {_where(exc)}); {how}",
                bytes(data),
                detail=_format_exc(exc),
            )
            continue
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed, _grown = limits.stop()
        stats.extra["inspect() calls over 1 s"] += elapsed > 1.0
        if found is None:
            continue
        stats.accepted += 1
        for sig, desc in _qemu_findings(path, found, stats):
            rec.add(
                "inspector",
                f"inspector:{sig}",
                f"{desc}; inspector said {found.format.value} size {found.virtual_size}; {how}",
                bytes(data),
            )
    stats.seconds = time.monotonic() - start
    return stats


# --------------------------------------------------------------------------------------
# Repository


@dataclass
class RepoObject:
    repo: Repository
    repo_kind: str
    kind: str  # chunk, index, record
    name: str
    key: str
    path: Path
    blob: bytes
    plain: bytes
    value: Any

    @property
    def code(self) -> int:
        return {"chunk": CHUNK, "index": INDEX, "record": RECORD}[self.kind]

    @property
    def cap(self) -> int:
        return CHUNK_SIZE if self.kind == "chunk" else MAX_PLAIN

    @property
    def ops(self) -> list[str]:
        if self.kind == "chunk":
            return ["get_chunk", "get_chunk_into"]
        return [f"get_{self.kind}"]


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def make_repositories(work: Path, rng: random.Random) -> list[RepoObject]:
    objects: list[RepoObject] = []
    big = bytearray(rng.randbytes(MIB))
    big += b"".join(f"line {i} of a fairly compressible text\n".encode() for i in range(80000))
    big_chunk = bytes(big[:CHUNK_SIZE]).ljust(CHUNK_SIZE, b"\0")
    chunks = [big_chunk, b"tiny chunk " * 9, rng.randbytes(65536)]
    for kind_name, passphrase in (("plain", None), ("encrypted", "fuzz-passphrase-123")):
        backend = LocalBackend(work / kind_name)
        repo = Repository.init(backend, passphrase)
        ids = []
        for data in chunks:
            cid, _new = repo.put_chunk(data)
            ids.append(cid)
            key = chunk_key(cid)
            p = backend._path(key)
            objects.append(
                RepoObject(repo, kind_name, "chunk", cid, key, p, p.read_bytes(), data, data)
            )
        index: dict[str, Any] = {
            "disk": "vda",
            "size": 3 * CHUNK_SIZE,
            "chunk_size": CHUNK_SIZE,
            "chunks": [ids[0], None, ids[1]],
        }
        iid = repo.put_index(index)
        key = f"indexes/{iid}"
        p = backend._path(key)
        objects.append(
            RepoObject(repo, kind_name, "index", iid, key, p, p.read_bytes(), _dumps(index), index)
        )
        bid = f"20260101T000000.{rng.randrange(10**6):06d}Z-{rng.getrandbits(32):08x}"
        record: dict[str, Any] = {
            "id": bid,
            "created_at": 1767225600.5,
            "kind": "volume",
            "source": {"name": "vol1", "pool": "default", "driver": "dir", "volume_id": "v-1"},
            "parent": None,
            "mode": "full",
            "change_tracking": "none",
            "note": None,
            "source_snapshot": None,
            "disks": [{"target": "vda", "volume": "vol1", "size": 3 * CHUNK_SIZE, "index": iid}],
            "instance": None,
            "boot_files": [],
            "stats": {"read_bytes": 1, "new_chunks": 2, "new_bytes": 3, "seconds": 0.5},
        }
        repo.put_record(record)
        key = f"backups/{bid}"
        p = backend._path(key)
        objects.append(
            RepoObject(
                repo, kind_name, "record", bid, key, p, p.read_bytes(), _dumps(record), record
            )
        )
    return objects


@dataclass
class Bombs:
    unknown_256m: bytes  # a frame without content size: 256 MiB of zeroes
    stated_256m: bytes  # a frame stating 256 MiB of zeroes
    stated_cap: dict[int, bytes]  # a frame stating exactly `cap` bytes of zeroes


def _zero_frame(size: int, stated: bool) -> bytes:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=stated)
    cobj = cctx.compressobj(size=size if stated else -1)
    zeros = bytes(MIB)
    parts = []
    left = size
    while left:
        n = min(left, MIB)
        parts.append(cobj.compress(zeros[:n]))
        left -= n
    parts.append(cobj.flush())
    return b"".join(parts)


def make_bombs() -> Bombs:
    return Bombs(
        _zero_frame(256 * MIB, False),
        _zero_frame(256 * MIB, True),
        {CHUNK_SIZE: _zero_frame(CHUNK_SIZE, True), MAX_PLAIN: _zero_frame(MAX_PLAIN, True)},
    )


def _skippable(body: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(body)) + body


def _frame(plain: bytes, stated: bool = True, checksum: bool = False) -> bytes:
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=stated, write_checksum=checksum)
    return bytes(cctx.compress(plain))


def _header(obj: RepoObject, blob: bytes) -> tuple[int, int, int]:
    if len(blob) >= HEADER.size:
        kind, flags, length = HEADER.unpack(blob[: HEADER.size])
        return kind, flags, length
    return obj.code, 1, len(obj.plain)


def _record_variants(obj: RepoObject, rng: random.Random) -> list[tuple[str, bytes]]:
    changed = dict(obj.value)
    changed["kind"] = "instance"
    flipped = bytearray(obj.plain)
    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return [
        ("json-list", b"[]"),
        ("json-null", b"null"),
        ("json-number", b"1"),
        ("json-string", b'"x"'),
        ("json-empty-object", b"{}"),
        ("json-only-id", _dumps({"id": obj.name})),
        ("json-id-int", _dumps({"id": 5})),
        ("json-other-field", _dumps(changed)),
        ("json-deep-nesting", b"[" * 200000 + b"]" * 200000),
        ("json-deep-object", b'{"a":' * 100000 + b"1" + b"}" * 100000),
        ("json-huge-number", b'{"id":' + b"9" * 100000 + b"}"),
        ("invalid-utf8", b"\xff\xfe\xfd"),
        ("utf16-json", json.dumps(obj.value).encode("utf-16")),
        ("truncated-json", obj.plain[: len(obj.plain) // 2]),
        ("flipped-byte", bytes(flipped)),
        ("empty", b""),
        ("random", rng.randbytes(rng.randrange(1, 512))),
    ]


def repo_mutate(
    rng: random.Random, obj: RepoObject, objects: list[RepoObject], bombs: Bombs
) -> tuple[str, bytes]:
    blob = bytearray(obj.blob)
    kind, flags, length = _header(obj, obj.blob)
    hs = HEADER.size
    what = rng.randrange(14)
    if what == 0:
        n = rng.choice([1, 1, 2, 3, 8])
        span = hs if rng.random() < 0.3 else len(blob)
        where = [rng.randrange(span) for _ in range(n)]
        for pos in where:
            blob[pos] ^= 1 << rng.randrange(8)
        return f"bitflip@{where}", bytes(blob)
    if what == 1:
        pos, n = rng.randrange(len(blob)), rng.randint(1, 32)
        blob[pos : pos + n] = rng.randbytes(len(blob[pos : pos + n]))
        return f"randbytes@{pos}+{n}", bytes(blob)
    if what == 2:
        n = rng.choice(
            [0, 1, hs - 1, hs, hs + 1, hs + 12, len(blob) - 1, len(blob) - 16,
             rng.randrange(len(blob))]
        )  # fmt: skip
        n = max(0, min(n, len(blob)))
        return f"truncate({n})", bytes(blob[:n])
    if what == 3:
        value = rng.choice([0, 1, 2, 3, 4, 255, rng.getrandbits(8)])
        blob[0] = value
        return f"kind={value}", bytes(blob)
    if what == 4:
        value = rng.choice([0, 1, 2, 3, 4, 5, 0x80, 0xFF, rng.getrandbits(8)])
        blob[1] = value
        return f"flags={value:#x}", bytes(blob)
    if what == 5:
        value = rng.choice(
            [0, 1, length - 1, length + 1, length * 2, length // 2, CHUNK_SIZE, CHUNK_SIZE + 1,
             MAX_PLAIN, MAX_PLAIN + 1, 2**31, 2**32 - 1, rng.getrandbits(32)]
        ) & 0xFFFFFFFF  # fmt: skip
        struct.pack_into(">I", blob, 2, value)
        return f"declared-length={value}", bytes(blob)
    if what == 6:
        return "empty-file", b""
    if what == 7:
        appends: list[Callable[[], bytes]] = [
            lambda: rng.randbytes(rng.randint(1, 64)),
            lambda: _frame(b"x"),
            lambda: _skippable(b"junk"),
            lambda: bombs.unknown_256m,
            lambda: _frame(obj.plain),
        ]
        extra = rng.choice(appends)()
        return f"append({len(extra)})", bytes(blob) + extra
    # payload replacements, with a header that fits them
    plain, half = obj.plain, len(obj.plain) // 2
    payloads: list[tuple[str, Callable[[], bytes], int]] = [
        ("bomb-unknown-size", lambda: bombs.unknown_256m, length),
        ("bomb-unknown-size-at-cap", lambda: bombs.unknown_256m, obj.cap),
        ("bomb-stated-256m", lambda: bombs.stated_256m, length),
        ("bomb-stated-256m-declared", lambda: bombs.stated_256m, 256 * MIB),
        ("zeros-stated-at-cap", lambda: bombs.stated_cap[obj.cap], obj.cap),
        ("frame+bomb", lambda: _frame(plain) + bombs.unknown_256m, length),
        ("frame+frame", lambda: _frame(plain) * 2, length),
        ("frame+extra-frame", lambda: _frame(plain) + _frame(b"!"), length),
        ("frame+skippable", lambda: _frame(plain) + _skippable(rng.randbytes(16)), length),
        ("skippable+frame", lambda: _skippable(bytes(8)) + _frame(plain), length),
        ("two-frames", lambda: _frame(plain[:half]) + _frame(plain[half:]), length),
        ("no-content-size", lambda: _frame(plain, stated=False), length),
        ("with-checksum", lambda: _frame(plain, checksum=True), length),
        ("short-frame", lambda: _frame(plain[:-1]), length),
        ("empty-frame", lambda: _frame(b""), length),
        ("zstd-magic-only", lambda: b"\x28\xb5\x2f\xfd", length),
        ("random-payload", lambda: rng.randbytes(rng.randrange(1, 256)), length),
    ]
    if what in (8, 9, 10):
        label, make_payload, declared = rng.choice(payloads)
        payload = make_payload()
        new_flags = flags if rng.random() < 0.8 else flags & ~2
        head = HEADER.pack(kind & 0xFF, new_flags & 0xFF, declared & 0xFFFFFFFF)
        if obj.repo_kind == "encrypted" and new_flags & 2:
            payload = bytes(blob[hs : hs + 12]) + payload  # a nonce; the tag cannot match
        return f"payload:{label}", head + payload
    if what == 11:
        head = HEADER.pack(kind & 0xFF, flags & ~1 & 0xFF, len(obj.plain))
        return "uncompressed-original", head + obj.plain
    if what == 12:
        other = rng.choice([o for o in objects if o is not obj])
        return f"swap({other.repo_kind}/{other.key})", other.blob
    # re-seal other plaintext: what a writer of an unencrypted repository can do
    if obj.repo_kind != "plain":
        return "bitflip-tag", bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
    if obj.kind == "record":
        label, plain = rng.choice(_record_variants(obj, rng))
    else:
        flipped = bytearray(obj.plain)
        flipped[rng.randrange(len(flipped))] ^= 1
        label, plain = rng.choice(
            [("flipped-byte", bytes(flipped)), ("empty", b""), ("random", rng.randbytes(100))]
        )
    return f"reseal:{label}", obj.repo.sealer.seal(obj.code, obj.key, plain)


def _call(obj: RepoObject, op: str, buf: bytearray) -> Any:
    if op == "get_chunk":
        return bytes(obj.repo.get_chunk(obj.name))
    if op == "get_chunk_into":
        return bytes(obj.repo.get_chunk_into(obj.name, memoryview(buf)))
    if op == "get_index":
        return obj.repo.get_index(obj.name)
    return obj.repo.get_record(obj.name)


def _mem_cap(obj: RepoObject) -> int:
    # 200 MiB for a 4 MiB chunk (brief); for 64 MiB-capped objects the design itself
    # allows the plaintext, a copy and its decoded text: about 3 x 64 MiB.
    return 200 * MIB if obj.kind == "chunk" else 3 * MAX_PLAIN + 64 * MIB


def _repo_extra(obj: RepoObject, original: bytes) -> dict[str, bytes]:
    keys: MasterKeys | None = obj.repo.sealer.keys
    meta = {
        "repo": obj.repo_kind,
        "key": obj.key,
        "kind": obj.kind,
        "hash": obj.repo.config.hash,
        "data_key": keys.data_key.hex() if keys else None,
        "id_key": keys.id_key.hex() if keys else None,
    }
    return {".orig-plain": original, ".meta.json": json.dumps(meta, indent=1).encode()}


def run_repository(args: argparse.Namespace, rec: Recorder, work: Path, limits: Limits) -> Stats:
    stats = Stats()
    rng = random.Random(f"{args.seed}-repository")
    t0 = time.monotonic()
    objects = make_repositories(work, rng)
    bombs = make_bombs()
    buf = bytearray(CHUNK_SIZE)
    for obj in objects:  # sanity: every stored object reads back
        if _call(obj, obj.ops[0], buf) != obj.value:
            raise SystemExit(f"setup: {obj.key} does not read back")
    stats.setup_seconds = time.monotonic() - t0
    print(
        f"repository: {len(objects)} objects in 2 repositories; bombs "
        f"{len(bombs.unknown_256m)}/{len(bombs.stated_256m)} bytes"
    )
    tracemalloc.start(1)
    deadline = time.monotonic() + args.seconds
    start = time.monotonic()
    try:
        while time.monotonic() < deadline and stats.cases < args.max_cases:
            obj = rng.choice(objects)
            op = rng.choice(obj.ops)
            label, blob = repo_mutate(rng, obj, objects, bombs)
            obj.path.write_bytes(blob)
            stats.cases += 1
            how = f"{obj.repo_kind} repository, {obj.kind} {obj.key}, {op}, mutation {label}"
            sig_base = f"repository:{op}"
            limits.start(CALL_TIMEOUT_S)
            try:
                result = _call(obj, op, buf)
            except RepositoryError as exc:
                stats.refused += 1
                stats.extra[f"refused {type(exc).__name__}"] += 1
                result = None
            except CallTimeout as exc:
                limits.stop()
                rec.add(
                    "repository",
                    f"{sig_base}:timeout:{_where(exc)}",
                    f"{op} still running after {CALL_TIMEOUT_S} s; {how}",
                    blob,
                    detail=_format_exc(exc),
                    extra=_repo_extra(obj, obj.plain),
                )
                continue
            except Exception as exc:  # the oracle: any other error is the finding, kept whole
                limits.stop()
                rec.add(
                    "repository",
                    f"{sig_base}:{type(exc).__name__}:{_where(exc)}",
                    f"{op} raised {type(exc).__name__}: {str(exc)[:160]} (at {_where(exc)}); {how}",
                    blob,
                    detail=_format_exc(exc),
                    extra=_repo_extra(obj, obj.plain),
                )
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                obj.path.write_bytes(obj.blob)
            _elapsed, grown = limits.stop()
            if grown > _mem_cap(obj):
                rec.add(
                    "repository",
                    f"{sig_base}:memory:{obj.kind}",
                    f"{op} grew peak memory by {grown // MIB} MiB; {how}",
                    blob,
                    extra=_repo_extra(obj, obj.plain),
                )
            if result is None:
                continue
            stats.accepted += 1
            how_made = "reseal" if label.startswith("reseal") else "corruption"
            if result != obj.value and how_made == "reseal" and obj.kind == "record":
                # an unencrypted repository's writer can put any record under a backup
                # id: that is what encryption is for, not something a reader can tell
                stats.extra["expected: record re-sealed in a plain repository"] += 1
            elif result != obj.value:
                rec.add(
                    "repository",
                    f"{sig_base}:differs:{obj.repo_kind}:{how_made}",
                    f"{op} returned content that differs from what was stored; {how}",
                    blob,
                    extra={
                        **_repo_extra(obj, obj.plain),
                        ".returned": result if isinstance(result, bytes) else _dumps(result),
                    },
                )
            else:
                stats.extra[f"harmless: {label.split('@')[0].split('(')[0].split('=')[0]}"] += 1
    finally:
        tracemalloc.stop()
    stats.seconds = time.monotonic() - start
    return stats


# --------------------------------------------------------------------------------------
# Main


def _report(target: str, stats: Stats, rec: Recorder) -> None:
    rate = stats.cases / stats.seconds if stats.seconds else 0.0
    print(
        f"\n== {target}: {stats.cases} cases in {stats.seconds:.1f} s ({rate:.1f}/s), "
        f"setup {stats.setup_seconds:.1f} s"
    )
    print(f"   accepted {stats.accepted}, refused {stats.refused}", end="")
    if target == "inspector":
        print(
            f", qemu-img runs {stats.qemu_runs} (info refused {stats.qemu_refused}, "
            f"check flagged {stats.check_flagged})",
            end="",
        )
    print()
    for key, n in sorted(stats.extra.items()):
        print(f"   {key}: {n}")
    sigs = [s for s in rec.counts if s.startswith(target + ":")]
    print(f"   findings: {rec.total(target + ':')} in {len(sigs)} signatures")
    for sig in sorted(sigs):
        print(f"   - [{rec.counts[sig]}x] {sig}")
        print(f"       e.g. {rec.first_file[sig]}: {rec.descriptions[sig][:300]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--target", choices=["inspector", "repository", "all"], default="all")
    ap.add_argument("--seconds", type=float, default=60.0, help="per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="where findings go (default: a new temp dir)")
    ap.add_argument("--max-cases", type=int, default=1 << 62, help="per target")
    args = ap.parse_args(argv)
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="snapback-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out)
    limits = Limits()
    targets = ["inspector", "repository"] if args.target == "all" else [args.target]
    runners = {"inspector": run_inspector, "repository": run_repository}
    results: dict[str, Stats] = {}
    for target in targets:
        work = Path(tempfile.mkdtemp(prefix=f"snapback-fuzz-{target}-"))
        try:
            results[target] = runners[target](args, rec, work, limits)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for target, stats in results.items():
        _report(target, stats, rec)
    total = rec.total()
    digest = hashlib.sha256(repr(sorted(rec.counts.items())).encode()).hexdigest()[:12]
    print(f"\nfindings: {total} ({len(rec.counts)} signatures, digest {digest}); inputs in {out}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())

"""Host-side reader for the test guest built by scripts/build-guest.sh.

The guest writes 4096-byte records to each virtio disk; record N lives at byte offset
(N % K) * 4096 (K slots, default 256). A record is a 4032-byte body — the ASCII line
``SNAPREC1 disk=<name> seq=<N> slot=<S> slots=<K> boot=<8 hex>\\n`` padded with NUL
bytes — followed by the sha256 of the body as 64 lowercase hex characters.

The guest's serial console prints ``SNAPBACK-GUEST-READY`` once booted, ``REC <disk> <N>``
after record N is fsynced and ``HB <n> <uptime>`` heartbeats; ``parse_console`` reads those.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RECORD_SIZE = 4096
BODY_SIZE = 4032
MAGIC = b"SNAPREC1 "
READY_LINE = "SNAPBACK-GUEST-READY"

_HEADER = re.compile(
    rb"SNAPREC1 disk=(?P<disk>[A-Za-z0-9]+) seq=(?P<seq>\d+) slot=(?P<slot>\d+)"
    rb" slots=(?P<slots>\d+) boot=(?P<boot>[0-9a-f]*)\n"
)
_REC = re.compile(r"^REC (\S+) (\d+)\s*$")
_HB = re.compile(r"^HB (\d+) (\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Record:
    """One slot whose header could be parsed."""

    slot: int
    disk: str
    seq: int
    boot: str
    intact: bool


@dataclass
class Scan:
    """What a disk image holds: every parsable record, by seq.

    Scan only the first K slots (``read_image(path, K * RECORD_SIZE)``): a disk that was
    written with a larger ``snapback.records`` earlier keeps those records beyond slot K.
    """

    records: dict[int, Record] = field(default_factory=dict)

    @property
    def valid(self) -> dict[int, bool]:
        """seq -> intact (checksum matches and the record sits in its own slot)."""
        return {seq: rec.intact for seq, rec in sorted(self.records.items())}

    @property
    def max_valid_seq(self) -> int | None:
        seqs = [seq for seq, rec in self.records.items() if rec.intact]
        return max(seqs) if seqs else None


def parse_record(chunk: bytes, slot: int) -> Record | None:
    """Parse one 4096-byte slot; None when it holds no record header at all."""
    if len(chunk) != RECORD_SIZE or not chunk.startswith(MAGIC):
        return None
    m = _HEADER.match(chunk)
    if m is None:
        return None
    body, digest = chunk[:BODY_SIZE], chunk[BODY_SIZE:]
    seq, slots = int(m["seq"]), int(m["slots"])
    intact = (
        hashlib.sha256(body).hexdigest().encode() == digest
        and slots > 0
        and int(m["slot"]) == slot
        and seq % slots == slot
    )
    return Record(slot, m["disk"].decode(), seq, m["boot"].decode(), intact)


def scan(data: bytes, disk: str | None = None) -> Scan:
    """Scan raw disk bytes (from offset 0) for records, optionally of one disk name only.

    When two slots claim the same seq (cannot happen with one writer), an intact one wins.
    """
    result = Scan()
    for slot in range(len(data) // RECORD_SIZE):
        rec = parse_record(data[slot * RECORD_SIZE : (slot + 1) * RECORD_SIZE], slot)
        if rec is None or (disk is not None and rec.disk != disk):
            continue
        old = result.records.get(rec.seq)
        if old is None or (rec.intact and not old.intact):
            result.records[rec.seq] = rec
    return result


def read_records(data: bytes, disk: str | None = None) -> dict[int, bool]:
    """seq -> intact for every record header found in the raw disk bytes."""
    return scan(data, disk).valid


def max_valid_seq(data: bytes, disk: str | None = None) -> int | None:
    """The highest seq whose record is intact, or None."""
    return scan(data, disk).max_valid_seq


def read_image(path: str | Path, length: int = 256 * RECORD_SIZE) -> bytes:
    """The first ``length`` bytes of a disk image as the guest sees them (raw or qcow2).

    qcow2 (and anything not raw) goes through ``qemu-img convert`` to a temporary raw file.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
        if head != b"QFI\xfb":
            f.seek(0)
            return f.read(length)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "disk.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw)],
            check=True,
            capture_output=True,
        )
        with raw.open("rb") as f:
            return f.read(length)


@dataclass
class ConsoleLog:
    """What the guest printed on its serial console."""

    ready: bool = False
    last_rec: dict[str, int] = field(default_factory=dict)
    heartbeats: list[tuple[int, float]] = field(default_factory=list)

    @property
    def max_heartbeat_gap(self) -> float | None:
        """Longest gap between consecutive heartbeats, in guest uptime seconds."""
        times = [t for _, t in self.heartbeats]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return max(gaps) if gaps else None


def parse_console(text: str) -> ConsoleLog:
    """Parse a serial console log (\\r\\n or \\n line ends; a torn last line is ignored)."""
    log = ConsoleLog()
    for line in text.replace("\r", "").split("\n"):
        line = line.strip()
        if line == READY_LINE:
            log.ready = True
        elif m := _REC.match(line):
            log.last_rec[m[1]] = max(int(m[2]), log.last_rec.get(m[1], -1))
        elif m := _HB.match(line):
            log.heartbeats.append((int(m[1]), float(m[2])))
    return log


def consistent(result: Scan, console: ConsoleLog, disk: str) -> bool:
    """The disk's highest intact seq is the last ``REC`` printed for it, or one more.

    One more: the guest may have been stopped after the record's fsync but before its
    ``REC`` line reached the console.
    """
    last = console.last_rec.get(disk)
    found = max((s for s, r in result.records.items() if r.intact and r.disk == disk), default=None)
    if last is None:
        return found is None or found == 0
    return found is not None and found in (last, last + 1)


def wait_console(path: Path, predicate: Callable[[str], bool], timeout: float = 90) -> str:
    """Poll a serial log until ``predicate(text)`` holds; AssertionError with its tail if not."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s; console so far:\n{text[-2000:]}")


def main(argv: list[str]) -> int:
    """python -m tests.guestrecords IMAGE [CONSOLE-LOG]: summary, exit 1 on a mismatch."""
    if not argv or len(argv) > 2:
        print("usage: python -m tests.guestrecords IMAGE [CONSOLE-LOG]", file=sys.stderr)
        return 2
    result = scan(read_image(argv[0]))
    valid = result.valid
    bad = sorted(seq for seq, ok in valid.items() if not ok)
    print(
        f"records={len(valid)} intact={len(valid) - len(bad)} bad={bad} "
        f"max_valid_seq={result.max_valid_seq}"
    )
    if len(argv) == 2:
        console = parse_console(Path(argv[1]).read_text(errors="replace"))
        print(
            f"ready={console.ready} last_rec={console.last_rec} "
            f"heartbeats={len(console.heartbeats)} max_gap={console.max_heartbeat_gap}"
        )
        for disk in {rec.disk for rec in result.records.values()}:
            if not consistent(result, console, disk):
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def thaws(path: Path) -> int:
    """How many thaws the console shows so far (take it before a quiesced operation)."""
    return path.read_text(errors="replace").count("FSTHAW") if path.exists() else 0


def frozen_at(path: Path, thaws_before: int, disk: str = "vda") -> int:
    """The last record written before the newest freeze, read once the console shows
    that freeze's thaw: the serial console lags the agent's answers, more so on a
    loaded host, so the marker may not be there yet when the operation returns."""
    text = wait_console(path, lambda t: t.count("FSTHAW") > thaws_before)
    head = text[: text.rindex("FSFREEZE")]
    return max(int(n) for n in re.findall(rf"REC {disk} (\d+)", head))

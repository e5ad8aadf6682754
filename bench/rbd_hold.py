#!/usr/bin/env python3
"""RBD: how long a guest with several disks is held for their snapshots.

An instance's disks must be snapshotted at one instant: the guest is frozen (or
paused) while the snapshots are taken. Starts a throwaway Ceph cluster
(scripts/ceph.sh; memstore), makes --disks N volumes of 64 MiB with data, and
times, --runs times each, alternating:

- ``one by one``: the hold entered once and each snapshot made whole inside it
  (``create_snapshot``: open the image, check the name, snapshot, close, which
  waits until the image is 0.1 s old) — what snapback did before 2026-11-30;
- ``prepared``: every image opened and every name checked first
  (``prepare_snapshot``), the hold entered, each snapshot call made, the hold
  left, then the images closed — what backups of instances do now.

``held`` is the time between entering and leaving the hold (what the guest
waits), ``total`` the whole step. Prints medians and the ratio prepared / one by
one. Run as root: .venv/bin/python bench/rbd_hold.py [--disks 1,2,4] [--runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import throwaway_ceph  # bench/ is on sys.path when run as a script

from snapback.drivers.storage.rbd import RbdPool

MIB = 1 << 20


class Timer:
    """The hold: records how long it was held."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def one_by_one(pool: RbdPool, volumes: list[str], snap: str, hold: Timer) -> None:
    with hold:
        for v in volumes:
            pool.create_snapshot(v, snap)


def prepared(pool: RbdPool, volumes: list[str], snap: str, hold: Timer) -> None:
    with contextlib.ExitStack() as stack:
        takes = [stack.enter_context(pool.prepare_snapshot(v, snap)) for v in volumes]
        with hold:
            for take in takes:
                take()


@contextlib.contextmanager
def volumes_of(pool: RbdPool, count: int, tag: str) -> Iterator[list[str]]:
    names = [f"{tag}-d{i}" for i in range(count)]
    for name in names:
        pool.create_volume(name, 64 * MIB)
        with pool.open(name) as h:
            h.write(0, os.urandom(4 * MIB))
    try:
        yield names
    finally:
        for name in names:
            for s in pool.list_snapshots(name):
                pool.delete_snapshot(name, s.name)
            pool.delete_volume(name)


def run_disks(pool: RbdPool, count: int, runs: int) -> dict[str, float]:
    keys = ("old_held", "old_total", "new_held", "new_total")
    res: dict[str, list[float]] = {k: [] for k in keys}
    with volumes_of(pool, count, f"h{count}") as vols:
        for i in range(runs):
            for key, how in (("old", one_by_one), ("new", prepared)):
                hold, t0 = Timer(), time.perf_counter()
                how(pool, vols, f"{key}{i}", hold)
                res[f"{key}_total"].append(time.perf_counter() - t0)
                res[f"{key}_held"].append(hold.seconds)
    out = {"disks": float(count)}
    out |= {f"{k}_s": round(statistics.median(v), 4) for k, v in res.items()}
    out["held_ratio"] = round(out["new_held_s"] / out["old_held_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--disks", default="1,2,4")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cdir = Path(tempfile.mkdtemp(prefix="snapback-bench-ceph-", dir="/var/tmp"))
    try:
        conf = throwaway_ceph.start(cdir, 4 << 30)
        pool = RbdPool("default", conffile=conf, rados_pool="rbd")
        rows = [run_disks(pool, int(n), args.runs) for n in args.disks.split(",")]
    finally:
        throwaway_ceph.stop(cdir)
        shutil.rmtree(cdir, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = ["disks", "old_held_s", "new_held_s", "held_ratio", "old_total_s", "new_total_s"]
    print(f"medians of {args.runs} runs (seconds); old = one by one, new = prepared")
    print("  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print("  ".join(f"{int(r[c]) if c == 'disks' else r[c]:>12}" for c in cols))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Snapshot and clone latency on the local pool against a full copy of the same disk.

A volume of --size (default 20 GiB) gets --written (default 2 GiB) of data;
then snapback's snapshot create, protect and clone are timed --runs times, and
so is the peer: a nova-style full copy with `qemu-img convert` of the same
chain. Prints medians and the ratio. Run: .venv/bin/python bench/snapshot_clone.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from snapback.config import load_settings
from snapback.domain.names import SnapshotRef
from snapback.domain.sizes import format_size, parse_size
from snapback.drivers.storage.local import LocalPool
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from snapback.services.snapshots import SnapshotService
from snapback.services.volumes import VolumeService

CHUNK = 64 << 20


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="20G")
    ap.add_argument("--written", default="2G")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    size, written = parse_size(args.size), parse_size(args.written)
    with tempfile.TemporaryDirectory(prefix="snapback-bench-") as home:
        ctx = Context(load_settings(home))
        vols, snaps = VolumeService(ctx), SnapshotService(ctx)
        vols.create("disk", size)
        with ctx.sessions() as s:
            vol = live_volume(s, "default", "disk")
        pool = ctx.pool("default")
        t_fill = time.perf_counter()
        block = os.urandom(CHUNK)
        with pool.open(vol.storage_name) as h:
            for off in range(0, written, CHUNK):
                h.write(off * 4 % (size - CHUNK), block)  # spread over the disk
        t_fill = time.perf_counter() - t_fill
        alloc = pool.volume_info(vol.storage_name).allocated
        print(
            f"volume {format_size(size)}, allocated {format_size(alloc)} "
            f"(written in {t_fill:.1f} s)"
        )
        snap_t, prot_t, clone_t = [], [], []
        for i in range(args.runs):
            ref = SnapshotRef("disk", f"s{i}")
            snap_t.append(timed(lambda r=ref: snaps.create(r)))
            prot_t.append(timed(lambda r=ref: snaps.set_protected(r, True)))
            clone_t.append(timed(lambda r=ref, n=i: vols.clone(r, f"c{n}")))
        assert isinstance(pool, LocalPool)
        head = pool.layer_path(vol.storage_name, pool.load(vol.storage_name).head)
        copy_t = []
        for i in range(max(1, args.runs // 2)):
            dst = os.path.join(home, f"copy{i}.qcow2")
            copy_t.append(
                timed(
                    lambda d=dst: subprocess.run(
                        ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(head), d],
                        check=True,
                    )
                )
            )
            os.unlink(dst)
        med = {
            k: statistics.median(v)
            for k, v in {
                "snapshot create": snap_t,
                "snapshot protect": prot_t,
                "clone": clone_t,
                "full copy (qemu-img convert)": copy_t,
            }.items()
        }
        for k, v in med.items():
            print(f"{k:30s} median {v * 1000:9.1f} ms")
        full = med["full copy (qemu-img convert)"]
        print(f"ratio clone / full copy:           {med['clone'] / full:.4f}")
        print(f"ratio snapshot create / full copy: {med['snapshot create'] / full:.4f}")


if __name__ == "__main__":
    main()

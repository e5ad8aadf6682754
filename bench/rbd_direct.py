#!/usr/bin/env python3
"""RBD: snapshot, clone and image-create latency against a nova-style full copy.

Starts a throwaway Ceph cluster (scripts/ceph.sh; memstore, so data sizes stay
within RAM), puts snapback's ``default`` and ``images`` pools on it, and for
each --sizes value S: uploads an image holding S of data, defines an instance
from it (not started: only the storage path is timed), then times --runs times

- RBD snapshot create + protect, and a clone of it (driver calls); ``held``: how
  long of the snapshot a guest frozen around it would wait (``GuestHold``);
- ``instance image-create`` by the direct flow with --flatten never and
  background (usable at once) and now (the flatten copies S);
- the peer: nova's full copy of the same disk (``qemu-img convert`` of the root
  disk into a new RBD image), which is what image-create costs without the
  direct flow.

Prints medians and ratio to the full copy; the direct path (never/background)
must stay flat as S grows. Needs libvirtd (scripts/libvirt.sh) for the domain
definitions. Run as root: .venv/bin/python bench/rbd_direct.py [--sizes 256M,1G]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import throwaway_ceph  # bench/ is on sys.path when run as a script

from snapback.config import load_settings
from snapback.domain.sizes import format_size, parse_size
from snapback.drivers.imagefmt import qemu_img
from snapback.drivers.storage.rbd import RbdPool
from snapback.drivers.storage.rbd import access as rbd_access
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from snapback.services.image_create import ImageCreateService
from snapback.services.image_create_rbd import GuestHold
from snapback.services.images import ImageService
from snapback.services.instances import InstanceService

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def data_disk(path: Path, data: int) -> None:
    block = (bytes(range(1, 256)) * (MIB // 255 + 1))[:MIB]
    with open(path, "wb") as f:
        f.truncate(data + 64 * MIB)
        for _ in range(data // MIB):
            f.write(block)


def run_size(ctx: Context, conf: str, size: int, runs: int, tmp: Path) -> dict[str, float | int]:
    images, instances = ImageService(ctx), InstanceService(ctx)
    creator = ImageCreateService(ctx)
    tag = uuid.uuid4().hex[:6]
    disk = tmp / "disk.raw"
    data_disk(disk, size)
    images.create(f"base-{tag}", str(disk), "raw")
    disk.unlink()
    instances.create(f"vm-{tag}", f"base-{tag}", start=False)
    with ctx.sessions() as s:
        root = live_volume(s, "default", f"vm-{tag}-root").storage_name
    pool = RbdPool("default", conffile=conf, rados_pool="rbd")
    img_pool = RbdPool("images", conffile=conf)
    keys = ("snap", "held", "clone", "never", "bg", "now", "copy")
    res: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(runs):
        snap = f"b{i}"
        hold = GuestHold(lambda: True, lambda: None)  # what a frozen guest would wait
        res["snap"].append(
            timed(lambda s=snap, h=hold: pool.create_snapshot(root, s, protect=True, around=h))
        )
        res["held"].append(hold.seconds)
        res["clone"].append(timed(lambda s=snap: pool.clone(root, s, img_pool, f"c-{tag}-{s}")))
        img_pool.delete_volume(f"c-{tag}-{snap}")
        pool.unprotect_snapshot(root, snap)
        pool.delete_snapshot(root, snap)
        for key, mode in (("never", "never"), ("bg", "background"), ("now", "now")):
            name = f"{key}-{tag}-{i}"
            res[key].append(timed(lambda n=name, m=mode: creator.create(f"vm-{tag}", n, flatten=m)))
            while images.show(name).properties.get("snapback.flatten") not in ("done", "never"):
                time.sleep(0.2)  # let the background job finish before the next one
            images.delete(name)  # memstore keeps data in RAM: free it
        target = f"copy-{tag}-{i}"
        img_pool.create_volume(target, size + 64 * MIB)
        res["copy"].append(
            timed(
                lambda t=target: qemu_img.convert_opts(
                    rbd_access.target(pool, root), "raw", rbd_access.target(img_pool, t), "raw"
                )
            )
        )
        img_pool.delete_volume(target)
    out: dict[str, float | int] = {"data": size}
    for key, values in res.items():
        out[f"{key}_s"] = round(statistics.median(values), 3)
    for key in ("snap", "clone", "never", "bg", "now"):
        out[f"{key}_vs_copy"] = round(float(out[f"{key}_s"]) / float(out["copy_s"]), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    subprocess.run([str(ROOT / "scripts" / "libvirt.sh")], check=True)
    cdir = Path(tempfile.mkdtemp(prefix="snapback-bench-ceph-", dir="/var/tmp"))
    home = Path(tempfile.mkdtemp(prefix="snapback-bench-", dir="/var/tmp"))
    home.chmod(0o755)
    try:
        conf = throwaway_ceph.start(cdir, 12 << 30)
        (home / "snapback.toml").write_text(
            f'[pools.default]\ndriver = "rbd"\nconf = "{conf}"\npool = "rbd"\n'
            f'[pools.images]\ndriver = "rbd"\nconf = "{conf}"\npool = "images"\n'
        )
        ctx = Context(load_settings(home))
        rows = [run_size(ctx, conf, parse_size(s), args.runs, home) for s in args.sizes.split(",")]
        for inst in InstanceService(ctx).list_instances():
            InstanceService(ctx).delete(inst.name)
    finally:
        throwaway_ceph.stop(cdir)
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = ["data", "snap_s", "held_s", "clone_s", "never_s", "bg_s", "now_s", "copy_s",
            "clone_vs_copy", "never_vs_copy", "bg_vs_copy", "now_vs_copy"]  # fmt: skip
    print(f"medians of {args.runs} runs (seconds); *_vs_copy = ratio to the full copy")
    print("  ".join(f"{c:>13}" for c in cols))
    for r in rows:
        cells = [format_size(int(r["data"])) if c == "data" else str(r[c]) for c in cols]
        print("  ".join(f"{c:>13}" for c in cells))


if __name__ == "__main__":
    main()

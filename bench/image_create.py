#!/usr/bin/env python3
"""image-create: guest-visible pause and wall time against the disk's allocated size.

For each --sizes value S, an image whose disk holds S of data (beyond the test
guest's record area) is uploaded, an instance is booted from it (TCG, the test
guest writing records and 100 ms heartbeats), and snapback's cold and live
image-create flows are timed --runs times each, in-process (no CLI start-up).

- pause: the longest gap between two heartbeat lines as they reach the host's
  serial log (polled every 10 ms), i.e. how long the guest stopped in
  wall-clock time; the baseline gap with nothing running is printed too;
- wall: the whole image-create, against the peer: `qemu-img convert` of the
  same disk chain into a new file (the copy nova's flows are built around).

Needs libvirtd (scripts/libvirt.sh) and the test guest (scripts/build-guest.sh);
run as root: .venv/bin/python bench/image_create.py [--sizes 64M,512M] [--runs 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from snapback.config import load_settings
from snapback.domain.sizes import format_size, parse_size
from snapback.services.context import Context
from snapback.services.image_create import ImageCreateService
from snapback.services.images import ImageService
from snapback.services.instances import InstanceService

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
DATA_AT = 1 * MIB  # the guest's records live below 256 KiB


class Heartbeats:
    """Host arrival times of the guest's HB lines."""

    def __init__(self, console: Path) -> None:
        self.console = console
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _count(self) -> int:
        return self.console.read_bytes().count(b"\nHB ")

    def _watch(self) -> None:
        seen = self._count()
        while not self._stop.is_set():
            n = self._count()
            self.times.extend([time.monotonic()] * (n - seen))
            seen = n
            time.sleep(0.01)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def max_gap(self) -> float:
        return max((b - a for a, b in itertools.pairwise(self.times)), default=0.0)


def data_disk(path: Path, data: int) -> None:
    """A raw disk: 1 MiB for the guest's records, then ``data`` bytes of non-zero data."""
    block = (bytes(range(1, 256)) * (MIB // 255 + 1))[:MIB]
    with open(path, "wb") as f:
        f.truncate(DATA_AT + data + 16 * MIB)
        f.seek(DATA_AT)
        for _ in range(data // MIB):
            f.write(block)


def wait_for(console: Path, text: str, count: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists() and console.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {text!r} in {console}")


def convert_peer(ctx: Context, inst: str, out: Path) -> float:
    """nova's copy: qemu-img convert of the instance's whole disk chain."""
    view = InstanceService(ctx).show(inst)
    pool, name = view.disks["vda"].split("/", 1)
    with ctx.sessions() as s:
        from snapback.services.catalog_queries import live_volume

        storage = live_volume(s, pool, name).storage_name
    src = ctx.pool(pool).attachment(storage).source
    t0 = time.perf_counter()
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", src, str(out)], check=True
    )
    took = time.perf_counter() - t0
    out.unlink()
    return took


def run_size(ctx: Context, guest: Path, size: int, runs: int, tmp: Path) -> dict[str, object]:
    images, instances, creator = ImageService(ctx), InstanceService(ctx), ImageCreateService(ctx)
    tag = format_size(size).replace(" ", "").replace(".", "_")
    disk = tmp / f"disk-{tag}.raw"
    data_disk(disk, size)
    kernel = images.show("kernel").id
    initrd = images.show("initrd").id
    images.create(
        f"base-{tag}",
        str(disk),
        "raw",
        {
            "kernel_id": kernel,
            "ramdisk_id": initrd,
            "os_command_line": "console=ttyS0 quiet panic=-1 snapback.records=64",
        },
    )
    disk.unlink()
    inst = instances.create(f"vm-{tag}", f"base-{tag}")
    console = Path(inst.console)
    wait_for(console, "SNAPBACK-GUEST-AGENT")
    wait_for(console, "REC vda", 70)
    with Heartbeats(console) as idle:
        time.sleep(3)
    result: dict[str, object] = {
        "data": size,
        "idle_gap_s": round(idle.max_gap(), 3),
    }
    for mode in ("cold", "live"):
        walls, pauses = [], []
        for i in range(runs):
            with Heartbeats(console) as hb:
                time.sleep(0.5)
                t0 = time.perf_counter()
                img = creator.create(f"vm-{tag}", f"{mode}-{tag}-{i}", mode=mode)
                walls.append(time.perf_counter() - t0)
                time.sleep(1.0)
            pauses.append(hb.max_gap())
            images.delete(img.id)
        result[f"{mode}_wall_s"] = round(statistics.median(walls), 3)
        result[f"{mode}_pause_s"] = round(statistics.median(pauses), 3)
    peer = statistics.median(
        convert_peer(ctx, f"vm-{tag}", tmp / "peer.qcow2") for _ in range(runs)
    )
    result["convert_s"] = round(peer, 3)
    for mode in ("cold", "live"):
        result[f"{mode}_vs_convert"] = round(float(str(result[f"{mode}_wall_s"])) / peer, 2)
    instances.delete(f"vm-{tag}")
    images.delete(f"base-{tag}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="64M,512M", help="data in the disk, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    subprocess.run([str(ROOT / "scripts" / "libvirt.sh")], check=True)
    guest = Path("/var/lib/snapback/guest")
    subprocess.run([str(ROOT / "scripts" / "build-guest.sh"), str(guest)], check=True)
    home = Path(tempfile.mkdtemp(prefix="snapback-bench-", dir="/var/tmp"))
    home.chmod(0o755)
    try:
        ctx = Context(load_settings(home))
        images = ImageService(ctx)
        images.create("kernel", str(guest / "vmlinuz"), "aki")
        images.create("initrd", str(guest / "initrd.gz"), "ari")
        rows = [run_size(ctx, guest, parse_size(s), args.runs, home) for s in args.sizes.split(",")]
    finally:
        for inst in InstanceService(Context(load_settings(home))).list_instances():
            InstanceService(Context(load_settings(home))).delete(inst.name)
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = [
        "data", "idle_gap_s", "cold_pause_s", "live_pause_s", "cold_wall_s", "live_wall_s",
        "convert_s", "cold_vs_convert", "live_vs_convert",
    ]  # fmt: skip
    print(f"medians of {args.runs} runs; pause = longest heartbeat gap seen on the host")
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        cells = [format_size(int(str(r["data"]))) if c == "data" else str(r[c]) for c in cols]
        print("  ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()

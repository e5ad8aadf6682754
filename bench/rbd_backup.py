#!/usr/bin/env python3
"""RBD backups: one reader against several, timed and checked byte for byte.

Starts a throwaway Ceph cluster (scripts/ceph.sh, memstore), imports a --disk
raw disk holding an ext4 filesystem of --data of this machine's /usr (the same
reference disk as bench/backup_vs_peers.py, smaller) into an RBD pool, then
alternates --runs times between the two ways of reading an RBD snapshot:

- ``one``: a single thread reads, in disk order, and feeds the workers;
- ``many``: every backup worker reads its own chunk (``RbdHandle`` read-only
  handles take concurrent reads).

Each round is a full backup into a fresh repository (timed, in-process
``BackupService.create``) and a restore into a local volume whose export must
hash like the source. Prints medians and the ratio many/one; a failed round (an
error, a wrong hash) is counted and named, and the exit status is 1; a crash
inside librbd ends the run with its signal. It is also the stress campaign for
concurrent librbd reads: run it with --runs 20 or more.

Run as root: .venv/bin/python bench/rbd_backup.py [--disk 1G --data 512M --runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import throwaway_ceph  # noqa: E402
from backup_vs_peers import make_disks, sha256  # noqa: E402

from snapback.config import load_settings  # noqa: E402
from snapback.domain.models import DiskFormat  # noqa: E402
from snapback.domain.sizes import parse_size  # noqa: E402
from snapback.drivers.storage.rbd import handle as rbd_handle  # noqa: E402
from snapback.repository.repo import Repository, open_backend  # noqa: E402
from snapback.services.backups import BackupService  # noqa: E402
from snapback.services.context import Context  # noqa: E402
from snapback.services.volumes import VolumeService  # noqa: E402


def one_round(ctx: Context, home: Path, mode: str, n: int, want: str) -> float:
    rbd_handle.PARALLEL_READS = mode == "many"
    repo = home / f"repo-{mode}-{n}"
    Repository.init(open_backend(str(repo)), None)
    backups = BackupService(ctx)
    t = time.perf_counter()
    record = backups.create("v", str(repo), mode="full")
    took = time.perf_counter() - t
    name = f"r-{mode}-{n}"
    backups.restore(record["id"], str(repo), name, pool="files")
    out = home / f"{name}.raw"
    VolumeService(ctx).export(name, str(out), DiskFormat.RAW, pool="files")
    got = sha256(out)
    out.unlink()
    VolumeService(ctx).delete(name, pool="files")
    shutil.rmtree(repo)
    if got != want:
        raise AssertionError(f"restore of {record['id']} ({mode}) differs from the source")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--disk", default="1G")
    ap.add_argument("--data", default="512M")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--osd-delay",
        type=float,
        default=0.0,
        help="delay each OSD reply to snapback by up to this many seconds (Ceph's "
        "ms_inject_delay options): a network's latency, which memstore on this "
        "machine has not",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cdir = Path(tempfile.mkdtemp(prefix="snapback-bench-ceph-", dir="/var/tmp"))
    home = Path(tempfile.mkdtemp(prefix="snapback-bench-", dir="/var/tmp"))
    times: dict[str, list[float]] = {"one": [], "many": []}
    failures: list[str] = []
    try:
        conf = throwaway_ceph.start(cdir, 6 << 30)
        if args.osd_delay:
            delayed = home / "ceph-delayed.conf"
            delayed.write_text(
                Path(conf).read_text() + "\n[client]\nms_inject_delay_type = osd\n"
                f"ms_inject_delay_max = {args.osd_delay}\nms_inject_delay_probability = 1\n"
            )
            conf = str(delayed)
        (home / "snapback.toml").write_text(
            f'[pools.default]\ndriver = "rbd"\nconf = "{conf}"\npool = "rbd"\n'
            f'[pools.files]\ndriver = "local"\npath = "{home / "files"}"\n'
        )
        raw, _, _ = make_disks(home, parse_size(args.data), parse_size(args.disk))
        want = sha256(raw)
        ctx = Context(load_settings(home))
        VolumeService(ctx).import_file("v", str(raw), DiskFormat.RAW)
        for n in range(args.runs):
            for mode in ("one", "many") if n % 2 == 0 else ("many", "one"):
                try:
                    times[mode].append(one_round(ctx, home, mode, n, want))
                except Exception as exc:  # a campaign counts failures and goes on
                    failures.append(f"round {n} ({mode}): {type(exc).__name__}: {exc}")
                    print(failures[-1], file=sys.stderr)
            print(f"round {n}: " + ", ".join(f"{m} {v[-1]:.3f} s" for m, v in times.items() if v),
                  file=sys.stderr)  # fmt: skip
    finally:
        throwaway_ceph.stop(cdir)
        shutil.rmtree(home, ignore_errors=True)
    res: dict[str, Any] = {m: statistics.median(v) if v else None for m, v in times.items()}
    res["rounds"] = {m: len(v) for m, v in times.items()}
    res["failures"] = failures
    if res["one"] and res["many"]:
        res["many_vs_one"] = round(res["many"] / res["one"], 3)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        ms = args.osd_delay * 1000
        delay = f", OSD replies delayed up to {ms:g} ms" if ms else ""
        print(f"full backup of {args.disk} ({args.data} of /usr) from RBD{delay}, medians:")
        print(f"  one reader   {res['one']:.3f} s   many readers {res['many']:.3f} s   "
              f"ratio {res.get('many_vs_one')}   failures {len(failures)}")  # fmt: skip
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

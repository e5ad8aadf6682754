#!/usr/bin/env python3
"""Backups: snapback against restic and borg on the same disk, in one run.

The reference disk is a --disk raw file (default 4 GiB) holding an ext4
filesystem made by ``mkfs.ext4 -d`` from about --data (default 2 GiB) of this
machine's /usr, and the same disk converted to qcow2. snapback backs up a
volume imported from the raw file (and, once per run, one imported from the
qcow2: the local pool converts every import into a qcow2 layer, so the two
volumes are alike and the figure is a check, not a separate case); restic and
borg back up the raw file itself. Each of --runs runs uses fresh repositories,
a fresh volume and a fresh copy of the raw file; the table shows medians.

1. full backup wall time and repository size (``du -sb``): snapback (in-process
   BackupService.create, unencrypted; --encrypt for a passphrase), borg
   (``init -e none``; ``create --chunker-params fixed,4194304 -C zstd,1``),
   restic (``init``, ``backup FILE``; restic always encrypts, and 0.14
   compresses with zstd ``auto``). Targets: snapback/borg <= 0.5,
   snapback/restic <= 0.3, size snapback/borg <= 1.
2. incremental: 1 % of the disk rewritten in scattered 1 MiB writes (seeded
   random offsets and data) through the volume's block handle (snapback) and
   with os.pwrite into the raw file (peers); snapback's incremental against
   borg's second ``create`` (its files cache cannot help: the file changed, so
   it reads and chunks the whole file again); restic's for information. The
   record's ``change_tracking`` is shown. Target <= 0.1 with change tracking.
   Then 1 % more is rewritten and the volume's tracking bitmap removed (tracking
   lost): snapback falls back to comparing chunk hashes, against borg's third
   ``create``. Target <= 0.8. In between, 1 % more is rewritten and backed up
   through the CLI in a fresh process, for information: the in-process figure
   leaves out the interpreter's start and snapback's imports (about 0.4-0.6 s
   here; borg's figure includes its own start, about 0.3 s).
3. restore of the full backup: snapback ``restore`` into a new volume (the
   export used for the sha256 check is not timed) against ``restic restore``
   (target <= 0.5) and ``borg extract --sparse`` (information). Every restore is
   compared with the source by sha256; the first run also restores snapback's
   incremental backup and compares it with the rewritten disk.
4. an unchanged thin volume: a --thin-size (default 1 TiB) volume with a few
   MiB written, its full backup, then an incremental backup with no change.
5. peak memory: ru_maxrss of a ``snapback backup create`` CLI run
   (the Python process or qemu-nbd, whichever is larger: the kernel folds the
   waited-for children in) on disks of disk/8, disk and --thin-size; and of the
   peers' full backups. Flat: RSS at disk over RSS at disk/8 <= 1.25.

The page cache is warm for every tool: each source file (the volume's qcow2
layers, the peers' raw file) is read through before each timed backup. Without
that, snapback's volume, imported with O_DIRECT and rewritten through qemu-nbd
with cache=none, would be read from the disk while the peers' file, copied and
rewritten through the page cache, would not. Then ``sync``, so that no tool's
time includes the writeback of what the set-up wrote (the copied disk).
restic and borg are installed with apt-get when missing. Everything lives
in a temporary folder under /var/tmp, removed at the end. Run as root:

    .venv/bin/python bench/backup_vs_peers.py [--data 2G --disk 4G] [--runs 3] [--json]
    .venv/bin/python bench/backup_vs_peers.py --quick     # 256M in 512M, 1 run
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from snapback.config import load_settings
from snapback.domain.models import DiskFormat
from snapback.domain.sizes import format_size, parse_size
from snapback.repository.repo import Repository, open_backend
from snapback.services.backups import BackupService
from snapback.services.catalog_queries import live_volume
from snapback.services.context import Context
from snapback.services.volumes import VolumeService

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src")  # the CLI runs the same code as the in-process calls
MIB = 1 << 20
PASSPHRASE = "bench-passphrase"
PEER_ENV = {
    "RESTIC_PASSWORD": PASSPHRASE,
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
}


# -- tools ------------------------------------------------------------------------------
def ensure_peers() -> dict[str, str]:
    """restic and borg, installed from Debian when missing; their versions."""
    if not (shutil.which("restic") and shutil.which("borg")):
        apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "restic", "borgbackup"], env=apt).returncode:
            subprocess.run(["apt-get", "update"], check=True, env=apt)
            subprocess.run(
                ["apt-get", "install", "-y", "restic", "borgbackup"], check=True, env=apt
            )
    versions = {}
    for tool, argv in (("restic", ["restic", "version"]), ("borg", ["borg", "--version"])):
        versions[tool] = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    return versions


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, int]:
    """Run a command; (wall seconds, peak RSS in KiB).

    The peak comes from /usr/bin/time (a small process: a child forked from this
    one would carry this process's RSS into its ru_maxrss); the kernel folds the
    command's waited-for children (qemu-nbd under snapback) into it."""
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv],
            env={**os.environ, **env},
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            log.seek(0)
            out = log.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{out}")
        return took, int(rss.read().split()[-1])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def warm(*paths: Path) -> None:
    """Read files through, so that the next reader finds them in the page cache, and
    write back what the set-up left dirty (a copied disk: 2 GiB), so that the timed
    tool does not share the disk with that writeback."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 * MIB):
                pass
    os.sync()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MIB):
            h.update(block)
    return h.hexdigest()


# -- the reference disk -------------------------------------------------------------------
def copy_usr(dest: Path, budget: int) -> int:
    """Copy /usr's files (sorted walk) into ``dest`` until ``budget`` bytes; bytes copied."""
    total = 0
    for top, dirs, files in os.walk("/usr"):
        dirs.sort()
        rel = Path(top).relative_to("/usr")
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            src, dst = Path(top) / name, dest / rel / name
            try:
                if src.is_symlink():
                    os.symlink(os.readlink(src), dst)
                elif src.is_file():
                    size = src.stat().st_size
                    if total + size > budget:
                        continue
                    shutil.copyfile(src, dst)
                    total += size
            except OSError:
                continue
            if total >= budget - 64 * 1024:
                return total
    return total


def make_disks(work: Path, data: int, disk: int) -> tuple[Path, Path, int]:
    tree = work / "tree"
    copied = copy_usr(tree, data)
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(disk)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-i", "8192", "-d", str(tree), str(raw)],
        check=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    shutil.rmtree(tree)
    qcow2 = work / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    return raw, qcow2, copied


def scatter_writes(disk: int, seed: int) -> list[tuple[int, bytes]]:
    """1 % of the disk as 1 MiB writes at distinct random MiB offsets, random data."""
    rng = random.Random(seed)
    count = max(1, round(disk / 100 / MIB))
    return [(n * MIB, rng.randbytes(MIB)) for n in sorted(rng.sample(range(disk // MIB), count))]


# -- snapback ----------------------------------------------------------------------------
class Snapback:
    def __init__(self, home: Path, passphrase: str | None) -> None:
        self.home = home
        self.ctx = Context(load_settings(home))
        self.volumes = VolumeService(self.ctx)
        self.backups = BackupService(self.ctx)
        self.passphrase = passphrase

    def init_repo(self, repo: Path) -> None:
        Repository.init(open_backend(str(repo)), self.passphrase)

    def storage(self, name: str) -> str:
        with self.ctx.sessions() as s:
            return live_volume(s, "default", name).storage_name

    def write(self, name: str, writes: list[tuple[int, bytes]]) -> None:
        with self.ctx.pool("default").open(self.storage(name)) as handle:
            for off, data in writes:
                handle.write(off, data)

    def backup(self, name: str, repo: Path) -> tuple[float, dict[str, Any]]:
        return timed(lambda: self.backups.create(name, str(repo), passphrase=self.passphrase))

    def restore(self, backup_id: str, repo: Path, name: str) -> float:
        took, _ = timed(
            lambda: self.backups.restore(backup_id, str(repo), name, passphrase=self.passphrase)
        )
        return took

    def export_sha(self, name: str, dest: Path) -> str:
        self.volumes.export(name, str(dest), DiskFormat.RAW)
        digest = sha256(dest)
        dest.unlink()
        return digest

    def warm(self, name: str) -> None:
        folder = self.ctx.settings.home / "pools" / "default" / self.storage(name)
        warm(*sorted(folder.glob("*.qcow2")))

    def cli_timed_backup(self, name: str, repo: Path) -> tuple[float, str]:
        """Wall time of a CLI ``backup create`` (interpreter start and imports
        included, as an operator runs it) and the new backup's id."""
        env = {**os.environ, "SNAPBACK_HOME": str(self.home), "PYTHONPATH": SRC}
        if self.passphrase:
            env["SNAPBACK_REPO_PASSPHRASE"] = self.passphrase
        argv = [sys.executable, "-m", "snapback", "backup", "create", name, "--repo", str(repo)]
        took, proc = timed(
            lambda: subprocess.run(
                [*argv, "--format", "json"], env=env, capture_output=True, text=True
            )
        )
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
        return took, str(json.loads(proc.stdout)["id"])

    def cli_backup(self, name: str, repo: Path) -> int:
        """Peak RSS (KiB) of a CLI ``backup create`` (fresh process)."""
        env = {"SNAPBACK_HOME": str(self.home), "PYTHONPATH": SRC}
        if self.passphrase:
            env["SNAPBACK_REPO_PASSPHRASE"] = self.passphrase
        _, rss = run(
            [sys.executable, "-m", "snapback", "backup", "create", name, "--repo", str(repo)], env
        )
        return rss


# -- one run ---------------------------------------------------------------------------------
def rewrite(sb: Snapback, vol: str, peer_file: Path, writes: list[tuple[int, bytes]]) -> None:
    """The same writes into snapback's volume (its block handle) and the peers' raw file."""
    sb.write(vol, writes)
    fd = os.open(peer_file, os.O_WRONLY)
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def borg_create(
    repo: Path, archive: str, peer_file: Path, env: dict[str, str]
) -> tuple[float, int]:
    return run(
        ["borg", "create", "--chunker-params", "fixed,4194304", "-C", "zstd,1",
         f"{repo}::{archive}", str(peer_file)],
        env,
    )  # fmt: skip


def one_run(
    sb: Snapback,
    work: Path,
    raw: Path,
    qcow2: Path,
    source_sha: str,
    disk: int,
    thin: int,
    i: int,
) -> dict[str, Any]:
    d = work / f"run{i}"
    d.mkdir()
    env = {**PEER_ENV, "BORG_BASE_DIR": str(d / "borg-home"), "RESTIC_CACHE_DIR": str(d / "rc")}
    out: dict[str, Any] = {}
    vol, vol_q = f"disk{i}", f"diskq{i}"
    out["import_s"], _ = timed(lambda: sb.volumes.import_file(vol, str(raw), DiskFormat.RAW))
    peer_file = d / "disk.raw"
    subprocess.run(["cp", "--sparse=always", raw, peer_file], check=True)

    # 1. full backups
    sb_repo, borg_repo, restic_repo = d / "snapback-repo", d / "borg-repo", d / "restic-repo"
    sb.init_repo(sb_repo)
    sb.warm(vol)
    out["sb_full_s"], full = sb.backup(vol, sb_repo)
    out["sb_repo_bytes"] = du(sb_repo)
    if i == 0:
        sb.volumes.import_file(vol_q, str(qcow2), DiskFormat.QCOW2)
        q_repo = d / "snapback-repo-q"
        sb.init_repo(q_repo)
        sb.warm(vol_q)
        out["sb_full_qcow2_s"], _ = sb.backup(vol_q, q_repo)
        sb.volumes.delete(vol_q)
        shutil.rmtree(q_repo)
    run(["borg", "init", "-e", "none", str(borg_repo)], env)
    warm(peer_file)
    out["borg_full_s"], out["borg_full_rss_kib"] = borg_create(borg_repo, "full", peer_file, env)
    out["borg_repo_bytes"] = du(borg_repo)
    run(["restic", "init", "--repo", str(restic_repo)], env)
    warm(peer_file)
    out["restic_full_s"], out["restic_full_rss_kib"] = run(
        ["restic", "backup", "--repo", str(restic_repo), str(peer_file)], env
    )
    out["restic_repo_bytes"] = du(restic_repo)

    # 3. restores of the full backups, each checked against the source
    restored = f"restored{i}"
    os.sync()  # the repositories' writeback is not the restores' work
    out["sb_restore_s"] = sb.restore(full["id"], sb_repo, restored)
    check(sb.export_sha(restored, d / "export.raw"), source_sha, "snapback restore")
    sb.volumes.delete(restored)
    target = d / "restic-restore"
    os.sync()
    out["restic_restore_s"], _ = run(
        ["restic", "restore", "latest", "--repo", str(restic_repo), "--target", str(target)], env
    )
    check(sha256(found(target, peer_file)), source_sha, "restic restore")
    shutil.rmtree(target)
    target.mkdir()
    os.sync()
    out["borg_restore_s"], _ = run(
        ["borg", "extract", "--sparse", f"{borg_repo}::full"], env, target
    )
    check(sha256(found(target, peer_file)), source_sha, "borg extract")
    shutil.rmtree(target)

    # 2. incremental after 1 % scattered rewrites
    writes = scatter_writes(disk, seed=1000 + i)
    rewrite(sb, vol, peer_file, writes)
    sb.warm(vol)
    out["sb_incr_s"], incr = sb.backup(vol, sb_repo)
    out["change_tracking"] = incr["change_tracking"]
    out["sb_incr_read_bytes"] = incr["stats"]["read_bytes"]
    warm(peer_file)
    out["borg_incr_s"], _ = borg_create(borg_repo, "incr", peer_file, env)
    warm(peer_file)
    out["restic_incr_s"], _ = run(
        ["restic", "backup", "--repo", str(restic_repo), str(peer_file)], env
    )
    if i == 0:
        sb.restore(incr["id"], sb_repo, restored)
        check(sb.export_sha(restored, d / "export.raw"), sha256(peer_file), "snapback incr restore")
        sb.volumes.delete(restored)
    # 2a. 1 % more through the CLI, for information: what the in-process figure
    # leaves out (interpreter start, imports; borg's figure includes its own)
    rewrite(sb, vol, peer_file, scatter_writes(disk, seed=1500 + i))
    sb.warm(vol)
    out["sb_incr_cli_s"], newest = sb.cli_timed_backup(vol, sb_repo)
    # 2b. the same with change tracking lost (its bitmap removed): hash-compare
    writes = scatter_writes(disk, seed=2000 + i)
    rewrite(sb, vol, peer_file, writes)
    sb.ctx.pool("default").stop_tracking(sb.storage(vol), "snapback-" + newest)
    sb.warm(vol)
    out["sb_hash_incr_s"], hashed = sb.backup(vol, sb_repo)
    check(hashed["change_tracking"], "hash-compare", "change tracking after the bitmap is gone")
    warm(peer_file)
    out["borg_incr2_s"], _ = borg_create(borg_repo, "incr2", peer_file, env)
    if i == 0:
        sb.restore(hashed["id"], sb_repo, restored)
        check(sb.export_sha(restored, d / "export.raw"), sha256(peer_file), "snapback hash restore")
        sb.volumes.delete(restored)
    sb.volumes.delete(vol)

    # 4. an unchanged thin volume
    thin_vol, thin_repo = f"thin{i}", d / "thin-repo"
    sb.volumes.create(thin_vol, thin)
    rng = random.Random(i)
    sb.write(thin_vol, [(off, rng.randbytes(MIB)) for off in (0, thin // 2, thin - 4 * MIB)])
    sb.init_repo(thin_repo)
    out["thin_full_s"], _ = sb.backup(thin_vol, thin_repo)
    out["thin_incr_s"], _ = sb.backup(thin_vol, thin_repo)
    sb.volumes.delete(thin_vol)
    shutil.rmtree(d)
    return out


def found(target: Path, peer_file: Path) -> Path:
    hits = glob.glob(str(target / "**" / peer_file.name), recursive=True)
    if len(hits) != 1:
        raise SystemExit(f"restored file {peer_file.name} not found under {target}: {hits}")
    return Path(hits[0])


def check(got: str, want: str, what: str) -> None:
    if got != want:
        raise SystemExit(f"{what}: sha256 {got} differs from the source's {want}")


def memory(sb: Snapback, work: Path, raw: Path, disk: int, thin: int) -> dict[str, int]:
    """Peak RSS of a CLI full backup at disk/8, disk and thin sizes (KiB)."""
    d = work / "mem"
    d.mkdir()
    small = d / "small.raw"
    with open(raw, "rb") as src, open(small, "wb") as dst:
        for _ in range(disk // 8 // MIB):
            dst.write(src.read(MIB))
    out = {}
    for label, make in (
        ("small", lambda n: sb.volumes.import_file(n, str(small), DiskFormat.RAW)),
        ("disk", lambda n: sb.volumes.import_file(n, str(raw), DiskFormat.RAW)),
        ("thin", lambda n: sb.volumes.create(n, thin)),
    ):
        name = f"mem-{label}"
        make(name)
        if label == "thin":
            sb.write(name, [(0, os.urandom(4 * MIB))])
        sb.init_repo(d / label)
        out[f"sb_rss_{label}_kib"] = sb.cli_backup(name, d / label)
        sb.volumes.delete(name)
        shutil.rmtree(d / label)
    shutil.rmtree(d)
    return out


# -- report --------------------------------------------------------------------------------
def summarise(rows: list[dict[str, Any]], mem: dict[str, int], args: Any) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(float(r[key]) for r in rows if key in r))

    keys = [k for k in rows[0] if k != "change_tracking"]
    res: dict[str, Any] = {k: round(med(k), 3) for k in keys}
    res["change_tracking"] = sorted({str(r["change_tracking"]) for r in rows})
    res.update(mem)
    tracked = res["change_tracking"] != ["hash-compare"]
    ratios = {
        "full_vs_borg": (med("sb_full_s") / med("borg_full_s"), 0.5),
        "full_vs_restic": (med("sb_full_s") / med("restic_full_s"), 0.3),
        "size_vs_borg": (med("sb_repo_bytes") / med("borg_repo_bytes"), 1.0),
        "incr_vs_borg": (med("sb_incr_s") / med("borg_incr_s"), 0.1 if tracked else 0.8),
        "hash_incr_vs_borg": (med("sb_hash_incr_s") / med("borg_incr2_s"), 0.8),
        "restore_vs_restic": (med("sb_restore_s") / med("restic_restore_s"), 0.5),
        "rss_disk_vs_disk8": (mem["sb_rss_disk_kib"] / mem["sb_rss_small_kib"], 1.25),
    }
    # for information (no target): the incremental as an operator's command runs it
    res["incr_cli_vs_borg"] = round(med("sb_incr_cli_s") / med("borg_incr_s"), 3)
    res["ratios"] = {
        k: {"ratio": round(v, 3), "target": t, "pass": v <= t} for k, (v, t) in ratios.items()
    }
    res["runs"], res["data"], res["disk"] = args.runs, args.data_bytes, args.disk_bytes
    res["thin_size"] = args.thin_bytes
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def print_table(res: dict[str, Any], versions: dict[str, str], copied: int) -> None:
    def mb(v: float) -> str:
        return f"{v / MIB:.0f} MiB"

    print(
        f"disk {format_size(res['disk'])} ext4 holding {format_size(copied)} of /usr; "
        f"medians of {res['runs']} run(s); seconds unless stated"
    )
    print(f"peers: {versions['restic']}; {versions['borg']}; load average at the end: "
          f"{res['loadavg_end']} (other work on the machine shows here)")  # fmt: skip
    lines = [
        ("full backup", res["sb_full_s"], res["borg_full_s"], res["restic_full_s"]),
        ("full backup, qcow2 import", res.get("sb_full_qcow2_s", "-"), "", ""),
        ("repository size", mb(res["sb_repo_bytes"]), mb(res["borg_repo_bytes"]),
         mb(res["restic_repo_bytes"])),
        (f"incremental ({'/'.join(res['change_tracking'])})", res["sb_incr_s"],
         res["borg_incr_s"], res["restic_incr_s"]),
        ("incremental: bytes read", mb(res["sb_incr_read_bytes"]), "", ""),
        ("incremental, CLI (process start incl.)", res["sb_incr_cli_s"], "", ""),
        ("incremental, tracking lost (hash-compare)", res["sb_hash_incr_s"],
         res["borg_incr2_s"], ""),
        ("restore of the full backup", res["sb_restore_s"], res["borg_restore_s"],
         res["restic_restore_s"]),
        (f"thin {format_size(res['thin_size'])}: full", res["thin_full_s"], "", ""),
        (f"thin {format_size(res['thin_size'])}: unchanged incr", res["thin_incr_s"], "", ""),
        ("peak RSS full backup, disk/8", f"{res['sb_rss_small_kib'] // 1024} MiB", "", ""),
        ("peak RSS full backup, disk", f"{res['sb_rss_disk_kib'] // 1024} MiB",
         f"{int(res['borg_full_rss_kib']) // 1024} MiB",
         f"{int(res['restic_full_rss_kib']) // 1024} MiB"),
        (f"peak RSS full backup, thin {format_size(res['thin_size'])}",
         f"{res['sb_rss_thin_kib'] // 1024} MiB", "", ""),
        ("volume import (not a backup)", res["import_s"], "", ""),
    ]  # fmt: skip
    print(f"{'':38} {'snapback':>12} {'borg':>12} {'restic':>12}")
    for name, *cells in lines:
        print(f"{name:38} " + " ".join(f"{c!s:>12}" for c in cells))
    print(f"\n{'ratio':38} {'value':>12} {'target':>12} {'result':>12}")
    for name, r in res["ratios"].items():
        verdict = "pass" if r["pass"] else "FAIL"
        print(f"{name:38} {r['ratio']:>12} {'<= ' + str(r['target']):>12} {verdict:>12}")
    print(f"{'incr_cli_vs_borg (information)':38} {res['incr_cli_vs_borg']:>12}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="2G", help="bytes of /usr copied into the filesystem")
    ap.add_argument("--disk", default="4G", help="size of the raw disk")
    ap.add_argument("--thin-size", default="1T", help="virtual size of the thin volume")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="--data 256M --disk 512M --runs 1")
    ap.add_argument("--encrypt", action="store_true", help="snapback repositories encrypted too")
    ap.add_argument("--json", action="store_true", help="also print one JSON line at the end")
    args = ap.parse_args()
    if args.quick:
        args.data, args.disk, args.runs = "256M", "512M", 1
    args.data_bytes, args.disk_bytes = parse_size(args.data), parse_size(args.disk)
    args.thin_bytes = parse_size(args.thin_size)
    versions = ensure_peers()
    work = Path(tempfile.mkdtemp(prefix="snapback-bench-peers-", dir="/var/tmp"))
    try:
        raw, qcow2, copied = make_disks(work, args.data_bytes, args.disk_bytes)
        source_sha = sha256(raw)  # also warms the page cache for every tool
        sb = Snapback(work / "home", PASSPHRASE if args.encrypt else None)
        rows = []
        for i in range(args.runs):
            rows.append(
                one_run(sb, work, raw, qcow2, source_sha, args.disk_bytes, args.thin_bytes, i)
            )
            print(f"run {i + 1}/{args.runs}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        mem = memory(sb, work, raw, args.disk_bytes, args.thin_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = summarise(rows, mem, args)
    res["data_copied"], res["encrypted"] = copied, args.encrypt
    print_table(res, versions, copied)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()

"""The benches' throwaway Ceph cluster: scripts/ceph.sh, started and stopped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(folder: Path, memstore_bytes: int) -> str:
    """Start a cluster keeping its state in ``folder``; the path of its ceph.conf."""
    env = subprocess.run(
        [str(ROOT / "scripts" / "ceph.sh"), "start", str(folder)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "SNAPBACK_CEPH_MEMSTORE_BYTES": str(memstore_bytes)},
    ).stdout
    return dict(line.split("=", 1) for line in env.splitlines() if "=" in line)["CEPH_CONF"]


def stop(folder: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "ceph.sh"), "stop", str(folder)], check=False)

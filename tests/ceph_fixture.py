"""A throwaway Ceph cluster for tests (scripts/ceph.sh; see docs/ceph.md).

Loaded by the main conftest with ``pytest_plugins = ["tests.ceph_fixture"]``
(or ``pytest -p tests.ceph_fixture``).

- ``ceph_cluster``: one mon and one memstore OSD on 127.0.0.1 with pools
  ``rbd`` and ``images``, started once per session (~0.4 s) and only when a
  test asks for it; stopped and its folder removed at session end, also when
  tests or the start itself failed.
- ``ceph_s3``: radosgw on that same cluster, added the first time a test asks
  for it (~0.4-0.8 s more), so sessions without S3 tests never pay for it.

Data lives in the OSD's RAM (memstore, capped at 4 GiB): keep images and
objects small, and give them unique names, since every test of the session
shares the cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ceph.sh"
START_TIMEOUT = 400  # the script bounds each step itself; this is a last resort
STOP_TIMEOUT = 120


@dataclass(frozen=True)
class CephCluster:
    dir: Path
    conf: Path
    mon_port: int
    pools: tuple[str, ...] = ("rbd", "images")

    @property
    def env(self) -> dict[str, str]:
        """For subprocesses: the ceph, rbd and rados CLIs read CEPH_CONF."""
        return {"CEPH_CONF": str(self.conf)}


@dataclass(frozen=True)
class CephS3:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    cluster: CephCluster


def _ceph_sh(*args: str) -> dict[str, str]:
    """Run scripts/ceph.sh; return the KEY=VALUE lines it prints."""
    try:
        proc = subprocess.run(
            [str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"scripts/ceph.sh {' '.join(args)}: no answer in {e.timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/ceph.sh {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stderr}{proc.stdout}"
        )
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key] = value
    return env


def _stop(folder: Path) -> None:
    proc = subprocess.run(
        [str(SCRIPT), "stop", str(folder)],
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        # Daemons are gone or reported; the folder must not pile up either way.
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"scripts/ceph.sh stop {folder} failed:\n{proc.stderr}")


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """A running cluster (mon + memstore OSD, pools rbd and images) for the session."""
    # /var/tmp rather than pytest's 0700 tmp: the qemu user may need ceph.conf.
    folder = Path(tempfile.mkdtemp(prefix="snapback-ceph-", dir="/var/tmp"))
    try:
        env = _ceph_sh("start", str(folder))
        yield CephCluster(
            dir=folder,
            conf=Path(env["CEPH_CONF"]),
            mon_port=int(env["CEPH_MON_PORT"]),
        )
    finally:
        _stop(folder)


@pytest.fixture(scope="session")
def ceph_s3(ceph_cluster: CephCluster) -> CephS3:
    """radosgw (S3) on the session's cluster, with a user of fixed keys."""
    env = _ceph_sh("start", str(ceph_cluster.dir), "--rgw")
    return CephS3(
        endpoint=env["S3_ENDPOINT"],
        access_key=env["S3_ACCESS_KEY"],
        secret_key=env["S3_SECRET_KEY"],
        cluster=ceph_cluster,
    )

"""``snapback tour``: the main job on embedded defaults."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from snapback.cli.output import FORMAT_OPTION, emit
from snapback.config import load_settings
from snapback.domain.errors import StorageError
from snapback.services.context import Context

CEPH_SH = Path(__file__).resolve().parents[3] / "scripts" / "ceph.sh"


@contextlib.contextmanager
def throwaway_ceph() -> Iterator[str]:
    """A one-node cluster from scripts/ceph.sh for the tour; yields its ceph.conf."""
    if not CEPH_SH.is_file():
        raise StorageError(f"{CEPH_SH} is missing: --pool rbd needs the project's scripts")
    folder = tempfile.mkdtemp(prefix="snapback-tour-ceph-", dir="/var/tmp")
    try:
        proc = subprocess.run(
            [str(CEPH_SH), "start", folder], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise StorageError(f"could not start a Ceph cluster: {proc.stderr.strip()}")
        env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        yield env["CEPH_CONF"]
    finally:
        subprocess.run([str(CEPH_SH), "stop", folder], capture_output=True, timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


@click.command()
@click.option("--keep", is_flag=True, help="Keep the tour's state folder and print its path.")
@click.option(
    "--pool",
    "driver",
    type=click.Choice(["local", "rbd"]),
    default="local",
    show_default=True,
    help="rbd: run the tour on a throwaway Ceph cluster (scripts/ceph.sh), "
    "volumes and images as RBD images.",
)
@FORMAT_OPTION
def tour(keep: bool, driver: str, fmt: str) -> None:
    """A scripted tour in a fresh state folder: volume, snapshot, protect, clone,
    flatten, rollback, export, image upload, delete, gc."""
    from snapback.services.tour import Tour, TourStep

    home = tempfile.mkdtemp(prefix="snapback-tour-")
    try:
        with throwaway_ceph() if driver == "rbd" else contextlib.nullcontext("") as conf:
            if conf:
                Path(home, "snapback.toml").write_text(
                    f'[pools.default]\ndriver = "rbd"\nconf = "{conf}"\npool = "rbd"\n'
                    f'[pools.images]\ndriver = "rbd"\nconf = "{conf}"\npool = "images"\n'
                )

            def show(step: TourStep) -> None:
                if fmt == "text":
                    click.echo(f"{step.seconds:8.3f}s  {step.action}\n           -> {step.result}")

            steps = Tour(Context(load_settings(home))).run(show)
        if fmt == "json":
            emit(fmt, {"home": home if keep else None, "pool": driver, "steps": steps})
        elif keep:
            click.echo(f"state kept in {home}")
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)

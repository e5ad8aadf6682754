"""``snapback snapshot ...``"""

from __future__ import annotations

import time

import click

from snapback.cli.main import context
from snapback.cli.output import FORMAT_OPTION, emit, fields, human_size, table
from snapback.cli.volumes import POOL_OPTION
from snapback.domain.names import parse_snapshot_ref, validate_name
from snapback.services.snapshots import SnapshotService
from snapback.services.views import SnapshotView


def service() -> SnapshotService:
    return SnapshotService(context(click.get_current_context()))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def snapshot_text(s: SnapshotView) -> str:
    return fields(
        {
            "snapshot": f"{s.volume}@{s.name}",
            "id": s.id,
            "pool": s.pool,
            "size": human_size(s.size),
            "protected": s.protected,
            "status": s.status,
            "created": _when(s.created_at),
            "children": s.children,
        }
    )


@click.group()
def snapshot() -> None:
    """Volume snapshots, written VOLUME@SNAPSHOT."""


@snapshot.command("create")
@click.argument("ref")
@POOL_OPTION
@FORMAT_OPTION
def create(ref: str, pool: str | None, fmt: str) -> None:
    """Take a snapshot (no data is copied)."""
    emit(fmt, service().create(parse_snapshot_ref(ref), pool), snapshot_text)


@snapshot.command("list")
@click.argument("volume")
@POOL_OPTION
@FORMAT_OPTION
def list_(volume: str, pool: str | None, fmt: str) -> None:
    """List the snapshots of a volume, oldest first."""
    snaps = service().list_snapshots(validate_name(volume, "volume name"), pool)
    emit(
        fmt,
        snaps,
        lambda ss: table(
            [
                {
                    "name": s.name,
                    "size": human_size(s.size),
                    "protected": s.protected,
                    "status": s.status,
                    "created": _when(s.created_at),
                    "children": s.children,
                }
                for s in ss
            ],
            ["name", "size", "protected", "status", "created", "children"],
        ),
    )


@snapshot.command("show")
@click.argument("ref")
@POOL_OPTION
@FORMAT_OPTION
def show(ref: str, pool: str | None, fmt: str) -> None:
    """Show one snapshot."""
    emit(fmt, service().show(parse_snapshot_ref(ref), pool), snapshot_text)


@snapshot.command("rollback")
@click.argument("ref")
@POOL_OPTION
@FORMAT_OPTION
def rollback(ref: str, pool: str | None, fmt: str) -> None:
    """Make the volume read exactly what it held at the snapshot (later writes are lost)."""
    emit(fmt, service().rollback(parse_snapshot_ref(ref), pool), snapshot_text)


@snapshot.command("delete")
@click.argument("ref")
@click.option("--defer", is_flag=True, help="If clones depend on it, delete it once they are gone.")
@POOL_OPTION
@FORMAT_OPTION
def delete(ref: str, defer: bool, pool: str | None, fmt: str) -> None:
    """Delete a snapshot (refused while protected)."""
    result = service().delete(parse_snapshot_ref(ref), pool, defer=defer)
    emit(fmt, {"snapshot": ref, "result": result}, lambda r: f"{ref}: {result}")


@snapshot.command("protect")
@click.argument("ref")
@POOL_OPTION
@FORMAT_OPTION
def protect(ref: str, pool: str | None, fmt: str) -> None:
    """Protect a snapshot: it cannot be deleted, and it can be cloned."""
    emit(fmt, service().set_protected(parse_snapshot_ref(ref), True, pool), snapshot_text)


@snapshot.command("unprotect")
@click.argument("ref")
@POOL_OPTION
@FORMAT_OPTION
def unprotect(ref: str, pool: str | None, fmt: str) -> None:
    """Unprotect a snapshot (refused while it has clones)."""
    emit(fmt, service().set_protected(parse_snapshot_ref(ref), False, pool), snapshot_text)

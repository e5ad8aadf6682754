"""What services hand back: plain frozen records the CLI prints or serialises."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class VolumeView:
    id: str
    name: str
    pool: str
    size: int
    allocated: int
    status: str
    kind: str
    read_only: bool
    parent: str | None
    snapshots: list[str]
    created_at: float
    layout: dict[str, int | None] | None = None  # rbd: object_size, stripe_unit, stripe_count


@dataclass(frozen=True)
class SnapshotView:
    id: str
    volume: str
    pool: str
    name: str
    protected: bool
    status: str
    size: int
    created_at: float
    children: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageView:
    id: str
    name: str
    status: str
    disk_format: str
    size: int | None
    virtual_size: int | None
    checksum: str | None
    protected: bool
    properties: dict[str, str]
    volume: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class InstanceView:
    id: str
    name: str
    status: str  # what the catalogue says
    domain: str
    domain_state: str  # what libvirt says
    in_sync: bool  # False when the two disagree
    image: str | None
    memory_mib: int
    vcpus: int
    disks: dict[str, str]
    console: str
    created_at: float


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    recovered: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    debris: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def to_dict(view: Any) -> dict[str, Any]:
    return asdict(view)

"""Catalogue tables. Keep the SQL portable: SQLite now, PostgreSQL later."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


LIVE_VOLUME = text("status IN ('creating', 'available')")


class Volume(Base):
    """A volume known to snapback; ``storage_name`` is its name inside the pool."""

    __tablename__ = "volumes"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    pool: Mapped[str] = mapped_column(String(128))
    storage_name: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16), default="volume")  # volume | image
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)
    # the snapshot a clone was made from (no FK: volumes and snapshots refer to each other)
    parent_snapshot_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)

    snapshots: Mapped[list[Snapshot]] = relationship(
        back_populates="volume", foreign_keys="Snapshot.volume_id"
    )

    __table_args__ = (
        Index(
            "uq_volumes_live_name",
            "pool",
            "name",
            unique=True,
            sqlite_where=LIVE_VOLUME,
            postgresql_where=LIVE_VOLUME,
        ),
        Index("uq_volumes_storage_name", "pool", "storage_name", unique=True),
    )


LIVE_SNAPSHOT = text("status = 'available'")


class Snapshot(Base):
    __tablename__ = "snapshots"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"))
    name: Mapped[str] = mapped_column(String(128))
    storage_name: Mapped[str] = mapped_column(String(128))
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)

    volume: Mapped[Volume] = relationship(back_populates="snapshots", foreign_keys=[volume_id])

    __table_args__ = (
        Index(
            "uq_snapshots_live_name",
            "volume_id",
            "name",
            unique=True,
            sqlite_where=LIVE_SNAPSHOT,
            postgresql_where=LIVE_SNAPSHOT,
        ),
    )


class Image(Base):
    """A glance-like image: an immutable template volume with properties and a checksum."""

    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32))
    disk_format: Mapped[str] = mapped_column(String(16))
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # bytes uploaded
    virtual_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checksum: Mapped[str | None] = mapped_column(String(64), nullable=True)  # sha256 hex
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    volume_id: Mapped[str | None] = mapped_column(ForeignKey("volumes.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)

    properties: Mapped[list[ImageProperty]] = relationship(
        back_populates="image", cascade="all, delete-orphan", order_by="ImageProperty.key"
    )


class ImageProperty(Base):
    __tablename__ = "image_properties"
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)

    image: Mapped[Image] = relationship(back_populates="properties")


class Operation(Base):
    """A multi-step operation's journal head (DESIGN §4.3)."""

    __tablename__ = "operations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)

    steps: Mapped[list[OperationStep]] = relationship(
        back_populates="operation", order_by="OperationStep.seq", cascade="all, delete-orphan"
    )

    __table_args__ = (Index("ix_operations_status", "status"),)


class OperationStep(Base):
    __tablename__ = "operation_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    operation_id: Mapped[str] = mapped_column(ForeignKey("operations.id"))
    seq: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    data: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    at: Mapped[float] = mapped_column(Float, default=time.time)

    operation: Mapped[Operation] = relationship(back_populates="steps")


LIVE_INSTANCE = text("status != 'deleted'")


class Instance(Base):
    """A virtual machine: a libvirt domain whose disks are volumes."""

    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32))
    domain_name: Mapped[str] = mapped_column(String(128), unique=True)
    image_id: Mapped[str | None] = mapped_column(ForeignKey("images.id"), nullable=True)
    memory_mib: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer)
    # its own boot files (a restore without the base image); None: the image's properties
    kernel_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    ramdisk_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    os_command_line: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)

    disks: Mapped[list[InstanceDisk]] = relationship(
        back_populates="instance", cascade="all, delete-orphan", order_by="InstanceDisk.target"
    )

    __table_args__ = (
        Index(
            "uq_instances_live_name",
            "name",
            unique=True,
            sqlite_where=LIVE_INSTANCE,
            postgresql_where=LIVE_INSTANCE,
        ),
    )


class InstanceDisk(Base):
    """A volume attached to an instance as ``target`` (vda is the root disk)."""

    __tablename__ = "instance_disks"
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), primary_key=True)
    target: Mapped[str] = mapped_column(String(16), primary_key=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"))
    root: Mapped[bool] = mapped_column(Boolean, default=False)

    instance: Mapped[Instance] = relationship(back_populates="disks")


class BackupEntry(Base):
    """A backup known to be in a repository: a cache of its record, rebuilt from the
    repository alone by ``repo rebuild-catalog`` (the repository is the truth)."""

    __tablename__ = "backup_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backup_id: Mapped[str] = mapped_column(String(64))
    repo_location: Mapped[str] = mapped_column(String(1024))  # folder: absolute path
    repo_id: Mapped[str] = mapped_column(String(64))  # the repository's config id
    kind: Mapped[str] = mapped_column(String(16))  # volume | instance
    source_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    source_pool: Mapped[str | None] = mapped_column(String(128), nullable=True)
    source_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # volume/instance
    created_at: Mapped[float] = mapped_column(Float)
    parent_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    summary: Mapped[str] = mapped_column(Text, default="{}")  # JSON: sizes and stats
    recorded_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)

    __table_args__ = (
        Index("uq_backup_entries_location_backup", "repo_location", "backup_id", unique=True),
        Index("ix_backup_entries_source", "repo_location", "source_id", "created_at"),
    )

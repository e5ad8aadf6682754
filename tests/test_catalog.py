"""The catalogue schema: migrations reach the head the code expects."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from snapback.catalog.db import HEAD_REVISION, MIGRATIONS, current_revision, open_engine


def test_head_revision_constant_matches_migrations() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def test_fresh_catalogue_is_migrated_and_in_wal_mode(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'c.db'}")
    assert current_revision(engine) == HEAD_REVISION
    tables = set(inspect(engine).get_table_names())
    assert {
        "volumes",
        "snapshots",
        "images",
        "image_properties",
        "operations",
        "operation_steps",
        "instances",
        "instance_disks",
    } <= tables
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine2 = open_engine(f"sqlite:///{tmp_path / 'c.db'}")  # a second open is a no-op
    assert current_revision(engine2) == HEAD_REVISION

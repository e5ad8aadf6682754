"""Alembic environment: run with the connection snapback hands over."""

from __future__ import annotations

from alembic import context

from snapback.catalog.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only when run by the alembic CLI
    raise SystemExit("run migrations through snapback.catalog.db.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

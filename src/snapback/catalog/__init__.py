"""The catalogue: SQLAlchemy models and Alembic migrations (SQLite by default, PostgreSQL-ready)."""

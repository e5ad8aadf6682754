"""Backup repositories: content-addressed, write-once objects (docs/repository-format.md)."""

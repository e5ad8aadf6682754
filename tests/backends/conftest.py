"""Backends for the repository backend contract suite: every backend gets the same tests.

``s3`` runs against the session's real radosgw (tests/ceph_fixture.py): each
test gets a bucket of its own, under a prefix so that prefix handling is
exercised too, and the bucket is emptied and removed afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapback.repository.backends import Backend
from snapback.repository.backends.local import LocalBackend


def new_s3_backend(request: pytest.FixtureRequest, prefix: str = "", **options: Any) -> Backend:
    """An S3Backend on a fresh bucket of the session's radosgw; removed at the test's end."""
    from snapback.repository.backends.s3 import S3Backend

    s3 = request.getfixturevalue("ceph_s3")
    bucket = f"sb-test-{uuid.uuid4().hex[:16]}"
    backend = S3Backend(
        s3.endpoint,
        bucket,
        prefix,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        **options,
    )
    assert backend.ensure_bucket() is True
    request.addfinalizer(lambda: remove_bucket(backend))
    return backend


def remove_bucket(backend: Any) -> None:
    """Empty and delete a test bucket (memstore keeps every byte in RAM)."""
    client, bucket = backend._client, backend.bucket
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield LocalBackend(tmp_path / "repo")
        return
    if request.param == "s3":
        yield new_s3_backend(request, prefix="repo")
        return
    raise AssertionError(request.param)

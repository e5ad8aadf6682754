"""The throwaway Ceph cluster of tests/ceph_fixture.py does what drivers need.

Real mon, OSD and radosgw; the fixtures come from ``tests.ceph_fixture``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import urllib.request
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from urllib.parse import urlsplit

import pytest
import rados
import rbd

from tests.ceph_fixture import CephCluster, CephS3

MIB = 1 << 20


def connect(cluster: CephCluster, **conf: str) -> rados.Rados:
    r = rados.Rados(conffile=str(cluster.conf), conf=conf)
    r.connect(timeout=10)
    return r


@pytest.fixture
def ioctx(ceph_cluster: CephCluster) -> Iterator[rados.Ioctx]:
    r = connect(ceph_cluster)
    io = r.open_ioctx("rbd")
    yield io
    io.close()
    r.shutdown()


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_pools_exist_and_objects_round_trip(ceph_cluster: CephCluster) -> None:
    r = connect(ceph_cluster)
    try:
        assert ceph_cluster.pools == ("rbd", "images")
        for pool in ceph_cluster.pools:
            assert r.pool_exists(pool)
            with r.open_ioctx(pool) as io:
                obj = name("obj")
                io.write_full(obj, b"payload")
                assert io.read(obj) == b"payload"
                io.remove_object(obj)
    finally:
        r.shutdown()


def test_rbd_image_write_read_snapshot_and_v1_clone(ceph_cluster: CephCluster) -> None:
    # Format 1 chosen for this connection: a v1 clone needs a protected snapshot.
    r = connect(ceph_cluster, rbd_default_clone_format="1")
    io = r.open_ioctx("rbd")
    images = r.open_ioctx("images")
    parent, child = name("parent"), name("child")
    try:
        rbd.RBD().create(io, parent, 64 * MIB)
        with rbd.Image(io, parent) as img:
            img.write(b"A" * 4096, 0)
            img.write(b"B" * 4096, 32 * MIB)
            assert img.read(0, 4096) == b"A" * 4096
            assert img.read(32 * MIB, 4096) == b"B" * 4096
            img.create_snap("s1")
            img.write(b"C" * 4096, 0)  # after the snapshot: not in the clone
            with pytest.raises(rbd.InvalidArgument):  # v1 from an unprotected snapshot
                rbd.RBD().clone(io, parent, "s1", images, child)
            img.protect_snap("s1")
            assert img.is_protected_snap("s1")

        rbd.RBD().clone(io, parent, "s1", images, child)
        with rbd.Image(images, child) as c:
            assert c.parent_info() == ("rbd", parent, "s1")
            assert not c.op_features() & rbd.RBD_OPERATION_FEATURE_CLONE_CHILD  # v1
            assert c.read(0, 4096) == b"A" * 4096
            assert c.read(32 * MIB, 4096) == b"B" * 4096
            c.write(b"D" * 4096, 0)
            assert c.read(0, 4096) == b"D" * 4096

        with rbd.Image(io, parent) as img:
            assert img.read(0, 4096) == b"C" * 4096
            with pytest.raises(rbd.ImageBusy):  # it has a clone
                img.unprotect_snap("s1")
            children = [(d["pool"], d["image"]) for d in img.list_children2()]
            assert children == [("images", child)]

        rbd.RBD().remove(images, child)
        with rbd.Image(io, parent) as img:
            img.unprotect_snap("s1")
            img.remove_snap("s1")
        rbd.RBD().remove(io, parent)
        assert parent not in rbd.RBD().list(io)
    finally:
        images.close()
        io.close()
        r.shutdown()


def test_v2_clone_of_an_unprotected_snapshot_per_connection(ceph_cluster: CephCluster) -> None:
    r = connect(ceph_cluster, rbd_default_clone_format="2")
    io = r.open_ioctx("rbd")
    parent, child = name("parent"), name("child")
    try:
        rbd.RBD().create(io, parent, 16 * MIB)
        with rbd.Image(io, parent) as img:
            img.write(b"v2" * 2048, 0)
            img.create_snap("s")
        rbd.RBD().clone(io, parent, "s", io, child)
        with rbd.Image(io, child) as c:
            assert c.op_features() & rbd.RBD_OPERATION_FEATURE_CLONE_CHILD
            assert c.read(0, 4096) == b"v2" * 2048
        rbd.RBD().remove(io, child)
        with rbd.Image(io, parent) as img:
            img.remove_snap("s")
        rbd.RBD().remove(io, parent)
    finally:
        io.close()
        r.shutdown()


def test_missing_image_is_image_not_found(ioctx: rados.Ioctx) -> None:
    with pytest.raises(rbd.ImageNotFound):
        rbd.Image(ioctx, name("missing"))


def s3_request(s3: CephS3, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One S3 request signed with AWS signature v2 (no boto3 needed)."""
    date = formatdate(usegmt=True)
    to_sign = f"{method}\n\n\n{date}\n{path}".encode()
    sig = base64.b64encode(hmac.new(s3.secret_key.encode(), to_sign, hashlib.sha1).digest())
    url = urlsplit(s3.endpoint)
    conn = http.client.HTTPConnection(url.netloc, timeout=10)
    try:
        conn.request(
            method,
            path,
            body=body,
            headers={"Date": date, "Authorization": f"AWS {s3.access_key}:{sig.decode()}"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_s3_gateway_answers_and_its_keys_work(ceph_s3: CephS3) -> None:
    with urllib.request.urlopen(ceph_s3.endpoint + "/", timeout=10) as resp:
        assert resp.status == 200
        assert b"ListAllMyBucketsResult" in resp.read()

    bucket = name("bucket")
    assert s3_request(ceph_s3, "PUT", f"/{bucket}")[0] == 200
    assert s3_request(ceph_s3, "PUT", f"/{bucket}/key", b"hello s3")[0] == 200
    assert s3_request(ceph_s3, "GET", f"/{bucket}/key") == (200, b"hello s3")
    status, listing = s3_request(ceph_s3, "GET", f"/{bucket}")
    assert status == 200 and b"<Key>key</Key>" in listing
    assert s3_request(ceph_s3, "DELETE", f"/{bucket}/key")[0] == 204
    assert s3_request(ceph_s3, "GET", f"/{bucket}/key")[0] == 404
    assert s3_request(ceph_s3, "DELETE", f"/{bucket}")[0] == 204

    bad = CephS3(ceph_s3.endpoint, ceph_s3.access_key, "wrong", ceph_s3.cluster)
    assert s3_request(bad, "GET", "/")[0] == 403

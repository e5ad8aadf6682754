"""S3Backend against the session's real radosgw: what the contract suite cannot show.

Faults are real: a small TCP proxy on 127.0.0.1 sits between the backend and
the gateway and cuts, drops, corrupts or stalls one connection at a time.
Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from snapback.domain.errors import InvalidInput, NotFound
from snapback.repository.backends import BackendError
from snapback.repository.backends import s3 as s3mod
from snapback.repository.backends.s3 import S3Backend
from tests.backends.conftest import new_s3_backend
from tests.ceph_fixture import CephS3

MIB = 1 << 20


def _data(size: int, seed: int = 0) -> bytes:
    """Incompressible, distinct bytes."""
    out = bytearray()
    block = seed.to_bytes(8, "big")
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def _s3_backend(request: pytest.FixtureRequest, prefix: str = "", **options: Any) -> S3Backend:
    backend = new_s3_backend(request, prefix, **options)
    assert isinstance(backend, S3Backend)
    return backend


class FaultProxy:
    """A TCP proxy in front of radosgw; each accepted connection follows the next plan.

    Plans: ``("pass",)``; ``("cut", n)``: forward the first ``n`` request
    bytes, then close both sides (an upload cut off mid-body);
    ``("drop_response",)``: forward the whole request and let the server
    answer, then close the client's side without its final answer (the write
    happened, the client never heard); ``("flip", offset)``: invert the
    request byte at ``offset`` (a corruption in transit); ``("cut_answer", n)``:
    relay the first ``n`` bytes of the server's answers, then close both sides
    (a download cut off); ``("hang",)``: accept and never answer.
    Connections beyond the plans pass.
    """

    def __init__(self, s3: CephS3) -> None:
        self.s3 = s3
        host, port = s3.endpoint.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.plans: list[tuple[Any, ...]] = []
        self.accepted = 0
        self.forwarded: list[int] = []  # request bytes forwarded, per connection
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                plan = self.plans[self.accepted] if self.accepted < len(self.plans) else ("pass",)
                index = self.accepted
                self.accepted += 1
                self.forwarded.append(0)
                self._sockets.append(client)
            if plan[0] == "hang":
                continue  # keep the socket open, read nothing, answer nothing
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets.append(upstream)
            threading.Thread(
                target=self._requests, args=(client, upstream, plan, index), daemon=True
            ).start()
            threading.Thread(
                target=self._answers, args=(upstream, client, plan), daemon=True
            ).start()

    @staticmethod
    def _kill(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _requests(
        self, client: socket.socket, upstream: socket.socket, plan: tuple[Any, ...], index: int
    ) -> None:
        sent = 0
        try:
            while chunk := client.recv(65536):
                if plan[0] == "cut" and sent + len(chunk) >= plan[1]:
                    upstream.sendall(chunk[: plan[1] - sent])
                    self.forwarded[index] = plan[1]
                    self._kill(client, upstream)
                    return
                if plan[0] == "flip" and sent <= plan[1] < sent + len(chunk):
                    at = plan[1] - sent
                    chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
                upstream.sendall(chunk)
                sent += len(chunk)
                self.forwarded[index] = sent
        except OSError:
            pass
        self._kill(client, upstream)

    def _answers(
        self, upstream: socket.socket, client: socket.socket, plan: tuple[Any, ...]
    ) -> None:
        pending = b""
        relayed = 0
        try:
            while chunk := upstream.recv(65536):
                if plan[0] == "cut_answer" and relayed + len(chunk) >= plan[1]:
                    client.sendall(chunk[: plan[1] - relayed])
                    break
                relayed += len(chunk)
                if plan[0] != "drop_response":
                    client.sendall(chunk)
                    continue
                pending += chunk
                # Pass "100 Continue" interim answers; drop the final one.
                while pending.startswith(b"HTTP/1.1 100") and b"\r\n\r\n" in pending:
                    end = pending.index(b"\r\n\r\n") + 4
                    client.sendall(pending[:end])
                    pending = pending[end:]
                if len(pending) >= 12 and not pending.startswith(b"HTTP/1.1 100"):
                    break  # the server's final answer: the client never gets it
        except OSError:
            pass
        self._kill(client, upstream)


@pytest.fixture
def proxy(ceph_s3: CephS3) -> Iterator[FaultProxy]:
    p = FaultProxy(ceph_s3)
    yield p
    p.close()


def _twin(backend: S3Backend, proxy: FaultProxy, **options: Any) -> S3Backend:
    """The same bucket and prefix reached through the proxy (a client of its own)."""
    return S3Backend(
        proxy.endpoint,
        backend.bucket,
        backend.prefix,
        access_key=proxy.s3.access_key,
        secret_key=proxy.s3.secret_key,
        **options,
    )


class Watcher:
    """Polls one key directly at the gateway while a test runs; records every answer."""

    def __init__(self, backend: S3Backend, key: str) -> None:
        self.backend, self.key = backend, key
        self.seen: list[int | None] = []  # size seen, None when missing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            info = self.backend.stat(self.key)
            self.seen.append(None if info is None else info.size)
            time.sleep(0.002)

    def stop(self) -> list[int | None]:
        """Stop polling, then look once more: a poll sent before the watched call
        returned may answer after it (seen under load), so the last word is this one."""
        self._stop.set()
        self._thread.join()
        info = self.backend.stat(self.key)
        self.seen.append(None if info is None else info.size)
        return self.seen


# -- (1) a corrupted upload is refused -----------------------------------------

S3_MD5_OF_OTHER = s3mod._content_md5(b"other bytes")


def test_body_not_matching_content_md5_is_refused(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _s3_backend(request)
    assert backend.put("chunks/aa/kept", b"first version")
    # A real PUT whose Content-MD5 is that of other bytes: the gateway checks it.
    monkeypatch.setattr(s3mod, "_content_md5", lambda data: S3_MD5_OF_OTHER)
    with pytest.raises(
        BackendError, match=r"BadDigest\), so it was corrupted on the way; nothing was stored"
    ):
        backend.put("chunks/aa/new", b"some bytes")
    with pytest.raises(BackendError, match="BadDigest"):
        backend.put("chunks/aa/kept", b"second version", overwrite=True)
    monkeypatch.undo()
    assert backend.stat("chunks/aa/new") is None
    assert backend.get("chunks/aa/kept") == b"first version"
    assert [o.key for o in backend.list_objects()] == ["chunks/aa/kept"]


def test_body_corrupted_in_transit_is_refused(
    request: pytest.FixtureRequest, proxy: FaultProxy
) -> None:
    direct = _s3_backend(request)
    via = _twin(direct, proxy)
    data = _data(1 * MIB)
    proxy.plans = [("flip", 64 * 1024)]  # a byte of the body, past the headers
    with pytest.raises(BackendError, match="corrupted on the way") as caught:
        via.put("chunks/bb/x", data)
    assert proxy.forwarded[0] > 64 * 1024
    assert direct.stat("chunks/bb/x") is None
    assert via.put("chunks/bb/x", data) is True  # the next, clean, connection works
    assert direct.get("chunks/bb/x") == data
    print("in-transit corruption refused with:", caught.value)


# -- (2) listing more than 1000 keys ---------------------------------------------


def test_listing_paginates_past_1000_keys(request: pytest.FixtureRequest) -> None:
    backend = _s3_backend(request, prefix="big")
    keys = [f"chunks/{i % 16:02x}/{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda k: backend.put(k, k.encode()), keys))
    backend.put("config", b"{}")
    pages = []
    backend._client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kw: pages.append(kw["params"])
    )
    listed = list(backend.list_objects("chunks/"))
    assert sorted(o.key for o in listed) == sorted(keys)
    assert all(o.size == len(o.key) for o in listed)
    assert len(pages) == 2  # 1000 + 100: the second page was asked for
    assert len(list(backend.list_objects(""))) == 1101
    assert sorted(o.key for o in backend.list_objects("chunks/0a/")) == [
        k for k in keys if k.startswith("chunks/0a/")
    ]


# -- (3) bad credentials ------------------------------------------------------------


def test_wrong_keys_say_access_denied(request: pytest.FixtureRequest, ceph_s3: CephS3) -> None:
    good = _s3_backend(request)
    good.put("config", b"x")
    wrong_secret = S3Backend(
        ceph_s3.endpoint, good.bucket, access_key=ceph_s3.access_key, secret_key="not-the-secret"
    )
    for call in (
        lambda: wrong_secret.put("config2", b"y"),
        lambda: wrong_secret.get("config"),
        lambda: wrong_secret.stat("config"),  # HEAD: a bare 403, no error code
        lambda: list(wrong_secret.list_objects()),
        lambda: wrong_secret.touch("config"),
        lambda: wrong_secret.delete("config"),
    ):
        with pytest.raises(BackendError, match="access denied") as caught:
            call()
        assert caught.value.__cause__ is not None
    with pytest.raises(BackendError, match="secret key does not match"):
        wrong_secret.get("config")
    unknown = S3Backend(
        ceph_s3.endpoint, good.bucket, access_key="nobody", secret_key=ceph_s3.secret_key
    )
    with pytest.raises(BackendError, match=r"access denied.*does not know this access key"):
        unknown.get("config")
    assert good.get("config") == b"x" and good.stat("config2") is None


# -- (4) an endpoint that is not there, or does not answer -------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_endpoint_fails_fast() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    backend = S3Backend(endpoint, "bucket", access_key="a", secret_key="b")
    for call in (
        lambda: backend.put("config", b"x"),
        lambda: backend.get("config"),
        lambda: backend.stat("config"),
        lambda: list(backend.list_objects()),
        lambda: backend.ensure_bucket(),
    ):
        start = time.monotonic()
        with pytest.raises(BackendError, match=f"cannot reach the S3 endpoint {endpoint}"):
            call()
        assert time.monotonic() - start < 5


def test_silent_endpoint_times_out(request: pytest.FixtureRequest, proxy: FaultProxy) -> None:
    direct = _s3_backend(request)
    via = _twin(direct, proxy, read_timeout=1.0, max_attempts=2)
    proxy.plans = [("hang",), ("hang",)]
    start = time.monotonic()
    with pytest.raises(BackendError, match="stopped answering"):
        via.stat("config")
    assert time.monotonic() - start < 5
    assert proxy.accepted == 2  # tried twice


def test_missing_bucket_is_named(ceph_s3: CephS3) -> None:
    backend = S3Backend(
        ceph_s3.endpoint,
        "sb-test-no-such-bucket",
        access_key=ceph_s3.access_key,
        secret_key=ceph_s3.secret_key,
    )
    for call in (
        lambda: backend.put("config", b"x"),
        lambda: backend.get("config"),
        lambda: list(backend.list_objects()),
        lambda: backend.touch("config"),
    ):
        with pytest.raises(BackendError, match="bucket 'sb-test-no-such-bucket' does not exist"):
            call()


# -- (5) an upload cut off mid-way ---------------------------------------------------


def test_upload_cut_mid_body_leaves_nothing_and_retry_stores_whole(
    request: pytest.FixtureRequest, proxy: FaultProxy
) -> None:
    direct = _s3_backend(request)
    via = _twin(direct, proxy, max_attempts=1)  # no retry: see the cut itself
    data = _data(4 * MIB, seed=5)
    proxy.plans = [("cut", 1 * MIB)]
    watcher = Watcher(direct, "chunks/cc/cut")
    with pytest.raises(BackendError, match=r"connection to the S3 endpoint .* broke"):
        via.put("chunks/cc/cut", data)
    assert proxy.forwarded[0] == 1 * MIB  # the gateway got a quarter of the body
    time.sleep(0.3)  # give the gateway time to (not) publish anything
    assert direct.stat("chunks/cc/cut") is None
    assert list(direct.list_objects()) == []
    with pytest.raises(NotFound):
        direct.get("chunks/cc/cut")

    assert via.put("chunks/cc/cut", data) is True  # the same put again, on a new connection
    seen = watcher.stop()
    assert direct.get("chunks/cc/cut") == data
    assert set(seen) <= {None, len(data)}  # never a partial object
    assert None in seen and seen[-1] == len(data)


def test_cut_upload_is_retried_by_the_client(
    request: pytest.FixtureRequest, proxy: FaultProxy
) -> None:
    direct = _s3_backend(request)
    via = _twin(direct, proxy)  # default retries
    data = _data(4 * MIB, seed=6)
    proxy.plans = [("cut", 2 * MIB)]
    assert via.put("chunks/dd/cut", data) is True  # one call: botocore retried on a new connection
    assert proxy.accepted == 2
    assert direct.get("chunks/dd/cut") == data


def test_lost_answer_to_a_stored_put_still_counts_as_written(
    request: pytest.FixtureRequest, proxy: FaultProxy
) -> None:
    """The gateway stored the object but its answer was lost; botocore's retry
    then meets the object (412): the put is ours, so it returns True, not False."""
    direct = _s3_backend(request)
    via = _twin(direct, proxy)
    data = _data(1 * MIB, seed=7)
    proxy.plans = [("drop_response",)]
    assert via.put("backups/b1", data) is True
    assert proxy.accepted == 2
    assert direct.get("backups/b1") == data
    # Someone else's bytes under the key still make it a refusal. (A new client:
    # the first one would reuse its pooled connection, which the proxy passes.)
    proxy.plans = [("pass",)] * proxy.accepted + [("drop_response",)]
    assert _twin(direct, proxy).put("backups/b1", _data(1 * MIB, seed=8)) is False
    assert proxy.accepted == 4
    assert direct.get("backups/b1") == data


def test_download_cut_mid_body_is_read_again(
    request: pytest.FixtureRequest, proxy: FaultProxy
) -> None:
    direct = _s3_backend(request)
    data = _data(4 * MIB, seed=10)
    direct.put("chunks/ff/x", data)
    via = _twin(direct, proxy)
    proxy.plans = [("cut_answer", 1 * MIB)]
    assert via.get("chunks/ff/x") == data  # botocore does not retry a body; get does
    assert proxy.accepted == 2
    proxy.plans = [("pass",)] * proxy.accepted + [("cut_answer", 1 * MIB)] * 3
    with pytest.raises(BackendError, match=r"connection to the S3 endpoint .* broke"):
        _twin(direct, proxy).get("chunks/ff/x")  # a fresh client: a fresh connection
    assert proxy.accepted == 5


# -- the rest of the S3 surface --------------------------------------------------------


def test_prefix_namespaces_keys(request: pytest.FixtureRequest, ceph_s3: CephS3) -> None:
    root = _s3_backend(request)

    def at(prefix: str) -> S3Backend:
        return S3Backend(
            ceph_s3.endpoint,
            root.bucket,
            prefix,
            access_key=ceph_s3.access_key,
            secret_key=ceph_s3.secret_key,
        )

    a, b = at("repos/a"), at("/repos/b/")
    assert a.put("config", b"a") and b.put("config", b"b")
    assert a.get("config") == b"a" and b.get("config") == b"b"
    assert [o.key for o in a.list_objects()] == ["config"]
    assert sorted(o.key for o in root.list_objects("repos/")) == [
        "repos/a/config",
        "repos/b/config",
    ]
    assert a.url == f"s3://{root.bucket}/repos/a?endpoint={ceph_s3.endpoint}"
    assert root.url == f"s3://{root.bucket}?endpoint={ceph_s3.endpoint}"
    with pytest.raises(InvalidInput):
        at("../x")


def test_from_url_takes_keys_from_the_environment(
    request: pytest.FixtureRequest, ceph_s3: CephS3
) -> None:
    made = _s3_backend(request)
    url = f"s3://{made.bucket}/repo?endpoint={ceph_s3.endpoint}"
    aws = {"AWS_ACCESS_KEY_ID": ceph_s3.access_key, "AWS_SECRET_ACCESS_KEY": ceph_s3.secret_key}
    backend = S3Backend.from_url(url, aws)
    assert backend.url == url and backend.prefix == "repo"
    assert backend.put("config", b"{}") and made.get("repo/config") == b"{}"
    ours = {
        "SNAPBACK_S3_ACCESS_KEY": ceph_s3.access_key,
        "SNAPBACK_S3_SECRET_KEY": ceph_s3.secret_key,
        "SNAPBACK_S3_ENDPOINT": ceph_s3.endpoint,
        "AWS_ACCESS_KEY_ID": "wrong",
        "AWS_SECRET_ACCESS_KEY": "wrong",
    }
    assert S3Backend.from_url(f"s3://{made.bucket}/repo", ours).get("config") == b"{}"
    with pytest.raises(InvalidInput, match="must not contain credentials"):
        S3Backend.from_url(f"s3://key:secret@{made.bucket}/repo?endpoint=http://x:1", aws)
    with pytest.raises(InvalidInput, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        S3Backend.from_url(url, {})
    with pytest.raises(InvalidInput, match="no S3 endpoint"):
        S3Backend.from_url(f"s3://{made.bucket}", aws)
    with pytest.raises(InvalidInput, match="unknown option"):
        S3Backend.from_url(url + "&secret=x", aws)


def test_ensure_bucket_is_idempotent(request: pytest.FixtureRequest) -> None:
    backend = _s3_backend(request)  # made by ensure_bucket
    assert backend.ensure_bucket() is False
    assert backend.put("config", b"x") and backend.ensure_bucket() is False
    assert backend.get("config") == b"x"


def test_touch_keeps_bytes_and_answers_not_found(request: pytest.FixtureRequest) -> None:
    backend = _s3_backend(request, prefix="t")
    data = _data(5 * MIB, seed=9)
    backend.put("chunks/ee/t", data)
    before = backend.stat("chunks/ee/t")
    time.sleep(1.05)
    backend.touch("chunks/ee/t")
    after = backend.stat("chunks/ee/t")
    assert before is not None and after is not None and after.mtime > before.mtime
    assert after.size == len(data) and backend.get("chunks/ee/t") == data
    assert backend.put("chunks/ee/t", b"other") is False  # still there, still write-once
    with pytest.raises(NotFound, match="chunks/ee/missing"):
        backend.touch("chunks/ee/missing")
    with pytest.raises(NotFound, match="chunks/ee/missing is missing from s3://"):
        backend.get("chunks/ee/missing")


@pytest.mark.skipif(not os.environ.get("SNAPBACK_S3_BENCH"), reason="set SNAPBACK_S3_BENCH=1")
def test_throughput_4mib(request: pytest.FixtureRequest) -> None:
    """Figures for docs/repository-backends.md (not run by default)."""
    backend = _s3_backend(request)
    blobs = [_data(4 * MIB, seed=100 + i) for i in range(32)]
    mib = 4 * len(blobs)
    for run in range(5):
        names = [f"chunks/{run}/{i}" for i in range(len(blobs))]
        start = time.perf_counter()
        for name, blob in zip(names, blobs, strict=True):
            backend.put(name, blob)
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        for name in names:
            backend.get(name)
        get_s = time.perf_counter() - start
        with ThreadPoolExecutor(4) as pool:
            names4 = [f"p/{run}/{i}" for i in range(len(blobs))]
            start = time.perf_counter()
            list(pool.map(backend.put, names4, blobs))
            put4_s = time.perf_counter() - start
            start = time.perf_counter()
            list(pool.map(backend.get, names4))
            get4_s = time.perf_counter() - start
        start = time.perf_counter()
        for name in names:
            backend.touch(name)
        touch_ms = (time.perf_counter() - start) * 1000 / len(names)
        print(
            f"run {run}: put {mib / put_s:.0f} MiB/s, get {mib / get_s:.0f} MiB/s, "
            f"4 threads: put {mib / put4_s:.0f} MiB/s, get {mib / get4_s:.0f} MiB/s; "
            f"touch of a 4 MiB object {touch_ms:.1f} ms"
        )
        for name in names + names4:
            backend.delete(name)
    ops: dict[str, list[float]] = {"put 4 KiB": [], "get 4 KiB": [], "stat": [], "delete": []}
    small = _data(4096)
    for i in range(100):
        key = f"s/{i}"
        for op, call, args in (
            ("put 4 KiB", backend.put, (key, small)),
            ("get 4 KiB", backend.get, (key,)),
            ("stat", backend.stat, (key,)),
            ("delete", backend.delete, (key,)),
        ):
            start = time.perf_counter()
            call(*args)
            ops[op].append((time.perf_counter() - start) * 1000)
    print(", ".join(f"{op} {sorted(t)[len(t) // 2]:.1f} ms" for op, t in ops.items()))
    keys = [f"l/{i:05d}" for i in range(2500)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(backend.put, keys, [b"x"] * len(keys)))
    for _ in range(3):
        start = time.perf_counter()
        assert len(list(backend.list_objects("l/"))) == len(keys)
        print(f"list of {len(keys)} keys: {(time.perf_counter() - start) * 1000:.0f} ms")

"""A repository in an S3 bucket (AWS S3, Ceph radosgw, or any S3-compatible server).

Objects are at most a few MiB, so each one is a single PUT (no multipart):

- put: one ``PutObject`` carrying ``Content-MD5`` (the server refuses a body
  that does not match it: ``BadDigest``, nothing stored) and, unless
  ``overwrite``, ``If-None-Match: *``, so the server itself refuses to replace
  an existing key (412 ``PreconditionFailed`` -> ``put`` returns False). A
  reader sees either no object or the whole one: S3 publishes an object only
  when its upload completed.
- touch: a server-side copy of the object onto itself with
  ``MetadataDirective=REPLACE``, which gives it a new ``LastModified`` without
  moving its bytes through this client.
- list: ``ListObjectsV2``, page by page (1000 keys a page).

The client uses path-style addressing (``http://host/bucket/key``: works with
any endpoint, no wildcard DNS), bounded connect/read timeouts, and botocore's
"standard" retry mode for connection errors, timeouts and 5xx answers.
Every botocore error becomes a ``BackendError`` (or ``NotFound``) whose message
says what to check; the botocore exception stays as ``__cause__``. The
wording of those messages is in ``s3_errors``.

Credentials never appear in a URL: ``from_url`` takes them from the
environment. The parsing and checking of the location is in ``s3_location``.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from snapback.domain.errors import NotFound, SnapbackError
from snapback.repository.backends.base import Backend, BackendError, ObjectInfo, check_key
from snapback.repository.backends.s3_errors import (
    backend_error,
    error_code,
    http_status,
    is_missing_key,
    retry_count,
)
from snapback.repository.backends.s3_location import (
    DEFAULT_REGION,
    check_location,
    clean_prefix,
    format_s3_url,
    parse_s3_url,
)

CONNECT_TIMEOUT = 5.0  # seconds to open a TCP connection to the endpoint
READ_TIMEOUT = 60.0  # seconds without a byte from the server (an 8 MiB object needs far less)
MAX_ATTEMPTS = 5  # per request, first try included; botocore backs off 50 ms, 100 ms, 200 ms...
CONTENT_TYPE = "application/octet-stream"


def _content_md5(data: bytes) -> str:
    """The ``Content-MD5`` header of ``data``: base64 of its binary MD5 (RFC 1864)."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _client_config(
    region: str, connect_timeout: float, read_timeout: float, max_attempts: int
) -> Config:
    return Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # total_max_attempts counts the first try; botocore's max_attempts
        # would count only the retries.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        tcp_keepalive=True,
        # No CRC32 headers or aws-chunked trailers: radosgw 16 ignores
        # x-amz-checksum-* (a wrong one is accepted), and older S3 servers
        # refuse aws-chunked bodies. Content-MD5 is what protects a PUT.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


class S3Backend(Backend):
    """The objects under ``prefix/`` (or the whole bucket) of one S3 bucket."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        prefix: str = "",
        *,
        access_key: str,
        secret_key: str,
        region: str = DEFAULT_REGION,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        check_location(endpoint, bucket, access_key, secret_key)
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.prefix = clean_prefix(prefix)
        self.region = region
        self.read_timeout = read_timeout
        self.url = format_s3_url(self.endpoint, bucket, self.prefix)
        config = _client_config(region, connect_timeout, read_timeout, max_attempts)
        # One session per backend: boto3 clients are thread-safe, sessions are not.
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=config,
        )

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str], **options: Any) -> S3Backend:
        """``s3://BUCKET[/PREFIX][?endpoint=URL][&region=NAME]``, keys from ``env``.

        Keys: ``SNAPBACK_S3_ACCESS_KEY`` / ``SNAPBACK_S3_SECRET_KEY``, else
        ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``. Endpoint: the URL's
        ``endpoint``, else ``SNAPBACK_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL_S3``
        or ``AWS_ENDPOINT_URL``. Region: the URL's ``region``, else
        ``SNAPBACK_S3_REGION``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, us-east-1.
        The parsing is ``s3_location.parse_s3_url``.
        """
        location = parse_s3_url(url, env)
        return cls(
            location.endpoint,
            location.bucket,
            location.prefix,
            access_key=location.access_key,
            secret_key=location.secret_key,
            region=location.region,
            **options,
        )

    def __repr__(self) -> str:
        return f"S3Backend({self.url!r})"

    # -- helpers -------------------------------------------------------------

    def _name(self, key: str) -> str:
        """The object name in the bucket for repository key ``key``."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, doing: str) -> SnapbackError:
        """A BackendError a person can act on, for a botocore exception raised ``doing`` ..."""
        return backend_error(
            exc, doing, endpoint=self.endpoint, bucket=self.bucket, read_timeout=self.read_timeout
        )

    # -- the interface -------------------------------------------------------

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        name = self._name(key)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": name,
            "Body": data,
            "ContentMD5": _content_md5(data),
            "ContentType": CONTENT_TYPE,
        }
        if not overwrite:
            args["IfNoneMatch"] = "*"
        # 409 ConditionalRequestConflict: AWS S3 refuses a conditional write
        # while another one on the same key is in flight; try again.
        for attempt in range(5):
            try:
                self._client.put_object(**args)
                return True
            except botocore.exceptions.ClientError as exc:
                code, status = error_code(exc), http_status(exc)
                if not overwrite and (code == "PreconditionFailed" or status == 412):
                    # True only when an earlier attempt of this very call was
                    # stored but its answer was lost (connection cut), so
                    # botocore tried again and met our own object.
                    return bool(retry_count(exc)) and self._holds(name, data)
                if code == "ConditionalRequestConflict" and attempt < 4:
                    time.sleep(0.1 * 2**attempt)
                    continue
                raise self._error(exc, f"writing {key}") from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise self._error(exc, f"writing {key}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _holds(self, name: str, data: bytes) -> bool:
        """Whether object ``name`` holds exactly ``data`` (its ETag is the MD5 of a single PUT)."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=name)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return False
        etag = str(head.get("ETag", "")).strip('"')
        return int(head.get("ContentLength", -1)) == len(data) and etag == _md5_hex(data)

    def get(self, key: str) -> bytes:
        name = self._name(key)
        # botocore retries the request but not the reading of the body: a
        # connection that breaks mid-body is retried here, twice.
        for attempt in range(3):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=name)
            except botocore.exceptions.ClientError as exc:
                if is_missing_key(exc):
                    raise NotFound(f"object {key} is missing from {self.url}") from exc
                raise self._error(exc, f"reading {key}") from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise self._error(exc, f"reading {key}") from exc
            body = response["Body"]
            try:
                return bytes(body.read())  # raises if fewer bytes than Content-Length came
            except (
                botocore.exceptions.ResponseStreamingError,
                botocore.exceptions.IncompleteReadError,
                botocore.exceptions.ReadTimeoutError,
            ) as exc:
                if attempt == 2:
                    raise self._error(exc, f"reading {key}") from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise self._error(exc, f"reading {key}") from exc
            finally:
                body.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def stat(self, key: str) -> ObjectInfo | None:
        name = self._name(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as exc:
            # A HEAD answer has no body, so a missing bucket looks like a missing key.
            if http_status(exc) == 404 or error_code(exc) in ("NoSuchKey", "NotFound"):
                return None
            raise self._error(exc, f"looking up {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, f"looking up {key}") from exc
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)  # 204 for a missing key too
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "NoSuchKey":
                return
            raise self._error(exc, f"deleting {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, f"deleting {key}") from exc

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if prefix and not prefix.endswith("/"):
            raise BackendError(f"list prefix {prefix!r} must name a folder (end in '/')")
        if prefix:
            check_key(prefix.rstrip("/"))
        base = f"{self.prefix}/" if self.prefix else ""
        doing = f"listing {prefix or 'all objects'}"
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", ()):
                    name: str = obj["Key"]
                    if not name.startswith(base):  # pragma: no cover - the server filtered
                        continue
                    yield ObjectInfo(
                        name[len(base) :], int(obj["Size"]), obj["LastModified"].timestamp()
                    )
        except botocore.exceptions.ClientError as exc:
            raise self._error(exc, doing) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, doing) from exc

    def touch(self, key: str) -> None:
        name = self._name(key)
        try:
            # S3 refuses a copy onto itself that changes nothing; REPLACE (with
            # the same content type, and no user metadata: we keep none) is
            # such a change, and the copy gets a new LastModified.
            self._client.copy_object(
                Bucket=self.bucket,
                Key=name,
                CopySource={"Bucket": self.bucket, "Key": name},
                MetadataDirective="REPLACE",
                ContentType=CONTENT_TYPE,
            )
        except botocore.exceptions.ClientError as exc:
            if is_missing_key(exc):
                raise NotFound(f"object {key} is missing from {self.url}") from exc
            raise self._error(exc, f"touching {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, f"touching {key}") from exc

    # -- S3 only ---------------------------------------------------------------

    def prepare(self) -> None:
        self.ensure_bucket()

    def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists; True when this call created it."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return False
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) != 404:
                raise self._error(exc, "checking the bucket") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "checking the bucket") from exc
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**args)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code == "BucketAlreadyOwnedByYou":
                return False  # created meanwhile by another client of ours
            if code == "BucketAlreadyExists":
                raise BackendError(
                    f"bucket {self.bucket!r} at {self.endpoint} belongs to someone else; "
                    "choose another bucket name"
                ) from exc
            raise self._error(exc, "creating the bucket") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "creating the bucket") from exc
        return True

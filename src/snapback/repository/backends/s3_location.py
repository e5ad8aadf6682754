"""Where an S3 repository is, and with which keys: the ``s3://`` URL and its checks.

``S3Backend.from_url`` and ``S3Backend.__init__`` take their location from
here: parsing ``s3://BUCKET[/PREFIX][?endpoint=URL][&region=NAME]``, filling
in endpoint, region and keys from the environment, and refusing a location
that cannot work, all before any connection is made. Kept apart from the
backend so that the rules for what a user may write stay in one place, and
this module needs no boto3.

Credentials never appear in a URL: they come from the environment only.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from snapback.domain.errors import InvalidInput
from snapback.repository.backends.base import check_key

DEFAULT_REGION = "us-east-1"
_URL_OPTIONS = {"endpoint", "region"}


@dataclass(frozen=True)
class S3Location:
    """An ``s3://`` URL resolved against the environment; the keys stay out of ``repr``."""

    endpoint: str
    bucket: str
    prefix: str  # as written in the URL; ``S3Backend`` cleans it
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)


def parse_s3_url(url: str, env: Mapping[str, str]) -> S3Location:
    """The location ``url`` names, with what it leaves out taken from ``env``."""
    parsed = urllib.parse.urlsplit(url)
    _check_url(url, parsed)
    query = _query(url, parsed)
    endpoint = _endpoint(url, query, env)
    region = _option(query, "region") or _first_set(
        env, "SNAPBACK_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"
    )
    access_key, secret_key = _credentials(url, env)
    return S3Location(
        endpoint=endpoint,
        bucket=parsed.netloc,
        prefix=parsed.path,
        region=region or DEFAULT_REGION,
        access_key=access_key,
        secret_key=secret_key,
    )


def _check_url(url: str, parsed: urllib.parse.SplitResult) -> None:
    """Refuse anything but ``s3://BUCKET...`` without credentials."""
    if parsed.scheme != "s3":
        raise InvalidInput(f"{url!r} is not an s3:// URL")
    if "@" in parsed.netloc:
        raise InvalidInput(
            "an s3:// URL must not contain credentials: set SNAPBACK_S3_ACCESS_KEY and "
            "SNAPBACK_S3_SECRET_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if not parsed.netloc:
        raise InvalidInput(f"{url!r} names no bucket (s3://BUCKET[/PREFIX]?endpoint=URL)")


def _query(url: str, parsed: urllib.parse.SplitResult) -> dict[str, list[str]]:
    """The URL's options; only ``endpoint`` and ``region`` are known."""
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    unknown = set(query) - _URL_OPTIONS
    if unknown:
        raise InvalidInput(f"unknown option(s) in {url!r}: {', '.join(sorted(unknown))}")
    return query


def _option(query: Mapping[str, list[str]], name: str) -> str:
    """The last value of option ``name``; "" when it is absent or blank."""
    return (query.get(name) or [""])[-1]


def _first_set(env: Mapping[str, str], *names: str) -> str:
    """The value of the first of ``names`` set (non-empty) in ``env``; "" if none is."""
    return next((env[n] for n in names if env.get(n)), "")


def _endpoint(url: str, query: Mapping[str, list[str]], env: Mapping[str, str]) -> str:
    endpoint = _option(query, "endpoint") or _first_set(
        env, "SNAPBACK_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
    )
    if not endpoint:
        raise InvalidInput(
            f"no S3 endpoint for {url!r}: add ?endpoint=http://HOST:PORT or set "
            "SNAPBACK_S3_ENDPOINT"
        )
    return endpoint


def _credentials(url: str, env: Mapping[str, str]) -> tuple[str, str]:
    """(access key, secret key): snapback's own pair if either is set, else AWS's."""
    if env.get("SNAPBACK_S3_ACCESS_KEY") or env.get("SNAPBACK_S3_SECRET_KEY"):
        access_key = env.get("SNAPBACK_S3_ACCESS_KEY", "")
        secret_key = env.get("SNAPBACK_S3_SECRET_KEY", "")
        names = "SNAPBACK_S3_ACCESS_KEY and SNAPBACK_S3_SECRET_KEY"
    else:
        access_key = env.get("AWS_ACCESS_KEY_ID", "")
        secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
        names = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if not access_key or not secret_key:
        raise InvalidInput(f"no S3 credentials for {url!r}: set both {names}")
    return access_key, secret_key


def check_location(endpoint: str, bucket: str, access_key: str, secret_key: str) -> None:
    """Refuse an endpoint that is not a plain http(s) URL, an empty bucket or a missing key."""
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidInput(f"S3 endpoint {endpoint!r} must be an http:// or https:// URL")
    if parsed.username or parsed.password:
        raise InvalidInput("S3 endpoint must not contain credentials")
    if not bucket:
        raise InvalidInput("S3 bucket name is empty")
    if not access_key or not secret_key:
        raise InvalidInput("S3 access key and secret key are both required")


def clean_prefix(prefix: str) -> str:
    """``prefix`` without its outer slashes, checked as a key; "" for the whole bucket."""
    prefix = prefix.strip("/")
    return check_key(prefix) if prefix else ""


def format_s3_url(endpoint: str, bucket: str, prefix: str) -> str:
    """The ``s3://`` URL of a location, in the form ``parse_s3_url`` reads; never with keys."""
    path = f"/{prefix}" if prefix else ""
    return f"s3://{bucket}{path}?endpoint={endpoint}"

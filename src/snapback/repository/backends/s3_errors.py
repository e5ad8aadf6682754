"""What a botocore exception means for an S3 repository, in words a person can act on.

``S3Backend`` turns every botocore exception into a ``BackendError`` through
``backend_error``, whose message says what to check (keys, bucket name, clock,
server, network, TLS); the caller keeps the botocore exception as
``__cause__``. The small readers of an S3 error answer (code, HTTP status,
retries) live here too, since the backend needs them to tell an expected
answer (a missing key, a refused conditional PUT) from a failure. Kept apart
from the backend so that the knowledge of S3's error codes is in one place.
"""

from __future__ import annotations

import botocore.exceptions

from snapback.repository.backends.base import BackendError

# Error codes that mean "these credentials may not do this".
_ACCESS_CODES = {
    "AccessDenied": "the credentials may not use this bucket",
    "InvalidAccessKeyId": "the server does not know this access key",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "AccountProblem": "the account has a problem",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
}
# Error codes that mean "the body the server received is not the one we sent".
_CORRUPT_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
# Raised while connecting or while bytes are in flight.
_NETWORK_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.HTTPClientError,
)


def error_code(exc: botocore.exceptions.ClientError) -> str:
    """The S3 error code; "" for a bodiless answer (HEAD), where botocore puts the status."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return "" if code == status else code


def http_status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def retry_count(exc: botocore.exceptions.ClientError) -> int:
    """How many times botocore tried the request again before this answer."""
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))


def is_missing_key(exc: botocore.exceptions.ClientError) -> bool:
    """Whether the answer says the object is missing (but not the whole bucket)."""
    return error_code(exc) in ("NoSuchKey", "NotFound") or (
        http_status(exc) == 404 and error_code(exc) != "NoSuchBucket"
    )


def backend_error(
    exc: Exception, doing: str, *, endpoint: str, bucket: str, read_timeout: float
) -> BackendError:
    """A BackendError a person can act on, for a botocore exception raised ``doing`` ..."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return _refused(exc, doing, endpoint=endpoint, bucket=bucket)
    return _unanswered(exc, doing, endpoint=endpoint, bucket=bucket, read_timeout=read_timeout)


def _where(endpoint: str, bucket: str) -> str:
    return f"{endpoint} (bucket {bucket!r})"


def _refused(
    exc: botocore.exceptions.ClientError, doing: str, *, endpoint: str, bucket: str
) -> BackendError:
    """The server answered with an error."""
    where = _where(endpoint, bucket)
    code, status = error_code(exc), http_status(exc)
    message = exc.response.get("Error", {}).get("Message") or ""
    if code in _ACCESS_CODES or status == 403:
        if code in _ACCESS_CODES:
            why = f"{_ACCESS_CODES[code]} ({code})"
        else:  # a HEAD answer has no body, so no code either
            why = f"HTTP {status} Forbidden"
        return BackendError(
            f"access denied by {where} while {doing}: {why}; check the access key "
            "and secret key and the bucket's permissions"
        )
    if code == "NoSuchBucket":
        return BackendError(
            f"bucket {bucket!r} does not exist at {endpoint} ({doing}); "
            "'snapback repo init' creates it, or fix the bucket name"
        )
    if code in _CORRUPT_CODES:
        return BackendError(
            f"{where} refused the upload while {doing}: the body it received does not "
            f"match the checksum sent with it ({code}), so it was corrupted on the way; "
            "nothing was stored"
        )
    if code == "RequestTimeTooSkewed":
        return BackendError(
            f"{where} refused the request while {doing}: this machine's clock differs "
            "from the server's by more than 15 minutes; fix the clock (NTP)"
        )
    detail = f"HTTP {status} {code} {message}".rstrip()
    if code in ("SlowDown", "ServiceUnavailable") or status >= 500:
        return BackendError(
            f"{where} failed while {doing}: {detail} (still failing after retries: "
            "the server is down or overloaded)"
        )
    return BackendError(f"{where} refused the request while {doing}: {detail}")


def _unanswered(
    exc: Exception, doing: str, *, endpoint: str, bucket: str, read_timeout: float
) -> BackendError:
    """No usable answer came: network, TLS, timeout, missing credentials, or else."""
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError,
    ):
        return BackendError(
            f"cannot reach the S3 endpoint {endpoint} while {doing}: {exc}; is the "
            "server running and are the address and port right?"
        )
    if isinstance(exc, botocore.exceptions.SSLError):
        return BackendError(
            f"TLS with the S3 endpoint {endpoint} failed while {doing}: {exc}; if its "
            "certificate comes from a private CA, point AWS_CA_BUNDLE at that CA's PEM file"
        )
    if isinstance(exc, botocore.exceptions.ReadTimeoutError):
        return BackendError(
            f"the S3 endpoint {endpoint} stopped answering while {doing} (no data for "
            f"{read_timeout:g} s, after retries)"
        )
    if isinstance(exc, _NETWORK_ERRORS):
        return BackendError(
            f"the connection to the S3 endpoint {endpoint} broke while {doing}: {exc} "
            "(after retries)"
        )
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return BackendError(f"no S3 credentials while {doing}")
    return BackendError(f"S3 request to {_where(endpoint, bucket)} failed while {doing}: {exc}")

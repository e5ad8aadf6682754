"""Connections to a Ceph cluster and the translation of librados/librbd errors.

The bindings are Debian's ``python3-rados``/``python3-rbd`` (hence the venv with
system site packages). One ``rados.Rados`` per configuration file and process,
connected on first use with a timeout, so a dead cluster gives an error in
seconds, not a hang. Every librbd/librados exception leaves through
``translated()`` as one of ``snapback.domain.errors``, its cause kept.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator
from typing import Any

from snapback.domain.errors import (
    Busy,
    Conflict,
    HasDependents,
    InvalidInput,
    NotFound,
    StorageError,
)
from snapback.drivers.storage.rbd import closing

CONNECT_TIMEOUT_S = 10
_CLUSTERS: dict[str, Any] = {}


def bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as exc:  # Debian packages python3-rados / python3-rbd
        raise StorageError(
            "the Ceph Python bindings (rados, rbd) are missing: run scripts/bootstrap.sh"
        ) from exc
    return rados, rbd


def cluster(conffile: str) -> Any:
    """The connected cluster handle for ``conffile`` (one per process)."""
    if conffile in _CLUSTERS:
        return _CLUSTERS[conffile]
    rados, _ = bindings()
    handle = rados.Rados(
        conffile=conffile,
        conf={
            "client_mount_timeout": str(CONNECT_TIMEOUT_S),
            "rados_mon_op_timeout": "30",
            "rados_osd_op_timeout": "60",
        },
    )
    try:
        handle.connect(timeout=CONNECT_TIMEOUT_S)
    except rados.Error as exc:
        raise StorageError(
            f"cannot reach the Ceph cluster of {conffile}: {exc} "
            "(is it running? scripts/ceph.sh start DIR starts a throwaway one)"
        ) from exc
    _CLUSTERS[conffile] = handle
    return handle


@atexit.register
def _shutdown() -> None:
    closing.settle()  # images closed late are closed before their cluster handle goes
    rados, _ = bindings()
    for handle in _CLUSTERS.values():
        with contextlib.suppress(rados.Error):  # at exit: nothing left to report to
            handle.shutdown()
    _CLUSTERS.clear()


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Run librbd/librados calls; their errors become ours, naming ``what``."""
    rados, rbd = bindings()
    try:
        yield
    except rbd.ImageNotFound as exc:
        raise NotFound(f"{what}: does not exist") from exc
    except rbd.ImageExists as exc:
        raise Conflict(f"{what}: already exists") from exc
    except rbd.ImageBusy as exc:
        raise Busy(f"{what}: busy (in use by another client or operation)") from exc
    except rbd.ImageHasSnapshots as exc:
        raise HasDependents(f"{what}: has snapshots", []) from exc
    except rbd.InvalidArgument as exc:
        raise InvalidInput(f"{what}: invalid argument ({exc})") from exc
    except rbd.ReadOnlyImage as exc:
        raise InvalidInput(f"{what}: read-only") from exc
    except rbd.NoSpace as exc:
        raise StorageError(f"{what}: no space left in the cluster") from exc
    except rbd.Timeout as exc:
        raise StorageError(f"{what}: the cluster did not answer in time") from exc
    except rbd.Error as exc:
        raise StorageError(f"{what}: {exc}") from exc
    except rados.ObjectNotFound as exc:
        raise NotFound(f"{what}: not found ({exc})") from exc
    except rados.TimedOut as exc:
        raise StorageError(f"{what}: the cluster did not answer in time") from exc
    except rados.Error as exc:
        raise StorageError(f"{what}: {exc}") from exc

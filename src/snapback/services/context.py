"""What every service needs: settings, the catalogue, the pools and locks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from snapback.catalog.db import open_engine, session_factory
from snapback.config import Settings
from snapback.domain.errors import InvalidInput, NotFound
from snapback.drivers.hypervisor.libvirt_driver import LibvirtHypervisor
from snapback.drivers.storage.base import StoragePool
from snapback.drivers.storage.local import LocalPool
from snapback.drivers.storage.local.meta import flock


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        settings.locks.mkdir(exist_ok=True)
        settings.staging.mkdir(exist_ok=True)
        self._pools: dict[str, StoragePool] = {}

    @cached_property
    def engine(self) -> Engine:
        return open_engine(self.settings.catalog_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory(self.engine)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    @cached_property
    def hypervisor(self) -> LibvirtHypervisor:
        return LibvirtHypervisor(self.settings.libvirt_uri)

    def pool(self, name: str | None = None) -> StoragePool:
        name = name or self.settings.default_pool
        if name not in self._pools:
            cfg = self.settings.pools.get(name)
            if cfg is None:
                known = ", ".join(sorted(self.settings.pools))
                raise NotFound(f"pool {name!r} is not configured (known pools: {known})")
            if cfg.driver == "rbd":
                from snapback.drivers.storage.rbd import RbdPool

                assert cfg.conf is not None
                self._pools[name] = RbdPool(
                    name,
                    conffile=cfg.conf,
                    rados_pool=cfg.rados_pool,
                    namespace=cfg.namespace,
                    labels=self._rbd_label,
                )
            elif cfg.driver == "local":
                self._pools[name] = LocalPool(cfg.path, name)
            else:
                raise InvalidInput(f"pool {name!r}: unknown driver {cfg.driver!r}")
        return self._pools[name]

    def _rbd_label(self, rados_pool: str, namespace: str) -> str | None:
        """The configured rbd pool serving ``rados_pool``/``namespace``, if any."""
        for cfg in self.settings.pools.values():
            if cfg.driver == "rbd" and (cfg.rados_pool, cfg.namespace) == (rados_pool, namespace):
                return cfg.name
        return None

    def lock(
        self, key: str, *, timeout: float | None = 60.0
    ) -> contextlib.AbstractContextManager[None]:
        """A named, cross-process lock (``key`` is built by the project, never a user name)."""
        return flock(self.settings.locks / f"{key}.lock", timeout=timeout, what=key)

"""Settings: where snapback keeps its state and which pools it serves.

Defaults are embedded so snapback runs with no configuration at all:
``$SNAPBACK_HOME`` (default ``/var/lib/snapback``) holds the catalogue
(``catalog.db``, SQLite in WAL mode), the locks and two ``local`` pools,
``default`` for volumes and ``images`` for the image catalogue. An optional
``$SNAPBACK_HOME/snapback.toml`` overrides them::

    [catalog]
    url = "postgresql+psycopg://snapback@localhost/snapback"

    [libvirt]
    uri = "qemu+ssh://host/system"

    [pools.fast]
    driver = "local"
    path = "/srv/fast"

    [pools.images]            # glance, nova and cinder on Ceph, as in the seed
    driver = "rbd"
    conf = "/etc/ceph/ceph.conf"
    pool = "images"           # the RADOS pool (default: the pool's name)
    namespace = ""            # optional RBD namespace
    trash_delay = 3600        # deferred deletes wait in the RBD trash at least this long
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from snapback.domain.errors import InvalidInput
from snapback.domain.names import validate_name

DEFAULT_HOME = "/var/lib/snapback"
DEFAULT_POOL = "default"
IMAGE_POOL = "images"


@dataclass(frozen=True)
class PoolConfig:
    name: str
    driver: str  # local | rbd
    path: Path  # local: the root folder
    conf: str | None = None  # rbd: the cluster's ceph.conf
    rados_pool: str | None = None  # rbd: the RADOS pool (default: the pool's name)
    namespace: str = ""  # rbd: an RBD namespace inside the RADOS pool
    trash_delay: int = 0  # rbd: seconds a deferred delete stays restorable in the trash


@dataclass(frozen=True)
class Settings:
    home: Path
    catalog_url: str
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    libvirt_uri: str = "qemu:///system"
    default_pool: str = DEFAULT_POOL
    image_pool: str = IMAGE_POOL

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def staging(self) -> Path:
        return self.home / "staging"

    @property
    def work(self) -> Path:
        """Temporary files of long flows (image-create's delta and copy), one folder each."""
        return self.home / "work"


def load_settings(home: str | os.PathLike[str] | None = None) -> Settings:
    base = Path(home or os.environ.get("SNAPBACK_HOME") or DEFAULT_HOME).absolute()
    data: dict[str, object] = {}
    cfg_file = base / "snapback.toml"
    if cfg_file.is_file():
        try:
            data = tomllib.loads(cfg_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"cannot read {cfg_file}: {exc}") from exc
    catalog = data.get("catalog", {})
    url = catalog.get("url") if isinstance(catalog, dict) else None
    url = os.environ.get("SNAPBACK_CATALOG_URL") or url or f"sqlite:///{base / 'catalog.db'}"
    local_root = base / "pools"
    pools = {
        DEFAULT_POOL: PoolConfig(DEFAULT_POOL, "local", local_root),
        IMAGE_POOL: PoolConfig(IMAGE_POOL, "local", local_root),
    }
    raw_pools = data.get("pools", {})
    if isinstance(raw_pools, dict):
        for name, spec in raw_pools.items():
            if not isinstance(spec, dict):
                raise InvalidInput(f"{cfg_file}: [pools.{name}] must be a table")
            validate_name(name, "pool name")
            pools[name] = _pool_config(cfg_file, name, spec, local_root)
    lv = data.get("libvirt", {})
    uri = os.environ.get("SNAPBACK_LIBVIRT_URI") or (
        lv.get("uri") if isinstance(lv, dict) else None
    )
    return Settings(
        home=base, catalog_url=str(url), pools=pools, libvirt_uri=str(uri or "qemu:///system")
    )


def _pool_config(
    cfg_file: Path, name: str, spec: dict[str, object], local_root: Path
) -> PoolConfig:
    driver = str(spec.get("driver", "local"))
    if driver == "local":
        return PoolConfig(name, driver, Path(str(spec.get("path", local_root))))
    if driver == "rbd":
        conf = spec.get("conf")
        if not conf:
            raise InvalidInput(f"{cfg_file}: [pools.{name}] (rbd) needs conf = path of ceph.conf")
        return PoolConfig(
            name,
            driver,
            local_root,
            conf=str(conf),
            rados_pool=str(spec.get("pool", name)),
            namespace=str(spec.get("namespace", "")),
            trash_delay=int(str(spec.get("trash_delay", 0))),
        )
    raise InvalidInput(f"{cfg_file}: [pools.{name}] has unknown driver {driver!r} (local, rbd)")

"""What RBD adds beyond the StoragePool contract, on the session's real Ceph cluster."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapback.domain.errors import StorageError
from snapback.drivers.storage.rbd import RbdPool
from tests.ceph_fixture import CephCluster
from tests.conftest import Cli
from tests.rbd_fixtures import wipe

MIB = 1 << 20


@pytest.fixture
def pools(rbd_conf: str) -> Iterator[tuple[RbdPool, RbdPool]]:
    """``vols`` (a RADOS pool) and ``vols-ns`` (namespace ``ns1`` inside it)."""
    names = {("vols", ""): "vols", ("vols", "ns1"): "vols-ns"}  # what Context gives a pool

    def labels(rados_pool: str, namespace: str) -> str | None:
        return names.get((rados_pool, namespace))

    plain = RbdPool("vols", conffile=rbd_conf, labels=labels)
    spaced = RbdPool(
        "vols-ns", conffile=rbd_conf, rados_pool="vols", namespace="ns1", labels=labels
    )
    yield plain, spaced
    wipe([spaced, plain])


@pytest.fixture
def rbd_cli(rbd_conf: str, tmp_path: Path) -> Iterator[Cli]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "snapback.toml").write_text(
        f'[pools.default]\ndriver = "rbd"\nconf = "{rbd_conf}"\npool = "vols"\n'
        f'[pools.images]\ndriver = "rbd"\nconf = "{rbd_conf}"\npool = "others"\n'
        f'[pools.files]\ndriver = "local"\npath = "{tmp_path / "files"}"\n'
    )
    yield Cli(home, {})
    wipe([RbdPool(n, conffile=rbd_conf) for n in ("vols", "others")])


def test_layout_at_create(rbd_cli: Cli) -> None:
    vol = rbd_cli.json(
        "volume", "create", "striped", "--size", "64M",
        "--object-size", "1M", "--stripe-unit", "64K", "--stripe-count", "4",
    )  # fmt: skip
    assert vol["layout"] == {"object_size": MIB, "stripe_unit": 64 << 10, "stripe_count": 4}
    assert vol["allocated"] == 0  # thin
    plain = rbd_cli.json("volume", "create", "plain", "--size", "64M")
    assert plain["layout"]["object_size"] == 4 * MIB
    bad = rbd_cli("volume", "create", "odd", "--size", "64M", "--object-size", "3M", check=False)
    assert bad.returncode == 5 and "power of two" in bad.stderr
    local = rbd_cli(
        "volume", "create", "x", "--size", "8M", "--pool", "files", "--object-size", "1M",
        check=False,
    )  # fmt: skip
    assert local.returncode == 5 and "striping" in local.stderr


def test_clone_v2_needs_no_protection_and_keeps_a_removed_parent(
    pools: tuple[RbdPool, RbdPool],
) -> None:
    plain, spaced = pools
    plain.create_volume("parent", 16 * MIB)
    with plain.open("parent") as h:
        h.write(MIB, b"from-parent" * 10)
    plain.create_snapshot("parent", "s")
    with pytest.raises(Exception, match="protect"):
        plain.clone("parent", "s", spaced, "child-v1")  # v1 into a namespace: refused
    child = plain.clone("parent", "s", spaced, "child", v2=True)  # across pool namespaces
    assert str(child.parent) == "vols/parent@s"
    assert plain.children("parent", "s") == ["vols-ns/child"]
    plain.delete_snapshot("parent", "s")  # allowed: it waits in the trash namespace
    assert plain.list_snapshots("parent") == []
    with spaced.open("child") as h:
        assert h.read(MIB, 11) == b"from-parent"
    import rbd

    with rbd.Image(plain.ioctx(), "parent") as img:
        assert [s["namespace"] for s in img.list_snaps()] == [rbd.RBD_SNAP_NAMESPACE_TYPE_TRASH]
    spaced.delete_volume("child")  # the last clone goes: the hidden snapshot goes too
    with rbd.Image(plain.ioctx(), "parent") as img:
        assert list(img.list_snaps()) == []


def test_changed_extents_between_snapshots(pools: tuple[RbdPool, RbdPool]) -> None:
    plain, _ = pools
    plain.create_volume("d", 64 * MIB)
    with plain.open("d") as h:
        h.write(0, b"a" * MIB)
    plain.create_snapshot("d", "one")
    with plain.open("d") as h:
        h.write(8 * MIB, b"b" * 4096)
        h.write(40 * MIB, b"c" * (2 * MIB))
    plain.create_snapshot("d", "two")
    changed = plain.changed_extents("d", "two", "one")
    assert [(o, n) for o, n, data in changed if data] == [(8 * MIB, 4096), (40 * MIB, 2 * MIB)]
    first = plain.changed_extents("d", "one", None)
    assert [(o, n) for o, n, data in first if data] == [(0, MIB)]


def test_deferred_delete_goes_through_the_rbd_trash(rbd_cli: Cli, rbd_conf: str) -> None:
    cli = rbd_cli
    cli("volume", "create", "gold", "--size", "16M")
    cli("snapshot", "create", "gold@s")
    cli("snapshot", "protect", "gold@s")
    cli("volume", "clone", "gold@s", "copy")
    assert cli.json("volume", "delete", "gold", "--defer")["result"] == "deferred"
    vols = RbdPool("vols", conffile=rbd_conf)
    trashed = vols.trash()
    assert len(trashed) == 1  # out of the pool's listing, still read by its clone
    assert trashed[0].name not in vols.list_volumes()
    assert cli.json("volume", "show", "copy")["allocated"] == 0
    dry = cli.json("gc", "--dry-run")
    assert any("waits for" in w for w in dry["waiting"]) and dry["problems"] == []
    cli("volume", "delete", "copy")
    report = cli.json("gc")
    assert report["problems"] == [] and any("emptied trash" in d for d in report["deleted"]), report
    assert vols.trash() == [] and vols.list_volumes() == []


def test_gc_finds_what_no_catalogue_entry_explains(rbd_cli: Cli, rbd_conf: str) -> None:
    """The ``_to_be_deleted_by_glance`` problem: leftovers made behind snapback's back."""
    cli = rbd_cli
    vol = cli.json("volume", "create", "kept", "--size", "16M")
    vols = RbdPool("vols", conffile=rbd_conf)
    storage = next(iter(vols.list_volumes()))
    vols.create_volume("stray", 8 * MIB)
    vols.create_snapshot(storage, "stray-snap")
    vols.protect_snapshot(storage, "stray-snap")
    dry = cli.json("gc", "--dry-run")["debris"]
    assert any("default/stray:" in d for d in dry) and any("@stray-snap" in d for d in dry), dry
    report = cli.json("gc")
    assert report["problems"] == [], report
    assert vols.list_volumes() == [storage] and vols.list_snapshots(storage) == []
    assert cli.json("volume", "show", "kept")["id"] == vol["id"]


def test_unreachable_cluster_is_one_clear_error(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    conf = tmp_path / "dead.conf"
    text = ceph_cluster.conf.read_text()
    conf.write_text(text.replace(f":{ceph_cluster.mon_port}", ":9"))  # nothing listens there
    with pytest.raises(StorageError, match="cannot reach the Ceph cluster"):
        RbdPool("vols", conffile=str(conf)).list_volumes()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_trash_expiry_is_honoured(pools: tuple[RbdPool, RbdPool]) -> None:
    plain, _ = pools
    plain.create_volume("soon", 8 * MIB)
    plain.create_volume("later", 8 * MIB)
    plain.trash_volume("soon", 0)
    plain.trash_volume("later", 3600)
    assert sorted(e.name for e in plain.trash()) == ["later", "soon"]
    assert plain.empty_trash() == ["vols/soon"]  # only what has expired
    assert [e.name for e in plain.trash()] == ["later"]
    assert plain.empty_trash(expired_only=False) == ["vols/later"]  # forced
    assert plain.trash() == []

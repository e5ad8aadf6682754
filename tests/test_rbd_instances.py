"""Instances on RBD and the RBD direct image-create flow, on the session's real Ceph cluster.

The module's state folder puts both pools on RBD (``default`` → RADOS pool
``rbd``, ``images`` → ``images``), as nova, glance and cinder share Ceph in the
seed. One running source instance is shared by the tests.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapback.config import load_settings
from snapback.drivers.storage.rbd import RbdPool
from snapback.services.context import Context
from tests.ceph_fixture import CephCluster
from tests.conftest import SLOTS, Cli, assert_consistent, upload_guest
from tests.guestrecords import READY_LINE, frozen_at, parse_console, scan, thaws, wait_console
from tests.rbd_fixtures import wipe

VIRSH = ["virsh", "-c", "qemu:///system"]


@dataclass
class Env:
    cli: Cli
    conf: str
    console: Path
    domain: str
    tmp: Path

    def ctx(self) -> Context:
        return Context(load_settings(self.cli.home))

    def rbd_images(self, pool: str) -> list[str]:
        return RbdPool(pool, conffile=self.conf).list_volumes()


def rbd_home(conf: str) -> Path:
    home = Path(tempfile.mkdtemp(prefix="snapback-rbd-", dir="/var/tmp"))
    home.chmod(0o755)
    (home / "snapback.toml").write_text(
        f'[pools.default]\ndriver = "rbd"\nconf = "{conf}"\npool = "rbd"\n'
        f'[pools.images]\ndriver = "rbd"\nconf = "{conf}"\npool = "images"\n'
    )
    return home


@pytest.fixture(scope="module")
def env(ceph_cluster: CephCluster, guest: Path) -> Iterator[Env]:
    conf = str(ceph_cluster.conf)
    pools = [RbdPool(n, conffile=conf) for n in ("rbd", "images")]
    wipe(pools)
    home = rbd_home(conf)
    tmp = home / "t"
    tmp.mkdir()
    cli = Cli(home, {})
    upload_guest(cli, guest, tmp)
    inst = cli.json("instance", "create", "src", "--image", "tiny")
    e = Env(cli, conf, Path(inst["console"]), inst["domain"], tmp)
    wait_console(e.console, lambda t: READY_LINE in t and t.count("REC vda") > SLOTS + 5)
    yield e
    for i in cli.json("instance", "list"):
        cli("instance", "delete", i["name"], check=False)
    wipe(pools)
    shutil.rmtree(home, ignore_errors=True)


def rbd_records(env: Env, pool: str, image: str, snapshot: str | None = None) -> dict[int, bool]:
    with RbdPool(pool, conffile=env.conf).open(image, snapshot=snapshot) as h:
        return scan(h.read(0, SLOTS * 4096), "vda").valid


def storage_of(env: Env, pool: str, name: str) -> str:
    with env.ctx().sessions() as s:
        from snapback.services.catalog_queries import live_volume

        return live_volume(s, pool, name).storage_name


def image_storage(env: Env, image: str) -> str:
    vol = env.cli.json("image", "show", image)["volume"]
    return storage_of(env, "images", vol.split("/", 1)[1])


def test_instance_root_is_an_rbd_clone_reached_over_the_network(env: Env) -> None:
    xml = subprocess.run(
        [*VIRSH, "dumpxml", env.domain], capture_output=True, text=True, check=True
    ).stdout
    assert "protocol='rbd'" in xml and "name='rbd/" in xml
    root = env.cli.json("volume", "show", "src-root")
    assert root["parent"].startswith("images/") and root["parent"].endswith("@base")
    top = max(rbd_records(env, "rbd", storage_of(env, "default", "src-root")))
    assert top >= SLOTS  # the guest's writes reach the RBD image


def test_direct_flow_snapshot_clone_flatten_cleanup(env: Env) -> None:
    thawed = thaws(env.console)
    img = env.cli.json("instance", "image-create", "src", "direct-now")
    props = img["properties"]
    assert props["snapback.flow"] == "direct" and props["snapback.consistency"] == "quiesced"
    assert props["snapback.flatten"] == "done" and img["status"] == "active"
    storage = image_storage(env, "direct-now")
    pool = RbdPool("images", conffile=env.conf)
    assert pool.parent(storage) is None  # flattened: independent of the instance
    assert [s.name for s in pool.list_snapshots(storage) if s.protected]  # its base
    root_snaps = env.cli.json("snapshot", "list", "src-root")
    assert root_snaps == []  # the source snapshot was unprotected and removed
    last = frozen_at(env.console, thawed)
    found = rbd_records(env, "images", storage)
    assert all(found.values()) and max(found) == last
    child = env.cli.json("instance", "create", "child", "--image", "direct-now")
    out = wait_console(Path(child["console"]), lambda t: "START vda" in t)
    assert f"START vda {last + 1} " in out
    env.cli("instance", "delete", "child")
    assert_consistent(env.ctx())


def test_background_flatten_makes_a_usable_image_at_once(env: Env) -> None:
    img = env.cli.json("instance", "image-create", "src", "direct-bg", "--flatten", "background")
    assert img["status"] == "active"
    deadline = time.monotonic() + 60
    while env.cli.json("image", "show", "direct-bg")["properties"]["snapback.flatten"] != "done":
        assert time.monotonic() < deadline, "the background flatten did not finish"
        time.sleep(0.5)
    assert RbdPool("images", conffile=env.conf).parent(image_storage(env, "direct-bg")) is None
    assert env.cli.json("snapshot", "list", "src-root") == []
    assert_consistent(env.ctx())


ORDERS = list(itertools.permutations(["instance", "image", "base"]))


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_never_flattened_image_deletes_in_any_order(env: Env, order: tuple[str, ...]) -> None:
    """The image keeps depending on the instance's disk; no order fails or leaves debris."""
    cli, n = env.cli, ORDERS.index(order)
    before = {p: set(env.rbd_images(p)) for p in ("rbd", "images")}
    disk = env.tmp / "base.raw"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
        f.write(b"base-data" * 100)
    cli("image", "create", f"b{n}", "--file", str(disk), "--disk-format", "raw")
    cli("instance", "create", f"i{n}", "--image", f"b{n}", "--no-start")
    img = cli.json("instance", "image-create", f"i{n}", f"m{n}", "--flatten", "never")
    assert img["properties"]["snapback.flatten"] == "never"
    assert img["properties"]["snapback.consistency"] == "stopped"
    assert RbdPool("images", conffile=env.conf).parent(image_storage(env, f"m{n}")) is not None
    for what in order:
        res = {
            "instance": lambda: cli("instance", "delete", f"i{n}"),
            "image": lambda: cli("image", "delete", f"m{n}"),
            "base": lambda: cli("image", "delete", f"b{n}"),
        }[what]()
        assert res.returncode == 0, (order, what, res.stderr)
    report = cli.json("gc")
    assert report["problems"] == [], report
    after = {p: set(env.rbd_images(p)) for p in ("rbd", "images")}
    assert after == before, (order, after, before)  # nothing of this round is left in Ceph
    assert {i["name"] for i in cli.json("image", "list")} >= {"tiny"}
    assert not {f"b{n}", f"m{n}"} & {i["name"] for i in cli.json("image", "list")}
    assert_consistent(env.ctx())


DIRECT_STEPS = [
    "queued", "frozen", "snapping", "thawed", "snapped", "volume", "cloned",
    "flattened", "basing", "snapshotted", "activated", "cleaned",
]  # fmt: skip


def test_direct_flow_killed_at_each_step(env: Env) -> None:
    for i, step in enumerate(DIRECT_STEPS):
        name = f"kill-direct-{i}"
        res = env.cli(
            "instance",
            "image-create",
            "src",
            name,
            env={"SNAPBACK_CRASH_AT": f"instance.image_create:{step}"},
            check=False,
        )
        assert res.returncode == -9, (step, res.stderr)
        print(f"killed at {step}; gc", flush=True)  # shown when a step fails
        began = time.monotonic()
        env.cli("gc")
        print(f"gc took {time.monotonic() - began:.1f} s", flush=True)
        status = env.cli.json("image", "show", name)["status"]
        assert status == ("active" if step in ("activated", "cleaned") else "killed"), step
        assert env.cli.json("snapshot", "list", "src-root") == [], step  # no orphan snapshot
        assert env.cli.json("instance", "show", "src")["domain_state"] == "running"
        assert_consistent(env.ctx())
        start = env.console.read_text(errors="replace").count("REC vda")
        wait_console(env.console, lambda t, s=start: t.count("REC vda") >= s + 2)  # thawed
    last = parse_console(env.console.read_text(errors="replace")).last_rec["vda"]
    assert last > SLOTS


def test_running_instance_backup_is_quiesced_and_restores_as_an_instance(env: Env) -> None:
    repo = str(env.tmp / "repo-instance")
    env.cli("repo", "init", repo)
    thawed = thaws(env.console)
    first = env.cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert first["kind"] == "instance" and first["consistency"] == "quiesced"
    assert [d["target"] for d in first["disks"]] == ["vda"] and first["instance"]["domain_xml"]
    last = frozen_at(env.console, thawed)
    child = env.cli.json(
        "backup", "restore", first["id"], "--repo", repo, "--to-instance", "restored", "--start"
    )
    assert child["status"] == "active" and child["image"]  # the base image gives the kernel
    console = Path(env.cli.json("instance", "show", "restored")["console"])
    out = wait_console(console, lambda t: "START vda" in t)
    assert f"START vda {last + 1} " in out  # the restore point is exactly the freeze
    second = env.cli.json("backup", "create", "--instance", "src", "--repo", repo)
    assert second["change_tracking"] == "rbd-diff" and second["parent"] == first["id"]
    assert second["stats"]["read_bytes"] == 4 << 20  # the guest writes in chunk 0 only
    snaps = [s["name"] for s in env.cli.json("snapshot", "list", "src-root")]
    assert snaps == [f"backup-{second['id']}"]  # the next diff base, and only it
    env.cli("instance", "delete", "restored")
    assert_consistent(env.ctx())  # the kept snapshot is catalogued, so gc explains it

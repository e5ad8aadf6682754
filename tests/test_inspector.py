"""Our header inspector against a corpus of hostile images: every one refused,
and (through the real CLI) never opened by qemu-img."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from snapback.domain.errors import UnsafeImage
from snapback.domain.models import DiskFormat
from snapback.drivers.imagefmt.inspector import inspect
from tests.conftest import Cli, make_raw
from tests.hostile import HOSTILE, good_qcow2, patch, qemu_img, truncations

MIB = 1 << 20


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_image_refused(kind: str, tmp_path: Path) -> None:
    path = HOSTILE[kind](tmp_path)
    for declared in (None, DiskFormat.RAW, DiskFormat.QCOW2):
        with pytest.raises(UnsafeImage) as err:
            inspect(str(path), declared)
        assert str(path) in str(err.value)


def test_backing_file_message_names_it(tmp_path: Path) -> None:
    path = HOSTILE["backing file pointing at a host file"](tmp_path)
    with pytest.raises(UnsafeImage, match=r"backing file.*/etc/passwd"):
        inspect(str(path))


def test_truncated_at_every_cluster_boundary(tmp_path: Path) -> None:
    cuts = truncations(tmp_path)
    assert len(cuts) >= 4
    for path in cuts:
        with pytest.raises(UnsafeImage, match=r"beyond the end|truncated"):
            inspect(str(path), DiskFormat.QCOW2)


@pytest.mark.timeout(20)
def test_l1_entries_naming_one_l2_table_are_refused_at_once(tmp_path: Path) -> None:
    """Found by scripts/fuzz.py: a small file whose L1 entries all point at one L2
    table made the inspector check that table once per entry (15 s for 896 KiB),
    and accepted, it made ``qemu-img check`` run past 10 s. QEMU never writes it:
    refused at the second entry."""
    path = tmp_path / "aliased.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "32T")  # an L1 of 65536 entries
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(path)],
        check=True,
        capture_output=True,
    )
    data = path.read_bytes()
    l1_off, l1_size = int.from_bytes(data[40:48], "big"), int.from_bytes(data[36:40], "big")
    first = data[l1_off : l1_off + 8]
    assert l1_size == 65536 and int.from_bytes(first, "big")  # one L2 table, named once
    with open(path, "r+b") as f:
        f.seek(l1_off)
        f.write(first * l1_size)  # every entry names that table
    with pytest.raises(UnsafeImage, match="two L1 entries name the L2 table"):
        inspect(str(path), DiskFormat.QCOW2)


def test_size_not_in_sectors_is_refused_with_its_reason(tmp_path: Path) -> None:
    path = patch(good_qcow2(tmp_path / "odd.qcow2"), 24, ">Q", (16 << 20) - 1)
    with pytest.raises(UnsafeImage, match="not a whole number of 512-byte sectors"):
        inspect(str(path), DiskFormat.QCOW2)


def test_declared_format_must_match(tmp_path: Path) -> None:
    qcow = good_qcow2(tmp_path / "real.qcow2")
    raw = make_raw(tmp_path / "real.raw", 4 * MIB, {0: b"data"})
    with pytest.raises(UnsafeImage, match="declared raw but the file is a qcow2"):
        inspect(str(qcow), DiskFormat.RAW)
    with pytest.raises(UnsafeImage, match="declared qcow2"):
        inspect(str(raw), DiskFormat.QCOW2)


def test_good_images_pass(tmp_path: Path) -> None:
    qcow = good_qcow2(tmp_path / "ok.qcow2")
    found = inspect(str(qcow))
    assert (found.format, found.virtual_size) == (DiskFormat.QCOW2, 16 * MIB)
    compressed = tmp_path / "compressed.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", str(qcow), str(compressed)],
        check=True,
    )
    assert inspect(str(compressed), DiskFormat.QCOW2).format is DiskFormat.QCOW2
    raw = make_raw(tmp_path / "ok.raw", 4 * MIB, {MIB: b"x"})
    assert inspect(str(raw)).format is DiskFormat.RAW
    assert inspect(str(raw), DiskFormat.RAW).virtual_size == 4 * MIB


def test_cli_refuses_hostile_files_before_qemu_img(
    cli: Cli, qemu_img_log: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = [HOSTILE[k](corpus) for k in sorted(HOSTILE)] + truncations(corpus)
    for path in files:
        img = cli("image", "create", "evil", "--file", str(path), check=False)
        assert img.returncode == 5, (path, img.stderr)
        assert img.stderr.startswith("error: ") and len(img.stderr.strip().splitlines()) == 1
        vol = cli("volume", "import", "evil", "--file", str(path), check=False)
        assert vol.returncode == 5, (path, vol.stderr)
    images = cli.json("image", "list", "--all")
    assert images and {i["status"] for i in images} == {"killed"}
    assert cli.json("volume", "list", "--all") == []
    logged = qemu_img_log.read_text()
    for path in files:
        assert path.name not in logged, f"qemu-img saw {path}"
    staging = cli.home / "staging"
    assert list(staging.iterdir()) == []
    assert shutil.which("qemu-img")

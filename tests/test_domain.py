"""Pure logic: names and sizes."""

from __future__ import annotations

import pytest

from snapback.domain.errors import InvalidInput
from snapback.domain.names import parse_snapshot_ref, validate_name
from snapback.domain.sizes import format_size, parse_size


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "a/b",
        "../x",
        "a\x00b",
        "x" * 129,
        "-lead",
        "sp ace",
        "at@sign",
        "new\nline",
        "é",
    ],
)
def test_bad_names_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        validate_name(bad)


@pytest.mark.parametrize("good", ["a", "vol-1", "Web_root.2", "x" * 128])
def test_good_names_pass(good: str) -> None:
    assert validate_name(good) == good


def test_snapshot_ref() -> None:
    ref = parse_snapshot_ref("vol@snap")
    assert (ref.volume, ref.snapshot, str(ref)) == ("vol", "snap", "vol@snap")
    for bad in ["vol", "vol@", "@snap", "a@b@c", "../v@s", "v@../s"]:
        with pytest.raises(InvalidInput):
            parse_snapshot_ref(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10G", 10 << 30),
        ("512M", 512 << 20),
        ("1.5K", 1536),
        ("4096", 4096),
        ("1t", 1 << 40),
        ("100", 512),
        ("2GiB", 2 << 30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "0", "-1G", "10X", "G", "2P0", "9999P"])
def test_parse_size_refuses(bad: str) -> None:
    with pytest.raises(InvalidInput):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(10 << 30) == "10 GiB"
    assert format_size(1536 << 20) == "1.5 GiB"

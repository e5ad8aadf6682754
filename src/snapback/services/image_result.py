"""What ``instance image-create`` records on the image it makes: properties, timings, checksum."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snapback.catalog.models import Image, ImageProperty
from snapback.domain.models import ImageStatus
from snapback.services.context import Context

if TYPE_CHECKING:
    from snapback.services.image_create import Plan

# base-image properties an image made from an instance does not inherit
NOT_INHERITED = ("instance_uuid", "base_image_ref", "image_type", "image_location")


@dataclass
class Clock:
    """Timings of one run (seconds), recorded on the image."""

    start: float
    pause: float = 0.0
    copy: float = 0.0
    upload: float = 0.0


def properties(plan: Plan, consistency: str, clock: Clock, extra: dict[str, str]) -> dict[str, str]:
    """The base image's properties (so the result boots the same way), nova's snapshot
    properties, the flow, its consistency and timings, then the user's ``extra``."""
    props = {k: v for k, v in plan.base_props.items() if k not in NOT_INHERITED}
    props.update(
        {
            "image_type": "snapshot",
            "image_location": "snapshot",
            "instance_uuid": plan.inst_id,
            "snapback.source_instance": plan.inst_name,
            "snapback.flow": plan.flow,
            "snapback.flow_reason": plan.reason,
            "snapback.consistency": consistency,
            "snapback.time_total_s": f"{time.monotonic() - clock.start:.3f}",
            "snapback.time_guest_pause_s": f"{clock.pause:.3f}",
            "snapback.time_copy_s": f"{clock.copy:.3f}",
            "snapback.time_upload_s": f"{clock.upload:.3f}",
            "snapback.created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    if plan.base_image:
        props["base_image_ref"] = plan.base_image
    props.update(extra)
    return props


def activate(
    ctx: Context,
    image_id: str,
    vol_id: str,
    size: int,
    digest: str,
    virtual_size: int,
    props: dict[str, str],
) -> None:
    with ctx.transaction() as s:
        img = s.get(Image, image_id)
        assert img is not None
        img.status, img.volume_id = ImageStatus.ACTIVE, vol_id
        img.size, img.checksum, img.virtual_size = size, digest, virtual_size
        img.properties = [ImageProperty(key=k, value=v) for k, v in sorted(props.items())]


def sha256_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()

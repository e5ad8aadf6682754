"""Retention: which backups ``repo prune --keep-*`` keeps (restic's rules, per source).

Backups are grouped by what they back up (the source volume or instance).
Within a group, newest first: ``--keep-last N`` keeps the N newest; for each
of hourly, daily, weekly, monthly and yearly with N > 0, the newest backup of
each of the N most recent periods that have a backup is kept. A backup is kept
when any rule keeps it; the reasons are reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PERIODS: dict[str, Callable[[time.struct_time], tuple[int, ...]]] = {
    "hourly": lambda t: (t.tm_year, t.tm_yday, t.tm_hour),
    "daily": lambda t: (t.tm_year, t.tm_yday),
    "weekly": lambda t: tuple(int(x) for x in time.strftime("%G %V", t).split()),
    "monthly": lambda t: (t.tm_year, t.tm_mon),
    "yearly": lambda t: (t.tm_year,),
}


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return not any(vars(self).values())


@dataclass
class Plan:
    keep: dict[str, list[str]] = field(default_factory=dict)  # backup id -> reasons
    remove: list[str] = field(default_factory=list)


def source_key(record: dict[str, Any]) -> str:
    src = record.get("source", {})
    return str(src.get("volume_id") or src.get("instance_id") or src.get("name"))


def plan(records: list[dict[str, Any]], policy: Policy) -> Plan:
    result = Plan()
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(source_key(r), []).append(r)
    for group in groups.values():
        group.sort(key=lambda r: float(r["created_at"]), reverse=True)
        for n, r in enumerate(group):
            if n < policy.last:
                result.keep.setdefault(r["id"], []).append("last")
        for name, period_of in PERIODS.items():
            wanted = int(getattr(policy, name))
            seen: list[tuple[int, ...]] = []
            for r in group:
                period = period_of(time.gmtime(float(r["created_at"])))
                if period in seen:
                    continue
                if len(seen) >= wanted:
                    break
                seen.append(period)
                result.keep.setdefault(r["id"], []).append(name)
        result.remove.extend(r["id"] for r in group if r["id"] not in result.keep)
    return result

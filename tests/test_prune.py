"""Retention rules (pure logic on record times; the repository side is tested in test_backups)."""

from __future__ import annotations

import calendar

from snapback.repository.prune import Policy, plan

HOUR, DAY = 3600.0, 86400.0
T0 = calendar.timegm((2026, 11, 28, 23, 30, 0, 0, 0, 0))  # a Saturday, 23:30 UTC


def rec(i: int, at: float, volume: str = "vol-a") -> dict[str, object]:
    return {"id": f"b{i:02d}", "created_at": at, "source": {"volume_id": volume}}


def test_keep_last_and_daily() -> None:
    # four backups a day for five days, newest first in time: T0, T0-6h, ...
    records = [rec(i, T0 - i * 6 * HOUR) for i in range(20)]
    p = plan(records, Policy(last=2, daily=3))
    kept = sorted(p.keep)
    assert kept[:2] == ["b00", "b01"]
    daily = sorted(k for k, why in p.keep.items() if "daily" in why)

    assert daily == ["b00", "b04", "b08"]  # the newest of Nov 28, 27 and 26
    assert set(p.remove) == {r["id"] for r in records} - set(p.keep)
    assert "b19" in p.remove


def test_groups_are_separate_and_empty_policy_keeps_nothing() -> None:
    records = [rec(0, T0, "a"), rec(1, T0 - HOUR, "a"), rec(2, T0, "b")]
    p = plan(records, Policy(last=1))
    assert sorted(p.keep) == ["b00", "b02"] and p.remove == ["b01"]
    assert Policy().empty() and not Policy(weekly=1).empty()


def test_weekly_monthly_yearly() -> None:
    records = [rec(i, T0 - i * 7 * DAY) for i in range(60)]  # weekly for ~14 months
    p = plan(records, Policy(weekly=4, monthly=3, yearly=2))
    weekly = [k for k, why in p.keep.items() if "weekly" in why]
    monthly = [k for k, why in p.keep.items() if "monthly" in why]
    yearly = [k for k, why in p.keep.items() if "yearly" in why]
    assert sorted(weekly) == ["b00", "b01", "b02", "b03"]
    assert len(monthly) == 3 and "b00" in monthly
    assert len(yearly) == 2 and "b00" in yearly  # 2026 and 2025
    assert len(p.keep) + len(p.remove) == 60

"""Step journals for multi-step operations (DESIGN §4.3).

An operation row is written before the first change, each step is committed
as it is reached, and the running process holds a lock file named after the
operation. A row still ``running`` whose lock is free belongs to a process
that died: ``gc`` hands it to the recovery function registered for its kind,
which finishes or undoes it from the steps recorded. A flow that fails with an
error runs the same recovery at once, so both paths are one code path.

``SNAPBACK_CRASH_AT=kind:step`` kills the process with SIGKILL right after that
step is recorded; the crash tests use it. ``SNAPBACK_PAUSE_AT=kind:step:seconds``
sleeps there instead, so a race test can be sure two things overlap.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from snapback.catalog.models import Operation, OperationStep, new_id
from snapback.domain.errors import Busy, SnapbackError
from snapback.domain.models import OperationStatus
from snapback.services.context import Context


@dataclass(frozen=True)
class Step:
    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class OperationRecord:
    id: str
    kind: str
    target: str
    payload: dict[str, Any]
    steps: tuple[Step, ...]

    def reached(self, name: str) -> bool:
        return any(s.name == name for s in self.steps)

    def data(self, name: str) -> dict[str, Any]:
        return next((s.data for s in self.steps if s.name == name), {})


Recovery = Callable[[Context, OperationRecord], OperationStatus]
_RECOVERY: dict[str, Recovery] = {}


def recovery(kind: str) -> Callable[[Recovery], Recovery]:
    """Register the function that finishes or undoes a ``kind`` operation."""

    def register(fn: Recovery) -> Recovery:
        _RECOVERY[kind] = fn
        return fn

    return register


class OpHandle:
    def __init__(self, ctx: Context, op_id: str, kind: str) -> None:
        self.ctx, self.id, self.kind = ctx, op_id, kind
        self._seq = 0

    def step(self, name: str, **data: Any) -> None:
        self._seq += 1
        with self.ctx.transaction() as s:
            s.add(
                OperationStep(
                    operation_id=self.id,
                    seq=self._seq,
                    name=name,
                    data=json.dumps(data, sort_keys=True),
                )
            )
        if os.environ.get("SNAPBACK_CRASH_AT") == f"{self.kind}:{name}":
            os.kill(os.getpid(), signal.SIGKILL)
        where, _, seconds = os.environ.get("SNAPBACK_PAUSE_AT", "").rpartition(":")
        if where == f"{self.kind}:{name}":
            time.sleep(float(seconds))


def _lock_key(op_id: str) -> str:
    return f"op-{op_id}"


@contextlib.contextmanager
def operation(ctx: Context, kind: str, target: str, **payload: Any) -> Iterator[OpHandle]:
    """Run a journaled operation; on error, recover it at once and re-raise.

    The lock is taken before the row exists, so no ``gc`` can ever see this
    operation ``running`` with its lock free while its process is alive.
    """
    op_id = new_id()
    with ctx.lock(_lock_key(op_id), timeout=0):
        with ctx.transaction() as s:
            s.add(
                Operation(
                    id=op_id,
                    kind=kind,
                    target=target,
                    status=OperationStatus.RUNNING,
                    payload=json.dumps(payload, sort_keys=True),
                )
            )
        handle = OpHandle(ctx, op_id, kind)
        try:
            yield handle
        except BaseException as exc:
            # BaseException on purpose: Ctrl-C half-way must be undone too. Never swallowed:
            # the original error is always re-raised below.
            try:
                status = _run_recovery(ctx, load(ctx, op_id))
            except SnapbackError:
                raise exc from None  # recovery failed too: left running for gc to retry
            _finish(ctx, op_id, status, error=str(exc))
            raise
        _finish(ctx, op_id, OperationStatus.DONE)


def _run_recovery(ctx: Context, record: OperationRecord) -> OperationStatus:
    fn = _RECOVERY.get(record.kind)
    if fn is None:
        return OperationStatus.FAILED
    result = fn(ctx, record)
    return OperationStatus.FAILED if result is OperationStatus.ROLLED_BACK else result


def _finish(ctx: Context, op_id: str, status: OperationStatus, error: str | None = None) -> None:
    with ctx.transaction() as s:
        op = s.get(Operation, op_id)
        if op is not None:
            op.status, op.error, op.updated_at = status, error, time.time()


def load(ctx: Context, op_id: str) -> OperationRecord:
    with ctx.sessions() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        steps = tuple(Step(st.name, json.loads(st.data)) for st in op.steps)
        return OperationRecord(op.id, op.kind, op.target, json.loads(op.payload), steps)


def any_running(ctx: Context) -> bool:
    """One cheap query: is any operation marked running (ours, another's, or a dead one's)?"""
    with ctx.sessions() as s:
        return (
            s.scalars(
                select(Operation.id).where(Operation.status == OperationStatus.RUNNING).limit(1)
            ).first()
            is not None
        )


def recover_abandoned(ctx: Context, *, dry_run: bool = False) -> list[str]:
    """Finish or undo every operation whose process died. Returns what was (or would be) done."""
    with ctx.sessions() as s:
        running = s.scalars(
            select(Operation.id).where(Operation.status == OperationStatus.RUNNING)
        ).all()
    done = []
    for op_id in running:
        try:
            with ctx.lock(_lock_key(op_id), timeout=0):
                record = load(ctx, op_id)
                last = record.steps[-1].name if record.steps else "start"
                if dry_run:
                    done.append(f"would recover {record.kind} {record.target} (died after {last})")
                    continue
                status = (
                    _RECOVERY[record.kind](ctx, record)
                    if record.kind in _RECOVERY
                    else OperationStatus.FAILED
                )
                _finish(ctx, op_id, status, error=f"process died after step {last!r}")
                done.append(f"{status.value}: {record.kind} {record.target} (died after {last})")
        except Busy:
            continue  # still running in another process
    return done

"""Stage leases: two runs on one catalog never process the same stage at once.

Acquire = commit an ``acquired`` row, then read every live lease of the stage (acquired,
no ``released`` row). DuckLake commits are totally ordered by snapshot id, so "the live
lease with the lowest snapshot wins" is the same answer for every contender, whichever
reads first: the winner proceeds, the others release their row and refuse with the
holder's run, host, pid and start time. A holder on this host whose process is gone is
stale and released automatically; ``force`` releases every other holder (after a crash on
another machine). Append-only, so it needs nothing DuckLake lacks.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from storage.catalog import Catalog


class StageBusyError(RuntimeError):
    """Another live run holds the stage."""


@dataclass(frozen=True)
class Lease:
    lease_id: str
    stage: str
    run_id: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _row(lease_id: str, stage: str, run_id: str, event: str, message: str = "") -> dict:
    return {
        "lease_id": lease_id,
        "stage": stage,
        "run_id": run_id,
        "event": event,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "event_at": datetime.now(UTC),
        "message": message,
    }


def _unreleased(catalog: Catalog, stage: str) -> list[dict]:
    """Every ``acquired`` lease of ``stage`` without a ``released`` row, oldest first."""
    return catalog.query(
        "SELECT a.lease_id, a.run_id, a.host, a.pid, a.event_at FROM lake.leases a "
        "WHERE a.stage = ? AND a.event = 'acquired' AND a.lease_id NOT IN "
        "(SELECT lease_id FROM lake.leases WHERE event = 'released') "
        "ORDER BY a.snapshot_id, a.rowid",
        [stage],
    ).to_pylist()


def held_by_live_run(catalog: Catalog, stage: str) -> bool:
    """Whether some run may still be processing ``stage``: an unreleased lease whose holder
    is on another host or is a live process here (read-only; stale rows stay until the next
    :func:`acquire` releases them)."""
    return not all(_stale(h) for h in _unreleased(catalog, stage))


def _stale(holder: dict) -> bool:
    """A lease row whose holder was on this host and whose process is gone."""
    return holder["host"] == socket.gethostname() and not _alive(int(holder["pid"]))


def acquire(catalog: Catalog, stage: str, run_id: str, force: bool = False) -> Lease:
    """Hold ``stage`` for ``run_id`` or raise :class:`StageBusyError`."""
    lease_id = uuid.uuid4().hex
    catalog.append("leases", [_row(lease_id, stage, run_id, "acquired")])
    holders = _unreleased(catalog, stage)
    release: list[dict] = []
    live = []
    for h in holders:
        if h["lease_id"] == lease_id:
            live.append(h)
        elif _stale(h):
            release.append(_row(h["lease_id"], stage, h["run_id"], "released", "stale: pid gone"))
        elif force:
            release.append(
                _row(h["lease_id"], stage, h["run_id"], "released", f"forced by {run_id}")
            )
        else:
            live.append(h)
    if release:
        catalog.append("leases", release)
    if live and live[0]["lease_id"] != lease_id:
        catalog.append("leases", [_row(lease_id, stage, run_id, "released", "lost the race")])
        h = live[0]
        raise StageBusyError(
            f"stage {stage!r} is being run by run {h['run_id']} (pid {h['pid']} on "
            f"{h['host']}, since {h['event_at']:%Y-%m-%d %H:%M:%S}); wait for it to finish, "
            "or pass --force if that run crashed"
        )
    return Lease(lease_id, stage, run_id)


def release(catalog: Catalog, lease: Lease) -> None:
    catalog.append("leases", [_row(lease.lease_id, lease.stage, lease.run_id, "released")])

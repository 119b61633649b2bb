"""Run one item through a stage and turn whatever happens into an :class:`Outcome`.

This is the only place that calls ``Stage.process``. It runs inside a worker (Ray actor or
the local process); it never raises for a bad item: typed failures and unexpected
exceptions both become failed outcomes the engine records.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from pydantic import BaseModel, ConfigDict

from storage.store import ArtifactRef
from tasks.base import FailureKind, ItemContext, ItemFailure, Stage


class WorkItem(BaseModel):
    """What the engine sends a worker for one item."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    item_id: str
    item_key: str
    attempt: int
    inputs: Any  # ItemInputs or AggregateInputs


class Outcome(BaseModel):
    """What a worker returns for one item; small and picklable (paths, not tensors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: str
    item_key: str
    attempt: int
    status: str  # done / filtered / failed
    record_type: str = ""
    record_json: str = ""
    error_kind: str = ""
    error_message: str = ""
    retryable: bool = False
    artifacts: list[ArtifactRef] = []
    input_artifact_ids: list[str] = []
    duration_s: float = 0.0
    worker: str = ""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_item(stage: Stage[Any], work: WorkItem) -> Outcome:
    """Process one item; every outcome, including crashes of the stage code, is returned."""
    started = time.perf_counter()
    ctx = ItemContext(stage.env.store(), stage.name, work.item_id, work.item_key)
    base: dict[str, Any] = {
        "item_id": work.item_id,
        "item_key": work.item_key,
        "attempt": work.attempt,
        "worker": worker_name(),
    }
    try:
        record = stage.process(work.inputs, ctx)
        reason = record.rejection_reason()
        return Outcome(
            **base,
            status="filtered" if reason else "done",
            record_type=type(record).__name__,
            record_json=record.model_dump_json(),
            error_message=reason or "",
            artifacts=ctx.artifacts,
            input_artifact_ids=ctx.input_artifact_ids,
            duration_s=time.perf_counter() - started,
        )
    except ItemFailure as exc:
        return Outcome(
            **base,
            status="failed",
            error_kind=str(exc.kind),
            error_message=exc.message,
            retryable=exc.retryable,
            input_artifact_ids=ctx.input_artifact_ids,
            duration_s=time.perf_counter() - started,
        )
    except Exception as exc:  # a bug or an unforeseen input: recorded, retried on resume
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        return Outcome(
            **base,
            status="failed",
            error_kind=str(FailureKind.INTERNAL),
            error_message=f"{type(exc).__name__}: {exc}{where}",
            retryable=True,
            input_artifact_ids=ctx.input_artifact_ids,
            duration_s=time.perf_counter() - started,
        )
    finally:
        ctx.close()

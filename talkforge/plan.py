"""Plans and their parts: what the user asked for, what each stage will do, what it did.

Kept apart from the engine so flows, reporters and the CLI can use the types without
pulling in execution.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from talkforge.stages import STAGE_ORDER, STAGES
from tasks.base import AggregateInputs, ItemInputs, StageEnv
from tasks.runner import Outcome

log = logging.getLogger(__name__)


class RunOptions(BaseModel):
    """What the user asked of a run besides the config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: list[str] = list(STAGE_ORDER)
    limit: int | None = None
    retry_failed: bool = False
    force: bool = False  # take over stage leases held by another (crashed) run


def select_stages(
    stages: list[str] | None = None, from_stage: str | None = None, until: str | None = None
) -> list[str]:
    """Resolve --stages/--from/--until to an ordered list of stage names."""
    for name in [*(stages or []), from_stage, until]:
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_ORDER)}")
    chosen = [s for s in STAGE_ORDER if not stages or s in stages]
    if from_stage:
        chosen = [s for s in chosen if STAGE_ORDER.index(s) >= STAGE_ORDER.index(from_stage)]
    if until:
        chosen = [s for s in chosen if STAGE_ORDER.index(s) <= STAGE_ORDER.index(until)]
    return chosen


@dataclass
class PlannedItem:
    item_id: str
    item_key: str
    action: str  # run / cached / skip_failed
    attempt: int
    input_keys: dict[str, Any] = field(default_factory=dict)  # upstream keys: lineage

    @property
    def runs(self) -> bool:
        return self.action == "run"


Inputs = ItemInputs | AggregateInputs
INPUTS_BLOCK = 1024  # items whose inputs one catalog query builds (StagePlan.inputs_for)
# (item id, its key material) of items that run -> their inputs, in one batch
InputsBuilder = Callable[[list[tuple[str, dict[str, Any]]]], dict[str, Inputs]]


@dataclass
class StagePlan:
    """What one stage will do in a run.

    ``items`` lists every item that runs and every item whose version (key) differs from
    the one its stage holds now — exactly the rows the plan writes to ``plans``. Items
    that stay as they are (cached or skipped, same key) are only counted in ``counts``:
    a plan with nothing to do holds no per-item objects, however large the stage.
    """

    run_id: str
    stage: str
    env: StageEnv
    items: list[PlannedItem] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # action -> items, listed or not
    cached_filtered: int = 0  # of counts["cached"]: the ones cached as filtered
    retried: int = 0  # of counts["run"]: items with an earlier attempt
    blocked_reason: str = ""
    discovery_failures: list[tuple[str, Any]] = field(default_factory=list)  # (raw id, failure)
    dropped: list[str] = field(default_factory=list)  # current items this plan no longer holds
    sources_read: list[str] = field(default_factory=list)  # datasets a dry run read, not ingested
    digest: str = ""  # of everything the plan was made from (talkforge.planner.decide)
    item_rows: int = 0  # the stage's `items` rows once the plan is committed
    build_inputs: InputsBuilder | None = field(default=None, repr=False)
    _built: dict[str, Inputs | None] = field(default_factory=dict, repr=False)
    _position: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        """Items the plan holds (run, cached or skipped; not the dropped ones)."""
        return sum(self.counts.values())

    @property
    def to_run(self) -> list[PlannedItem]:
        return [i for i in self.items if i.runs]

    def inputs_for(self, items: list[PlannedItem]) -> dict[str, Inputs]:
        """The inputs of those of ``items`` that run.

        A plan keeps only each item's key material; inputs (upstream records parsed from
        the catalog) are built as the stage executes, one query per block of
        :data:`INPUTS_BLOCK` items to run (those asked for, then the ones that follow
        them), and handed out once: a 188 k-item plan holds at most one block, and its
        shards cost one query per block, not one per shard. An item the builder leaves
        out is absent (the runner fails it).
        """
        wanted = [i for i in items if i.runs]
        missing = [i for i in wanted if i.item_id not in self._built]
        if missing and self.build_inputs is not None:
            block = missing + self._following(missing[-1], INPUTS_BLOCK - len(missing))
            built = self.build_inputs([(i.item_id, i.input_keys) for i in block])
            self._built = {i.item_id: built.get(i.item_id) for i in block}
        handed = {i.item_id: self._built.pop(i.item_id, None) for i in wanted}
        return {item_id: inputs for item_id, inputs in handed.items() if inputs is not None}

    def _following(self, item: PlannedItem, count: int) -> list[PlannedItem]:
        """Up to ``count`` items to run after ``item``, in plan order."""
        if not self._position:
            self._position = {i.item_id: k for k, i in enumerate(self.items)}
        out: list[PlannedItem] = []
        for k in range(self._position[item.item_id] + 1, len(self.items)):
            if len(out) >= count:
                break
            if self.items[k].runs:
                out.append(self.items[k])
        return out

    def shards(self, size: int) -> list[list[PlannedItem]]:
        work = self.to_run
        return [work[i : i + size] for i in range(0, len(work), size)]

    def count(self, action: str) -> int:
        return self.counts[action]


@dataclass
class StageSummary:
    stage: str
    planned: int = 0
    cached: int = 0
    skipped_failed: int = 0
    done: int = 0
    filtered: int = 0
    failed: int = 0
    seconds: float = 0.0
    blocked_reason: str = ""


class Reporter(Protocol):
    def stage_planned(self, plan: StagePlan) -> None: ...
    def item_finished(self, stage: str, outcome: Outcome) -> None: ...
    def stage_finished(self, summary: StageSummary) -> None: ...


class LogReporter:
    def stage_planned(self, plan: StagePlan) -> None:
        log.info("%s: %d items, %d to run", plan.stage, plan.total, len(plan.to_run))

    def item_finished(self, stage: str, outcome: Outcome) -> None:
        if outcome.status == "failed":
            log.warning(
                "%s %s failed: %s %s",
                stage,
                outcome.item_id,
                outcome.error_kind,
                outcome.error_message,
            )

    def stage_finished(self, summary: StageSummary) -> None:
        log.info("%s finished: %s", summary.stage, summary)


def now_utc() -> datetime:
    return datetime.now(UTC)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a plan builds ~10^5 acyclic objects: Python
    would otherwise walk every live object again and again (a third of a 188 k plan)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


canonical_json = partial(json.dumps, sort_keys=True, separators=(",", ":"), default=str)


def key_frame(common: dict[str, Any]) -> tuple[str, str]:
    """The JSON of ``{**common, "inputs": <material>}`` around the material: (head, tail).

    ``stable_hash({**common, "inputs": keys}) == sha256(head + dumps(keys) + tail)``, so
    the constant part is encoded once per stage, in Python or in SQL
    (:mod:`talkforge.planner`).
    """
    before = canonical_json({k: v for k, v in common.items() if k < "inputs"})[:-1]
    after = canonical_json({k: v for k, v in common.items() if k > "inputs"})[1:]
    head = before + ("," if len(before) > 1 else "") + '"inputs":'
    tail = ("," + after) if len(after) > 1 else "}"
    return head, tail


def key_hasher(common: dict[str, Any]) -> Callable[[Any], str]:
    """``keys -> stable_hash({**common, "inputs": keys})``, byte for byte, for many items."""
    head, tail = key_frame(common)
    return lambda keys: hashlib.sha256((head + canonical_json(keys) + tail).encode()).hexdigest()

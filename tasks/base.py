"""The stage contract every pipeline step implements.

A stage turns one typed input (the committed outputs of its upstream stages for one item)
into one typed output record, or a typed failure. Stages never import Prefect and never
write to the catalog: they write artifact files through :class:`ItemContext` and return a
record; the engine decides what runs, commits results and records failures.

Lifecycle on a worker (a Ray actor or the local process)::

    stage = StageClass(config, env)   # cheap, picklable
    stage.setup()                     # once per worker: load models here
    stage.process(inputs, ctx)        # once per item
    stage.teardown()

Bad input must raise :class:`ItemFailure` with a kind from :class:`FailureKind`; any other
exception is recorded as ``internal`` (retryable) so one broken item never stops a shard.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from models.fingerprint import ModelFingerprint
from storage.store import ArtifactRef, ArtifactStore


class Resources(BaseModel):
    """What one worker of a stage asks the scheduler for, and how work is batched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPU fraction per worker (0 on CPU)")
    num_workers: int = Field(1, ge=1, description="size of the actor pool")
    batch_size: int = Field(1, ge=1, description="items or frames per model call")


class StageConfig(BaseModel):
    """Base of every stage section in the YAML config.

    ``resources`` change where and how fast work runs, not what it produces, so they are
    excluded from :meth:`params_hash` and changing them never invalidates artifacts.
    Defaults go through validators too, so a default and its stored, reloaded copy hash
    the same (a resumed run must not see a "changed" config).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    resources: Resources = Resources()

    def params_hash(self) -> str:
        params = self.model_dump(mode="json", exclude={"resources"})
        return stable_hash(params)


class FailureKind(StrEnum):
    """Typed per-item failure kinds stored in the catalog's ``failures`` view."""

    UNAVAILABLE = "unavailable"  # source removed / 404
    PRIVATE = "private"
    GEO_BLOCKED = "geo_blocked"
    BOT_CHECK = "bot_check"
    RATE_LIMITED = "rate_limited"
    NETWORK = "network"
    FORMAT = "format"  # no usable stream, truncated or undecodable media
    FFMPEG = "ffmpeg"
    BAD_METADATA = "bad_metadata"  # manifest row that cannot describe a clip
    NO_FACE = "no_face"
    FACE_LOST = "face_lost"
    MISALIGNED = "misaligned"  # streams disagree (e.g. audio vs video length)
    MODEL = "model"  # missing or unloadable weights
    INTERNAL = "internal"  # unexpected exception: a bug, retried on resume


RETRYABLE_KINDS = frozenset(
    {FailureKind.RATE_LIMITED, FailureKind.NETWORK, FailureKind.BOT_CHECK, FailureKind.INTERNAL}
)


class ItemFailure(Exception):
    """Raised by ``Stage.process`` for bad input; becomes a failure row, never a crash."""

    def __init__(self, kind: FailureKind, message: str, *, retryable: bool | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = FailureKind(kind)
        self.message = message
        self.retryable = kind in RETRYABLE_KINDS if retryable is None else retryable

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Ray pools)
        return (_rebuild_failure, (self.kind, self.message, self.retryable))


def _rebuild_failure(kind: FailureKind, message: str, retryable: bool) -> ItemFailure:
    return ItemFailure(kind, message, retryable=retryable)


class Record(BaseModel):
    """A typed stage-boundary record, serialised as JSON in the catalog.

    Subclasses may override :meth:`rejection_reason` (filters) and :meth:`stats_rows`
    (rows for the per-item stats tables ops query with SQL).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def rejection_reason(self) -> str | None:
        """A non-None reason marks the item ``filtered``: kept in the catalog, not passed on."""
        return None

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Rows to append to stats tables, keyed by table name (see storage/schema.py)."""
        return {}


class StageEnv(BaseModel):
    """Everything a worker needs besides the stage config; picklable and small."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_root: str
    store_uri: str
    run_id: str
    model_fingerprints: dict[str, ModelFingerprint] = {}
    holdout_fraction: float = 0.0  # share of clips held out from engram/train for evaluation
    split_seed: int = 0
    # the planned split's held-out clip ids (tasks.split), set for stages with ``uses_split``;
    # None: no planned split (library use), each clip is its own group
    heldout_ids: frozenset[str] | None = None

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_uri)


class ItemInputs(BaseModel):
    """Committed upstream records for one item, keyed by upstream stage name.

    ``shared`` holds outputs of aggregate upstream stages (e.g. the trained checkpoint),
    identical for every item.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    item_id: str
    records: dict[str, Record] = {}
    shared: dict[str, Record] = {}
    source: Record | None = None  # the manifest record, for the first stage

    def get(self, stage: str, record_type: type[R]) -> R:
        rec = self.records.get(stage) or self.shared.get(stage)
        if rec is None:
            raise KeyError(f"item {self.item_id!r} has no committed {stage!r} output")
        if not isinstance(rec, record_type):
            raise TypeError(f"{stage!r} output is {type(rec).__name__}, not {record_type.__name__}")
        return rec


class AggregateInputs(BaseModel):
    """Inputs of a stage that sees all items at once (engram, train)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    item_id: str
    items: list[ItemInputs]
    shared: dict[str, Record] = {}


R = TypeVar("R", bound=Record)
C = TypeVar("C", bound=StageConfig)


class ItemContext:
    """Per-item scratch space and the only way a stage creates artifacts.

    ``scratch`` is a private temporary directory removed after the item. ``commit`` moves a
    finished file into the store under a key-derived path (atomically: temp name, then
    rename) and returns its :class:`ArtifactRef`; the engine records it after the item.
    Input artifacts read through :meth:`local_path` are remembered as lineage.
    """

    def __init__(self, store: ArtifactStore, stage: str, item_id: str, item_key: str):
        self.store = store
        self.stage = stage
        self.item_id = item_id
        self.item_key = item_key
        self._tmp = tempfile.TemporaryDirectory(prefix=f"tf-{stage}-")
        self.scratch = Path(self._tmp.name)
        self.artifacts: list[ArtifactRef] = []
        self.input_artifact_ids: list[str] = []

    def commit(
        self,
        src: Path,
        name: str,
        kind: str,
        *,
        owner: tuple[str, str] | None = None,
    ) -> ArtifactRef:
        """Commit ``src`` as artifact ``name``.

        ``owner=(owner_id, owner_key)`` files the artifact under another id, for artifacts
        shared by several items (one raw download serving many clips of a source video).
        """
        owner_id, owner_key = owner or (self.item_id, self.item_key)
        ref = self.store.commit_file(src, self.stage, owner_id, owner_key, name, kind)
        self.artifacts.append(ref)
        return ref

    def record_existing(self, ref: ArtifactRef) -> ArtifactRef:
        """Count an already committed artifact (e.g. a cached shared download) as produced here."""
        if all(a.artifact_id != ref.artifact_id for a in self.artifacts):
            self.artifacts.append(ref)
        return ref

    def local_path(self, ref: ArtifactRef) -> Path:
        if ref.artifact_id not in self.input_artifact_ids:
            self.input_artifact_ids.append(ref.artifact_id)
        return self.store.local_path(ref.uri, cache_dir=self.scratch)

    def close(self) -> None:
        self._tmp.cleanup()


@dataclass(frozen=True)
class PriorOutput:
    """The latest ``done`` output of ``stage`` (any run, current or not) whose record has
    every attribute of ``match`` equal to the given value."""

    stage: str
    match: dict[str, str]

    def describe(self) -> str:
        return f"{self.stage} output with " + ", ".join(f"{k}={v}" for k, v in self.match.items())


class Stage(ABC, Generic[C]):
    """One pipeline step. Class attributes declare how the engine wires and versions it.

    - ``name``: stage name, also the config section name.
    - ``code_version``: bump when the output of the same inputs changes; part of every key.
    - ``requires``: upstream stages whose committed outputs this stage consumes.
    - ``aggregate``: True when one output is built from all items (``process`` then gets
      :class:`AggregateInputs` and the item id is the stage name).
    - ``config_type``: the stage's :class:`StageConfig` subclass.
    - ``uses_split``: the engine puts the planned split into ``env.heldout_ids``.
    - ``history_of``: aggregate upstream stages whose whole committed history it reads.
    - ``partner_inputs``: per-item upstream stages read for the item's partner as well.
    """

    name: ClassVar[str]
    code_version: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    aggregate: ClassVar[bool] = False
    config_type: ClassVar[type[StageConfig]]
    uses_split: ClassVar[bool] = False  # gets the planned split's held-out ids (tasks.split)
    # aggregate upstream stages whose every committed ``done`` version (not only the current
    # one) reaches ``process`` as ``shared["<stage>@history"]`` (a ``CommittedHistory``)
    history_of: ClassVar[tuple[str, ...]] = ()
    # per-item upstream stages whose records of the item's partner (:meth:`partners`) reach
    # ``process`` too, as ``records["<stage>@partner"]`` (their keys enter the item's key)
    partner_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: C, env: StageEnv):
        self.config = config
        self.env = env
        # name -> tasks.pools.ModelPool; remote pools are attached by the executor before
        # setup(), which builds local ones for the rest (see tasks.pools)
        self.pools: dict[str, Any] = {}
        # the distributed-training launcher (tasks.train_data.TrainLauncher), attached by the
        # executor like the pools; only stages that train use it
        self.trainer: Any = None

    @classmethod
    def actor_resources(cls, config: C) -> Resources:
        """What one worker of this stage reserves (default: ``config.resources``).

        A stage that schedules its own workers (training on Ray Train) reserves little for
        the process that drives them and gives ``config.resources`` to those workers.
        """
        return config.resources

    def prior_outputs(self) -> dict[str, PriorOutput]:
        """Committed outputs of earlier runs this stage builds on, by input name (e.g. the
        checkpoint a training stage starts from). The planner looks each up in the catalog
        and passes it in ``shared``; its item key becomes part of this stage's keys."""
        return {}

    def partners(self, item_ids: list[str]) -> dict[str, str]:
        """Item id -> another planned item whose ``partner_inputs`` it reads (e.g. the clip
        whose audio drives a cross-audio generation); items without one are left out."""
        return {}

    def model_specs(self) -> list[Any]:
        """Models this stage loads (``models.registry.ModelSpec``); fingerprinted into keys."""
        return []

    def pool_specs(self) -> list[Any]:
        """Models that run behind :mod:`tasks.pools` (``PoolSpec`` each); most stages: none."""
        return []

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        """Whether this stage runs for an item (e.g. generate only for held-out clips).

        ``shared`` holds the committed outputs of aggregate upstream stages.
        """
        return True

    def setup(self) -> None:
        """Load models once per worker."""

    def teardown(self) -> None:
        """Release worker resources."""

    @abstractmethod
    def process(self, inputs: Any, ctx: ItemContext) -> Record:
        """Process one item (or all items for aggregate stages); raise ItemFailure on bad data."""


@dataclass
class SourceManifest:
    """What one dataset's published metadata says, read before anything is fetched.

    ``records`` become items; ``problems`` are rows that cannot (recorded as failed items);
    ``warnings`` are oddities that did not stop a row. ``metadata_sha256`` fingerprints the
    files read, so re-reading unchanged metadata is recognised; ``summary`` holds the
    reader's own counts (published numbers are pinned against them in tests).

    ``records`` is a list, except in a manifest from :attr:`ManifestSource.stream`: there
    it may be a one-shot iterator, and ``problems``, ``warnings`` and ``summary`` are
    complete only once it is exhausted.
    """

    dataset: str
    kind: str
    licence: str
    metadata_files: list[str]
    metadata_sha256: str
    records: list[Any] | Iterator[Any]
    problems: list[tuple[str, ItemFailure]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ManifestSource:
    """One dataset a source stage reads, before it is read.

    ``fingerprint`` covers everything the manifest is made from (the metadata files'
    bytes, the dataset's settings, the reader's code): the planner compares it with the
    one stored with the dataset's current ingest and, when equal, uses the stored rows
    instead of calling ``read``. An empty fingerprint means "unknown": always read.
    ``stream`` (optional) reads the same manifest for an ingest that writes its records
    chunk by chunk and keeps none (see :class:`SourceManifest`); ``read`` returns lists.
    """

    dataset: str
    fingerprint: str
    read: Callable[[], SourceManifest]
    stream: Callable[[], SourceManifest] | None = None


class SourceStage(Stage[C]):
    """The first stage: its items come from dataset metadata, not from an upstream stage."""

    @classmethod
    def manifest_sources(cls, config: C, env: StageEnv) -> list[ManifestSource]:
        """The datasets to read, each with its fingerprint (default: read now, unknown)."""
        return [
            ManifestSource(m.dataset, "", lambda m=m: m) for m in cls.read_manifests(config, env)
        ]

    @classmethod
    @abstractmethod
    def read_manifests(cls, config: C, env: StageEnv) -> list[SourceManifest]:
        """Read every configured dataset's metadata (cheap: no media is touched).

        Each record must expose ``clip_id`` (a safe id, unique across datasets); a row that
        cannot become a record is a ``(raw_id, ItemFailure)`` problem.
        """

    @classmethod
    def discover(
        cls, manifests: list[SourceManifest]
    ) -> tuple[list[Any], list[tuple[str, ItemFailure]]]:
        """The items of ``manifests`` plus per-row failures.

        A clip id seen twice (the same dataset listed twice) is kept once; the repeat is a
        ``BAD_METADATA`` failure under a ``#dup`` suffix so it never shadows the kept clip.
        """
        unique: dict[str, Any] = {}
        problems: list[tuple[str, ItemFailure]] = []
        for manifest in manifests:
            problems += manifest.problems
            for record in manifest.records:
                if record.clip_id in unique:
                    message = f"duplicate clip id {record.clip_id} (dataset {manifest.dataset})"
                    failure = ItemFailure(FailureKind.BAD_METADATA, message)
                    problems.append((f"{record.clip_id}#dup", failure))
                    continue
                unique[record.clip_id] = record
        return list(unique.values()), problems


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON encoding: equal values hash equally across processes."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()

"""Model pools: where a stage's models run, behind one submit / result interface.

A stage that runs several models (the features stage: VAE, LivePortrait, EMOCA, DINOv2,
HuBERT, SenseVoice) declares one :class:`PoolSpec` per model in ``Stage.pool_specs()``.
Each spec names a picklable ``factory`` that builds a :class:`PoolWorker` (loading its model
once), the worker's own :class:`~tasks.base.Resources` (CPUs, GPU fraction, pool size,
batch size) and whether it gets an actor pool of its own (``remote``).

- ``remote=False`` (or no Ray executor): the worker is built inside the stage's worker
  process and called in-line (:class:`LocalPool`). Nothing crosses a process boundary.
- ``remote=True`` with the Ray executor: ``talkforge.executors`` starts
  ``resources.num_workers`` actors for the spec, each building the worker once, and hands
  the stage a pool client with the same interface. Calls return at once; the stage decodes
  the next chunk while the actors infer (CPU decoding overlaps GPU inference).

Stage code is the same in both cases: ``handle = pool.submit("method", *args)`` then
``handle.result()``. Exceptions raised by the worker (``ItemFailure`` included) surface at
``result()``. This module imports neither Ray nor Prefect.
"""

from __future__ import annotations

import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tasks.base import Resources


class PoolWorker(Protocol):
    """A loaded model plus the methods a stage calls on it (by name, through a pool)."""


@dataclass(frozen=True)
class PoolSpec:
    """One model pool a stage needs (see module docstring)."""

    name: str
    factory: Callable[[], PoolWorker]
    resources: Resources
    remote: bool


class PoolTask(ABC):
    """A submitted call; :meth:`result` blocks until its value (or error) is ready."""

    @abstractmethod
    def result(self) -> Any: ...


class ModelPool(ABC):
    """Where calls to one model go."""

    name: str

    @abstractmethod
    def submit(self, method: str, *args: Any) -> PoolTask:
        """Call ``worker.<method>(*args)``; returns at once where the pool is remote."""


class _Done(PoolTask):
    def __init__(self, value: Any = None, error: BaseException | None = None):
        self._value, self._error = value, error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class LocalPool(ModelPool):
    """The worker lives in this process; ``submit`` runs the call before returning."""

    def __init__(self, name: str, worker: PoolWorker):
        self.name = name
        self.worker = worker

    def submit(self, method: str, *args: Any) -> PoolTask:
        try:
            return _Done(getattr(self.worker, method)(*args))
        except Exception as exc:  # re-raised at result(), as a remote pool would
            return _Done(error=exc)


def complete_pools(specs: list[PoolSpec], attached: dict[str, ModelPool]) -> dict[str, ModelPool]:
    """``attached`` remote pools plus a :class:`LocalPool` for every other spec (built now)."""
    pools = dict(attached)
    for spec in specs:
        if spec.name not in pools:
            pools[spec.name] = LocalPool(spec.name, spec.factory())
    return pools


def build_worker(target: str, *args: Any, **kwargs: Any) -> PoolWorker:
    """A factory that names its worker: ``target`` (``"module:Class"``) imported and built.

    A ``partial`` of this top-level function pickles by reference, so Ray ships it to the
    pool's actors, and the worker's module (torch, the model wrappers) is imported only in
    the process that builds the worker: listing a stage's pools stays light."""
    return pkgutil.resolve_name(target)(*args, **kwargs)

"""Ray actor pools for a stage's models (the remote side of :mod:`tasks.pools`).

For every ``PoolSpec`` with ``remote=True`` the Ray executor starts ``num_workers`` actors
of :class:`PoolActor` with the spec's CPUs and GPU fraction. Each builds its model worker
once. Stage workers reach them through :class:`RayPool`, which spreads calls round-robin
and returns at once. Pool actors are stateless between calls, so Ray itself replaces one
that dies (``max_restarts``) and re-runs the calls it had (``max_task_retries``); only when
those are spent does a call fail, as a retryable ``INTERNAL`` item failure.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from tasks.base import FailureKind, ItemFailure, Resources
from tasks.pools import ModelPool, PoolSpec, PoolTask
from tasks.runner import worker_name


class PoolActor:
    """Body of one pool actor: the model worker, built once, called by method name."""

    def __init__(self, name: str, factory: Any, num_cpus: float):
        import torch

        torch.set_num_threads(max(1, math.floor(num_cpus)))
        self.name = name
        self.worker = factory()
        self.calls = 0

    def call(self, method: str, *args: Any) -> Any:
        self.calls += 1
        return getattr(self.worker, method)(*args)

    def describe(self) -> dict[str, Any]:
        info = {"pool": self.name, "worker": worker_name(), "calls": self.calls}
        describe = getattr(self.worker, "describe", None)
        return {**info, **(describe() if describe else {})}


class _RayTask(PoolTask):
    def __init__(self, ref: Any, pool: str):
        self.ref, self.pool = ref, pool

    def result(self) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(self.ref)
        except RayTaskError as exc:  # the worker raised: give the stage the original error
            if isinstance(exc.cause, Exception):
                raise exc.cause from None
            raise
        except RayActorError as exc:
            raise ItemFailure(
                FailureKind.INTERNAL,
                f"{self.pool} pool actor died and its restarts are spent: {exc}",
                retryable=True,
            ) from exc


class RayPool(ModelPool):
    """Client of one model's actor pool (picklable: it travels to the stage workers)."""

    def __init__(self, name: str, actors: list[Any]):
        if not actors:
            raise ValueError(f"pool {name!r} has no actors")
        self.name = name
        self.actors = actors
        self._turn = itertools.count()

    def __reduce__(self) -> tuple[Any, ...]:
        return (RayPool, (self.name, self.actors))

    def submit(self, method: str, *args: Any) -> PoolTask:
        actor = self.actors[next(self._turn) % len(self.actors)]
        return _RayTask(actor.call.remote(method, *args), self.name)


def start_pool(ray: Any, spec: PoolSpec, restarts: int) -> list[Any]:
    """``spec.resources.num_workers`` actors for one remote pool spec."""
    res = spec.resources
    actor_cls = ray.remote(PoolActor).options(
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        max_restarts=restarts,
        max_task_retries=restarts,
    )
    return [actor_cls.remote(spec.name, spec.factory, res.num_cpus) for _ in range(res.num_workers)]


def check_fits(
    stage: str, workers: int, worker_res: Resources, specs: list[PoolSpec], available: dict
) -> None:
    """Refuse, with the arithmetic, a stage whose actors cannot all be placed at once.

    Ray would otherwise leave the last actors pending forever. Used for local instances,
    whose resources are fixed; a cluster may autoscale, so it is not checked there.
    """
    for key, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        parts = [(f"{workers} stage workers", workers * getattr(worker_res, attr))]
        for s in specs:
            n = s.resources.num_workers
            parts.append((f"{n} {s.name}", n * getattr(s.resources, attr)))
        needed = sum(amount for _, amount in parts)
        have = float(available.get(key, 0.0))
        if needed > have + 1e-9:
            detail = ", ".join(f"{label}: {amount:g}" for label, amount in parts if amount)
            raise ValueError(
                f"{stage}: its actors need {needed:g} {key} ({detail}) but this Ray instance "
                f"has {have:g}; lower {stage}.pools.*.{attr} / num_workers or use a cluster"
            )


class PoolStartTimeout(RuntimeError):
    """A stage's actors were not all placed and set up within ``ray.start_timeout_s``."""


def wait_started(
    ray: Any, stage: str, groups: list[tuple[str, Resources, list[Any]]], timeout_s: float
) -> None:
    """Block until every actor of ``groups`` (label, per-actor resources, actors) is up.

    An existing cluster is not checked up front (it may autoscale), so an actor asking for
    resources no node has would otherwise stay pending and the run would hang silently.
    After ``timeout_s`` the actors are killed and :class:`PoolStartTimeout` names, per
    group, what was asked and how many started, beside the cluster's total and free
    resources. The wait also covers each actor's ``setup()`` (model loading).
    """
    refs = {a.__ray_ready__.remote(): label for label, _, actors in groups for a in actors}
    if not refs:
        return
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if not pending:
        return
    waiting = [refs[r] for r in pending]
    for _, _, actors in groups:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    asked = "; ".join(
        f"{len(actors)} {label} × (CPU {res.num_cpus:g}, GPU {res.num_gpus:g}): "
        f"{len(actors) - waiting.count(label)} started"
        for label, res, actors in groups
    )
    raise PoolStartTimeout(
        f"{stage}: {len(pending)} of {len(refs)} actors not started within {timeout_s:g} s "
        f"(ray.start_timeout_s). Asked: {asked}. The cluster has "
        f"{_resources(ray.cluster_resources())}, free {_resources(ray.available_resources())}. "
        f"Lower {stage}.resources / pools, or add nodes with those resources."
    )


def _resources(res: dict) -> str:
    return ", ".join(f"{k} {float(res.get(k, 0.0)):g}" for k in ("CPU", "GPU"))

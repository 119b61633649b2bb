"""Where items run: the local process, or a Ray actor pool (local instance or a cluster).

Both executors keep one stage instance per worker for the whole stage, so ``setup()``
(model loading) runs once per worker, never once per item. The Ray pool gives every actor
two items in flight so a worker never idles while the driver commits, replaces an actor
that dies and re-queues its item, and takes CPUs, GPU fraction and pool size from the
stage's ``resources``. A stage's remote model pools (``Stage.pool_specs``, e.g. one per
feature extractor) are started beside its workers and handed to them
(:mod:`talkforge.ray_pools`); the local executor builds every model in-process.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from talkforge.config import ExecutionConfig, RayConfig
from talkforge.ray_pools import PoolStartTimeout, RayPool, check_fits, start_pool, wait_started
from talkforge.ray_train import RayTrainLauncher
from tasks.base import FailureKind, Stage, StageConfig, StageEnv
from tasks.runner import Outcome, WorkItem, run_item, worker_name

log = logging.getLogger(__name__)

OnOutcome = Callable[[Outcome], None]


class LocalExecutor:
    """Runs items one after another in this process (debugging, tests, tiny runs).

    Training still runs on Ray Train (a local Ray started on demand, or ``ray_config``'s).
    """

    def __init__(self, ray_config: RayConfig | None = None) -> None:
        self._stages: dict[str, Stage[Any]] = {}
        self._ray_config = ray_config or RayConfig()

    def run(
        self,
        stage_cls: type[Stage[Any]],
        config: StageConfig,
        env: StageEnv,
        items: list[WorkItem],
        on_outcome: OnOutcome,
    ) -> None:
        key = _pool_key(stage_cls, config, env)
        stage = self._stages.get(key)
        if stage is None:
            stage = stage_cls(config, env)
            stage.trainer = RayTrainLauncher(self._ray_config)
            stage.setup()
            self._stages[key] = stage
        for work in items:
            on_outcome(run_item(stage, work))

    def release(self, stage_name: str) -> None:
        for key in [k for k in self._stages if k.startswith(f"{stage_name}:")]:
            self._stages.pop(key).teardown()

    def close(self) -> None:
        for stage in self._stages.values():
            stage.teardown()
        self._stages.clear()


class StageWorker:
    """Body of a Ray actor: one stage instance, set up once, processing many items."""

    def __init__(
        self,
        stage_cls: type[Stage[Any]],
        config: StageConfig,
        env: StageEnv,
        model_pools: dict[str, list[Any]],
    ):
        import torch

        # a worker uses the CPUs it reserved, not every core (2 workers would oversubscribe)
        torch.set_num_threads(max(1, int(stage_cls.actor_resources(config).num_cpus)))
        self.stage = stage_cls(config, env)
        self.stage.pools = {name: RayPool(name, actors) for name, actors in model_pools.items()}
        self.stage.trainer = RayTrainLauncher(None)  # joins the Ray this actor runs on
        self.stage.setup()
        self.setup_calls = 1

    def process(self, work: WorkItem) -> Outcome:
        return run_item(self.stage, work)

    def describe(self) -> dict[str, Any]:
        return {"worker": worker_name(), "setup_calls": self.setup_calls}


class RayExecutor:
    """Runs items on a pool of Ray actors per stage; starts or joins Ray lazily."""

    SLOTS_PER_ACTOR = 2

    def __init__(self, ray_config: RayConfig, execution: ExecutionConfig):
        self.ray_config = ray_config
        self.execution = execution
        self._pools: dict[str, list[Any]] = {}
        self._model_pools: dict[str, dict[str, list[Any]]] = {}
        self._started_ray = False

    def _ensure_ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            address = self.ray_config.address or os.environ.get("RAY_ADDRESS")
            env_vars = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TORCH_"))}
            ray.init(
                address=address,
                num_cpus=None if address else self.ray_config.num_cpus,
                num_gpus=None if address else self.ray_config.num_gpus,
                namespace=self.ray_config.namespace,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env_vars} if env_vars else None,
            )
            self._started_ray = True
        return ray

    def _pool_size(self, ray: Any, stage_cls: type[Stage[Any]], config: StageConfig) -> int:
        res = stage_cls.actor_resources(config)
        wanted = res.num_workers
        if not (
            self.ray_config.address or os.environ.get("RAY_ADDRESS")
        ):  # local instance: do not ask for more than exists
            cpus = ray.cluster_resources().get("CPU", 1)
            fits = int(cpus // res.num_cpus) if res.num_cpus > 0 else wanted  # 0 CPU: any
            wanted = max(1, min(wanted, fits or 1))
        return wanted

    def _new_actor(
        self, ray: Any, stage_cls: type[Stage[Any]], config: StageConfig, env: StageEnv
    ) -> Any:
        res = stage_cls.actor_resources(config)
        actor_cls = ray.remote(StageWorker).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=0
        )
        model_pools = self._model_pools[_pool_key(stage_cls, config, env)]
        return actor_cls.remote(stage_cls, config, env, model_pools)

    def pool(self, stage_cls: type[Stage[Any]], config: StageConfig, env: StageEnv) -> list[Any]:
        ray = self._ensure_ray()
        key = _pool_key(stage_cls, config, env)
        if key not in self._pools:
            self.release(stage_cls.name)
            size = self._pool_size(ray, stage_cls, config)
            specs = [s for s in stage_cls(config, env).pool_specs() if s.remote]
            if specs and not (self.ray_config.address or os.environ.get("RAY_ADDRESS")):
                res = stage_cls.actor_resources(config)
                check_fits(stage_cls.name, size, res, specs, ray.cluster_resources())
            restarts = self.execution.actor_restarts
            self._model_pools[key] = {s.name: start_pool(ray, s, restarts) for s in specs}
            self._pools[key] = [self._new_actor(ray, stage_cls, config, env) for _ in range(size)]
            groups = [(s.name, s.resources, self._model_pools[key][s.name]) for s in specs]
            groups.append(("stage workers", stage_cls.actor_resources(config), self._pools[key]))
            try:
                wait_started(ray, stage_cls.name, groups, self.ray_config.start_timeout_s)
            except PoolStartTimeout:
                del self._pools[key], self._model_pools[key]
                raise
        return self._pools[key]

    def run(
        self,
        stage_cls: type[Stage[Any]],
        config: StageConfig,
        env: StageEnv,
        items: list[WorkItem],
        on_outcome: OnOutcome,
    ) -> None:
        from ray.exceptions import RayActorError, WorkerCrashedError

        ray = self._ensure_ray()
        actors = self.pool(stage_cls, config, env)
        pending: deque[tuple[WorkItem, int]] = deque((w, 0) for w in items)
        inflight: dict[Any, tuple[int, WorkItem, int]] = {}
        load = [0] * len(actors)
        while pending or inflight:
            while pending and min(load) < self.SLOTS_PER_ACTOR:
                idx = load.index(min(load))  # the least loaded actor: spread before queueing
                work, restarts = pending.popleft()
                inflight[actors[idx].process.remote(work)] = (idx, work, restarts)
                load[idx] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                idx, work, restarts = inflight.pop(ref)
                load[idx] -= 1
                try:
                    on_outcome(ray.get(ref))
                except (RayActorError, WorkerCrashedError) as exc:
                    log.warning("worker for %s died on %s: %s", stage_cls.name, work.item_id, exc)
                    self._replace_dead(ray, actors, idx, stage_cls, config, env, inflight, pending)
                    load[idx] = 0
                    if restarts < self.execution.actor_restarts:
                        pending.append((work, restarts + 1))
                    else:
                        on_outcome(_worker_died(work, restarts))

    def _replace_dead(
        self,
        ray: Any,
        actors: list[Any],
        idx: int,
        stage_cls: type[Stage[Any]],
        config: StageConfig,
        env: StageEnv,
        inflight: dict[Any, tuple[int, WorkItem, int]],
        pending: deque[tuple[WorkItem, int]],
    ) -> None:
        """Swap in a fresh actor; items queued on the dead one go back to the queue."""
        for ref in [r for r, (i, _, _) in inflight.items() if i == idx]:
            _, work, restarts = inflight.pop(ref)
            pending.appendleft((work, restarts))
        ray.kill(actors[idx], no_restart=True)
        actors[idx] = self._new_actor(ray, stage_cls, config, env)

    def describe_workers(self, stage_name: str) -> list[dict[str, Any]]:
        ray = self._ensure_ray()
        actors = [
            a for k, pool in self._pools.items() if k.startswith(f"{stage_name}:") for a in pool
        ]
        return ray.get([a.describe.remote() for a in actors])

    def describe_model_pools(self, stage_name: str) -> list[dict[str, Any]]:
        """One row per model-pool actor of a stage: pool, process, calls, device."""
        ray = self._ensure_ray()
        actors = [
            a
            for k, pools in self._model_pools.items()
            if k.startswith(f"{stage_name}:")
            for pool in pools.values()
            for a in pool
        ]
        return ray.get([a.describe.remote() for a in actors])

    def release(self, stage_name: str) -> None:
        import ray

        for key in [k for k in self._pools if k.startswith(f"{stage_name}:")]:
            for actor in self._pools.pop(key):
                ray.kill(actor, no_restart=True)
            for pool in self._model_pools.pop(key, {}).values():
                for actor in pool:
                    ray.kill(actor, no_restart=True)

    def close(self) -> None:
        import ray

        for key in list(self._pools):
            self.release(key.split(":", 1)[0])
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False


def _pool_key(stage_cls: type[Stage[Any]], config: StageConfig, env: StageEnv) -> str:
    """Workers are reused while the stage's whole config (resources included) is unchanged."""
    return f"{stage_cls.name}:{config.model_dump_json()}:{env.model_dump_json()}"


def _worker_died(work: WorkItem, restarts: int) -> Outcome:
    return Outcome(
        item_id=work.item_id,
        item_key=work.item_key,
        attempt=work.attempt,
        status="failed",
        error_kind=str(FailureKind.INTERNAL),
        error_message=f"worker process died {restarts + 1} times on this item",
        retryable=True,
    )


def make_executor(ray_config: RayConfig, execution: ExecutionConfig) -> LocalExecutor | RayExecutor:
    if execution.executor == "local":
        return LocalExecutor(ray_config)
    return RayExecutor(ray_config, execution)

"""Training on Ray Train (the Ray side of :class:`tasks.train_data.TrainLauncher`).

The train stage calls :meth:`RayTrainLauncher.fit` with a :class:`~tasks.train_data.TrainJob`.
The launcher joins the Ray the stage runs on (a stage actor's cluster, or the local
instance the local executor starts on demand) and starts a small **driver actor** whose
``runtime_env`` carries the work-dir lock's run token and owner (:mod:`tasks.lifetime`).
The driver runs ``TorchTrainer.fit()``; Ray Train's controller, its training workers and
their loader processes inherit that environment, so every process of the run can be found
by its token, and each watches the stage process that owns the run.

- ``ScalingConfig`` comes from the stage's ``resources``: ``num_workers`` workers with
  ``num_cpus`` CPUs and ``num_gpus`` GPUs each (GPU and NCCL when ``num_gpus > 0``,
  otherwise CPU and gloo).
- ``RunConfig(storage_path=<work dir>, name="ray-<manifest fingerprint>")``: checkpoints go
  into the stage's persistent work dir, and a fit with the same manifest (the engine
  retrying the same item key, or a new driver after a kill) finds the run's checkpoint
  snapshot there and resumes from its latest checkpoint. ``CheckpointConfig`` keeps two.
- ``FailureConfig(max_failures)``: a lost worker (killed, OOM, node gone) restarts the
  worker group from the latest checkpoint inside the same fit.

Multi-node runs need the data root (feature files, work dir) on storage every node sees,
as Ray Train needs for its ``storage_path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.base import FailureKind, ItemFailure

if TYPE_CHECKING:  # the workers import this module: keep it free of the pipeline config
    from talkforge.config import RayConfig
    from tasks.train_checkpoint import CheckpointState
    from tasks.train_data import TrainJob, TrainResult
# the training modules (torch) are imported by the functions that train: every executor
# makes a launcher, and a process that trains nothing never loads torch for it

FORWARDED_ENV_PREFIXES = ("HF_", "TORCH_", "TRANSFORMERS_", "OMP_", "CUDA_", "RAY_TRAIN_")
CONTROLLER_RETRIES = 2
HEALTH_CHECK_ENV, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"  # Ray's default: 2


class RaySession:
    """:class:`tasks.train_loop.TrainSession` on ``ray.train``."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def restore(self) -> CheckpointState | None:
        import ray.train

        from tasks.train_checkpoint import load_checkpoint

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_checkpoint(Path(directory))

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = (
            None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(checkpoint_dir)
        )
        ray.train.report(metrics, checkpoint=checkpoint)
        # report() only queues the checkpoint for the controller; wait until it is committed
        # (registered and in the run's snapshot) so a worker or driver lost during the next
        # steps resumes from it, never from an older one
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )


def train_worker_entry(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: read the manifest, run the one training loop."""
    import torch

    from tasks.train_data import TrainManifest
    from tasks.train_loop import run_worker

    torch.set_num_threads(max(1, int(config["threads"])))
    run_worker(TrainManifest.read(Path(config["manifest"])), RaySession())


class TrainDriver:
    """Body of the driver actor: runs one ``TorchTrainer.fit`` and returns where its last
    checkpoint is."""

    def fit(self, job: TrainJob) -> str:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from tasks.lifetime import guard_current_process

        guard_current_process()  # this driver dies with the stage process that owns the run
        use_gpu = job.num_gpus > 0
        resources = {"CPU": job.num_cpus, **({"GPU": job.num_gpus} if use_gpu else {})}
        trainer = TorchTrainer(
            train_worker_entry,
            train_loop_config={"manifest": str(job.manifest_path), "threads": job.num_cpus},
            scaling_config=ScalingConfig(
                num_workers=job.world_size, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=job.run_name,
                storage_path=str(job.work_dir),
                # a worker group that cannot be placed (60 s each) fails the item after
                # a few tries instead of waiting forever
                failure_config=FailureConfig(
                    max_failures=job.max_failures, controller_failure_limit=CONTROLLER_RETRIES
                ),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        return str(result.checkpoint.path)


def _ensure_ray(ray_config: RayConfig | None) -> Any:
    """The Ray this process is connected to, else the configured cluster / a local one."""
    import ray

    if not ray.is_initialized():
        address = (ray_config and ray_config.address) or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            num_cpus=None if address or not ray_config else ray_config.num_cpus,
            num_gpus=None if address or not ray_config else ray_config.num_gpus,
            namespace=ray_config.namespace if ray_config else "talkforge",
            include_dashboard=False,
            log_to_driver=False,
        )
    return ray


def _failure(exc: BaseException) -> ItemFailure:
    """A typed failure for a fit that raised: configuration problems are permanent."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    causes = list(getattr(cause, "worker_failures", {}).values()) or [cause]
    inner = [getattr(c, "cause", c) for c in causes]
    permanent = any(isinstance(c, ValueError) for c in inner)
    first = str(inner[0]).strip().splitlines()
    return ItemFailure(
        FailureKind.FORMAT if permanent else FailureKind.INTERNAL,
        f"train: Ray Train fit failed: {type(inner[0]).__name__}: {(first or [''])[-1][:500]}",
        retryable=not permanent,
    )


class RayTrainLauncher:
    """``tasks.train_data.TrainLauncher`` on Ray Train (see module docstring)."""

    def __init__(self, ray_config: RayConfig | None = None):  # None: join / start default
        self.ray_config = ray_config

    def fit(self, job: TrainJob) -> TrainResult:
        from tasks.train_data import TrainResult

        ray = _ensure_ray(self.ray_config)
        self._check_fits(ray, job)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        env.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)  # checkpoint commits wait for a poll
        driver = (
            ray.remote(TrainDriver)
            .options(num_cpus=0, max_restarts=0, runtime_env={"env_vars": {**env, **job.env}})
            .remote()
        )
        try:
            path = ray.get(driver.fit.remote(job))
        except Exception as exc:
            raise _failure(exc) from exc
        finally:
            ray.kill(driver, no_restart=True)
        return TrainResult(checkpoint_dir=Path(path))

    @staticmethod
    def _check_fits(ray: Any, job: TrainJob) -> None:
        """Refuse at once what no node of the cluster could ever hold (else it would wait)."""
        total = ray.cluster_resources()
        need = {"CPU": job.num_cpus * job.world_size, "GPU": job.num_gpus * job.world_size}
        short = {k: v for k, v in need.items() if v > float(total.get(k, 0.0)) + 1e-9}
        if short:
            raise ItemFailure(
                FailureKind.INTERNAL,
                f"train: {job.world_size} workers need {need} but the Ray cluster has "
                f"CPU {total.get('CPU', 0):g}, GPU {total.get('GPU', 0):g}; lower "
                f"train.resources or add nodes",
                retryable=False,
            )

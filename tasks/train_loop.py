"""The training loop every training worker runs (one code path for every launcher).

:func:`run_worker` is called once per worker with the manifest and a :class:`TrainSession`
(the launcher's view of the distributed run: rank, world size, the latest checkpoint and a
way to report one; :mod:`talkforge.ray_train` implements it on Ray Train). Ray Train (or
any launcher) has set up the process group; accelerate runs inside the loop on top of it:
``Accelerator`` finds the group (gloo on CPU, NCCL on GPU), wraps the model in DDP (or FSDP
with ``strategy: fsdp``), autocasts to bf16 on GPU (``mixed_precision``), scales and
accumulates gradients (``accelerator.accumulate``) and clips them.

Per optimizer step ``s`` each worker runs ``gradient_accumulation_steps`` micro-steps
``m``; micro-step ``m`` trains on rows ``rank*B:(rank+1)*B`` of the family's global batch
for ``(seed, m)`` and re-seeds torch from ``(seed, m, rank)`` first. The batches come from a
``DataLoader`` whose dataset index is the micro-step (``data_workers`` forked processes
build the next batches while the step runs), so the sampler's state is just the next
micro-step. A checkpoint (every ``checkpoint_every`` steps and at the end) holds model,
optimizer, scheduler and sampler state; a run that starts from one (a new attempt after a
lost worker, or a new driver after a kill) continues exactly where it left off, and the
steps logged after that checkpoint are dropped from the history before they run again.

Worker 0 writes ``history.jsonl`` (one :class:`~tasks.records.TrainStep` per step: every
loss term, learning rates, gradient norm, samples/s) and TensorBoard events under
``<work>/tensorboard``; every worker writes ``ranks/worker-<r>.json`` (pid, host) when it
starts and ``ranks/rank-<r>.json`` when it finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.utils.data import DataLoader, Dataset

from generators.family import ModelFamily
from tasks.lifetime import die_with_parent, guard_current_process
from tasks.records import TrainStep
from tasks.train_checkpoint import CheckpointState, save_checkpoint
from tasks.train_data import (
    ATTEMPTS_NAME,
    HISTORY_NAME,
    RANKS_DIR,
    TENSORBOARD_DIR,
    TrainManifest,
    append_history,
    truncate_history,
)
from tasks.train_params import apply_trainable, build_optimizer, build_scheduler


class TrainSession(Protocol):
    """What the loop needs from the launcher."""

    rank: int
    world_size: int

    def restore(self) -> CheckpointState | None:
        """The latest checkpoint the launcher knows for this run (``None``: start fresh)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Called by every worker at every checkpoint step; worker 0 passes the directory."""


def micro_step_seed(seed: int, micro_step: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}:{micro_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StepBatches(Dataset):
    """Index ``i`` = micro-step ``first + i``: this worker's rows of that step's batch."""

    def __init__(
        self,
        family: ModelFamily,
        data: Any,
        seed: int,
        first: int,
        count: int,
        global_batch: int,
        rows: tuple[int, int],
    ):
        self.family, self.data, self.seed = family, data, seed
        self.first, self.count, self.global_batch, self.rows = first, count, global_batch, rows

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, stop = self.rows
        return self.family.training_batch(
            self.data, self.seed, self.first + i, self.global_batch, start, stop
        )


def _loader_init(_worker_id: int) -> None:
    die_with_parent()  # a loader process never outlives its training worker
    torch.set_num_threads(1)


def step_loader(dataset: StepBatches, workers: int) -> DataLoader:
    """Batches in micro-step order, built ahead by ``workers`` forked processes."""
    if workers == 0:
        return DataLoader(dataset, batch_size=None)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4,
        worker_init_fn=_loader_init,
        multiprocessing_context="fork",  # shares the in-memory clips copy-on-write
    )


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key, value in sorted(state.items()):
        h.update(key.encode())
        h.update(value.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _accelerator(manifest: TrainManifest) -> Accelerator:
    s = manifest.settings
    if s.mixed_precision != "no" and not manifest.use_gpu:
        raise ValueError(f"mixed_precision {s.mixed_precision} needs GPU workers (num_gpus > 0)")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2) if s.strategy == "fsdp" else None
    return Accelerator(
        cpu=not manifest.use_gpu,
        mixed_precision=s.mixed_precision,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        fsdp_plugin=plugin,
        step_scheduler_with_optimizer=False,
    )


def _init_weights(family: ModelFamily, model: torch.nn.Module, manifest: TrainManifest) -> dict:
    """Step 0's weights from the manifest's init source; returns the transfer counts."""
    init, spec = manifest.init, manifest.spec()
    if init is None:
        return {}
    if init.kind == "weights":
        return dict(family.transfer_weights(model, spec, Path(init.path), init.family))
    family.init_from_parent(model, spec, Path(init.path), init.spec_json)
    return {}


class _Logger:
    """Worker 0's step log: history.jsonl and TensorBoard (purged past the resume step)."""

    def __init__(self, work: Path, start: int):
        from tensorboardX import SummaryWriter

        self.history = work / HISTORY_NAME
        if start == 0:
            self.history.unlink(missing_ok=True)
        truncate_history(self.history, start)
        self.writer = SummaryWriter(str(work / TENSORBOARD_DIR), purge_step=start + 1)

    def log(self, step: TrainStep) -> None:
        append_history(self.history, step)
        w = self.writer
        w.add_scalar("loss/total", step.loss, step.step)
        for name, value in step.terms.items():
            w.add_scalar(f"loss/{name}", value, step.step)
        for i, lr in enumerate(step.lrs):
            w.add_scalar(f"lr/group{i}", lr, step.step)
        if step.grad_norm is not None:
            w.add_scalar("grad_norm", step.grad_norm, step.step)
        w.add_scalar("samples_per_s", step.samples_per_s or 0.0, step.step)
        w.add_scalar("data_wait_s", step.data_wait_s or 0.0, step.step)
        w.flush()

    def close(self) -> None:
        self.writer.close()


def run_worker(manifest: TrainManifest, session: TrainSession) -> dict:
    """Train this worker's share of the run; returns its summary (also written to disk)."""
    guard_current_process()  # die with the stage process that owns the run (same host)
    work, s = Path(manifest.work_dir), manifest.settings
    rank, world = session.rank, session.world_size
    _write_json(
        work / RANKS_DIR / f"worker-{rank}.json",
        {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()},
    )
    if world != manifest.world_size:
        raise RuntimeError(f"launched {world} workers, the manifest asks {manifest.world_size}")
    accelerator = _accelerator(manifest)
    if accelerator.num_processes != world:
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes, not {world}")

    torch.manual_seed(s.seed)
    family, spec = manifest.family(), manifest.spec()
    data = family.load_training_data(spec, manifest.clips, manifest.bank_path)
    model = family.build(spec)
    family.prepare_model(model, spec, data)
    family.set_training_assets(manifest.assets)
    fingerprint = manifest.fingerprint()
    state = session.restore()
    if state is not None and (state.fingerprint, state.world_size) != (fingerprint, world):
        state = None  # another manifest's or world size's checkpoint: not this run's
    transfer = {} if state else _init_weights(family, model, manifest)
    if s.gradient_checkpointing:
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise ValueError(f"{family.name}'s network has no gradient checkpointing")
        model.enable_gradient_checkpointing()
    apply_trainable(model, s)
    optimizer = build_optimizer(model, s)
    scheduler = build_scheduler(optimizer, s)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if state is not None:
        set_state_dict(
            model,
            optimizer.optimizer,
            model_state_dict=state.model,
            optim_state_dict=state.optimizer,
            options=StateDictOptions(full_state_dict=True),
        )
        scheduler.load_state_dict(state.scheduler)
        start = state.step
    logger = _Logger(work, start) if rank == 0 else None
    if rank == 0:
        with (work / RANKS_DIR / ATTEMPTS_NAME).open("a") as f:
            f.write(json.dumps({"resumed_from_step": start, "at": time.time()}) + "\n")
    accelerator.wait_for_everyone()

    accum, bs = s.gradient_accumulation_steps, s.batch_size
    dataset = StepBatches(
        family,
        data,
        s.seed,
        start * accum + 1,
        (s.steps - start) * accum,
        bs * world,
        (rank * bs, (rank + 1) * bs),
    )
    batches = iter(step_loader(dataset, s.data_workers))
    model.train()
    samples = 0
    for step in range(start + 1, s.steps + 1):
        began, wait = time.perf_counter(), 0.0
        sums: dict[str, torch.Tensor] = {}
        for k in range(accum):
            micro = (step - 1) * accum + k + 1
            t = time.perf_counter()
            batch = {
                key: v.to(accelerator.device, non_blocking=True) for key, v in next(batches).items()
            }
            wait += time.perf_counter() - t
            torch.manual_seed(micro_step_seed(s.seed, micro, rank))
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    losses = family.training_step(model, batch)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
            samples += bs
        lrs = [float(g["lr"]) for g in optimizer.param_groups]  # what this step used
        scheduler.step()
        keys = sorted(sums)
        means = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="mean")
        if logger is not None:
            values = dict(zip(keys, means.tolist(), strict=True))
            elapsed = time.perf_counter() - began
            logger.log(
                TrainStep(
                    step=step,
                    loss=values.pop("loss"),
                    lr=lrs[0],
                    lrs=lrs,
                    terms=values,
                    grad_norm=float(norm),
                    samples_per_s=bs * world * accum / elapsed,
                    data_wait_s=wait,
                )
            )
        if step % s.checkpoint_every == 0 or step == s.steps:
            _checkpoint(manifest, session, model, optimizer, scheduler, step, fingerprint)

    replica = accelerator.unwrap_model(model).state_dict() if s.strategy == "ddp" else {}
    summary = {
        "rank": rank,
        "world_size": world,
        "distributed_type": accelerator.distributed_type.value,
        "backend": accelerator.state.backend,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from_step": start,
        "steps_run": s.steps - start,
        "samples_seen": samples,
        "transfer": transfer,
        # DDP replicas must all agree (FSDP shards are not comparable)
        "state_sha256": state_sha256(replica) if replica else "",
    }
    _write_json(work / RANKS_DIR / f"rank-{rank}.json", summary)
    if logger is not None:
        logger.close()
    accelerator.wait_for_everyone()
    return summary


def _checkpoint(manifest, session, model, optimizer, scheduler, step, fingerprint) -> None:
    """Gather full model/optimizer state on worker 0, write it, report it (all workers)."""
    s = manifest.settings
    model_state, optim_state = get_state_dict(
        model,
        optimizer.optimizer,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    metrics = {"step": float(step)}
    if session.rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="tf-ckpt-") as tmp:
        save_checkpoint(
            Path(tmp),
            step=step,
            fingerprint=fingerprint,
            world_size=manifest.world_size,
            model_state=model_state,
            optimizer_state=optim_state,
            scheduler_state=scheduler.state_dict(),
            sampler={
                "seed": s.seed,
                "next_micro_step": step * s.gradient_accumulation_steps + 1,
                "global_batch": s.batch_size * manifest.world_size,
            },
            spec=manifest.spec(),
        )
        session.report(metrics, Path(tmp))

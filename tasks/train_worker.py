"""One training process, started by ``accelerate launch`` from the train stage.

Usage (the stage builds this command; see :func:`tasks.train.launch_command`)::

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... \\
        -m tasks.train_worker --manifest <work_dir>/manifest.json

Family-agnostic: the manifest names the model family (:mod:`generators.registry`), which
loads the training data, draws each step's batch and computes the losses. Every rank
loads the clips, builds the network and AdamW, resumes from
``<work_dir>/checkpoint.safetensors`` when it belongs to this manifest, then runs the
remaining steps under DDP (gloo on CPU). Rank ``r`` trains on slice ``r`` of each step's
global batch (``ModelFamily.training_batch``). The main process appends one line per
step to ``history.jsonl`` (losses averaged over ranks) and writes the checkpoint every
``checkpoint_every`` steps and at the last step. At the end each rank writes
``ranks/rank-<r>.json`` (distributed type, samples seen, sha256 of its final weights) so
the stage can check that every rank trained and that they agree.

Test hook: with ``TALKFORGE_TRAIN_KILL_AFTER_STEP=N`` the main process SIGKILLs itself
right after step ``N`` (after that step's checkpoint, if one is due), which is what an OOM
kill looks like: torchrun notices the dead rank, stops the others and exits non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from tasks.lifetime import guard_current_process
from tasks.train_data import (
    CHECKPOINT_NAME,
    HISTORY_NAME,
    RANKS_DIR,
    TrainManifest,
    load_checkpoint,
    save_checkpoint,
)

KILL_HOOK_ENV = "TALKFORGE_TRAIN_KILL_AFTER_STEP"
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.01


def _log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", flush=True)


def state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _truncate_history(path: Path, last_step: int) -> None:
    """Drop lines past the resumed checkpoint (steps logged before an interruption)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= last_step
    ]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def _maybe_kill(step: int) -> None:
    target = os.environ.get(KILL_HOOK_ENV)
    if target and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def train(manifest: TrainManifest) -> None:
    work = Path(manifest.work_dir)
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    _log(
        rank,
        f"world_size={world} distributed_type={accelerator.distributed_type} "
        f"backend={accelerator.state.backend} device={accelerator.device} "
        f"threads={torch.get_num_threads()}",
    )
    if world != manifest.num_processes:
        raise RuntimeError(f"launched {world} processes, manifest asks {manifest.num_processes}")

    torch.manual_seed(manifest.seed)
    family = manifest.family()
    spec = manifest.spec()
    data = family.load_training_data(spec, manifest.clips, manifest.bank_path)
    model = family.build(spec)
    if accelerator.is_main_process:
        params = sum(p.numel() for p in model.parameters())
        _log(
            rank,
            f"{family.name} {family.describe(spec)} params={params} clips={len(manifest.clips)}",
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=manifest.learning_rate, weight_decay=WEIGHT_DECAY
    )

    fingerprint = manifest.fingerprint()
    ckpt_path = work / CHECKPOINT_NAME
    start = 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.manifest_fingerprint == fingerprint:
            model.load_state_dict(state.model, strict=True)
            optimizer.load_state_dict(state.optimizer)
            start = state.step
            _log(rank, f"resumed from step {start}")
        else:
            _log(rank, "ignoring a checkpoint of a different manifest; starting at step 0")
    history = work / HISTORY_NAME
    if accelerator.is_main_process:
        for stale in work.glob(".tmp-*"):  # half-written files of an interrupted run
            stale.unlink(missing_ok=True)
        if start == 0:
            history.unlink(missing_ok=True)
        _truncate_history(history, start)
    accelerator.wait_for_everyone()

    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    bs = manifest.batch_size
    samples_seen = 0
    for step in range(start + 1, manifest.steps + 1):
        batch = family.training_batch(
            data, manifest.seed, step, bs * world, rank * bs, (rank + 1) * bs
        )
        batch = {k: t.to(accelerator.device) for k, t in batch.items()}
        with accelerator.autocast():
            losses = family.training_step(model, batch)
        accelerator.backward(losses["loss"])
        accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples_seen += bs
        means = {
            k: float(accelerator.reduce(v.detach().float(), reduction="mean").item())
            for k, v in sorted(losses.items())
        }
        if accelerator.is_main_process:
            lr = float(optimizer.param_groups[0]["lr"])
            terms = {k: v for k, v in means.items() if k != "loss"}
            line = {"step": step, "loss": means["loss"], "lr": lr, "terms": terms}
            with history.open("a") as f:
                f.write(json.dumps(line) + "\n")
            if step % manifest.checkpoint_every == 0 or step == manifest.steps:
                save_checkpoint(
                    ckpt_path,
                    step,
                    fingerprint,
                    accelerator.unwrap_model(model).state_dict(),
                    optimizer.state_dict(),
                    spec,
                )
                _log(rank, f"checkpoint at step {step}")
            _maybe_kill(step)

    accelerator.wait_for_everyone()
    summary = {
        "rank": rank,
        "world_size": world,
        "distributed_type": accelerator.distributed_type.value,
        "backend": accelerator.state.backend,
        "resumed_from_step": start,
        "steps_run": manifest.steps - start,
        "samples_seen": samples_seen,
        "state_sha256": state_sha256(accelerator.unwrap_model(model)),
    }
    ranks = work / RANKS_DIR
    ranks.mkdir(exist_ok=True)
    (ranks / f"rank-{rank}.json").write_text(json.dumps(summary))
    _log(rank, f"done: {samples_seen} samples in {summary['steps_run']} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, type=Path)
    args = parser.parse_args(argv)
    guard_current_process()  # die with torchrun's agent and with the stage that owns the run
    train(TrainManifest.read(args.manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

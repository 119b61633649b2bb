"""Train stage on Ray Train: 2 CPU workers (gloo DDP), a lost worker, checkpoints, equality.

One module-scoped training run (16 steps, checkpoint every 3) serves the tests: while it
runs, training worker 1 is SIGKILLed from outside once a few steps are logged; Ray Train's
FailureConfig restarts the worker group from the last checkpoint and the run finishes. Its
losses and final weights must equal an uninterrupted single-process reference on the whole
global batch, which holds only if both workers trained on their halves, DDP averaged their
gradients, and the restart restored model, optimizer, scheduler and sampler exactly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from generators import registry
from generators.musetalk15.data import load_clips, make_batch, step_picks
from generators.musetalk15.model import build_unet_from_spec, predict_latents
from talkforge.ray_train import RayTrainLauncher
from tasks.base import AggregateInputs, FailureKind, ItemContext, ItemFailure, ItemInputs
from tasks.records import TrainedCheckpoint
from tasks.train import TrainStage, work_dir_for
from tasks.train_config import TrainStageConfig, train_config
from tasks.train_data import HISTORY_NAME, RANKS_DIR, TrainManifest, read_history
from tests.train_helpers import build_bank, commit_clip, make_env, split_ids, tiny_vae, train_inputs

T = 24
SIZE = 128  # 16×16 latents
STEPS = 16
CFG = train_config(steps=STEPS, checkpoint_every=3, batch_size=2, learning_rate=1e-3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    env = make_env(tmp)
    vae, vae_fp = tiny_vae(tmp)
    train_ids, held_ids = split_ids(3, 1)
    train = [
        commit_clip(tmp, env, vae, vae_fp, c, T, SIZE, seed=i) for i, c in enumerate(train_ids)
    ]
    held = commit_clip(tmp, env, vae, vae_fp, held_ids[0], T, SIZE, seed=9)
    bank = build_bank(env, train)
    return {"tmp": tmp, "env": env, "train": train, "held": held, "bank": bank}


def run_stage(world, key: str, cfg: TrainStageConfig = CFG) -> TrainedCheckpoint:
    stage = TrainStage(cfg, world["env"])
    stage.trainer = RayTrainLauncher()
    stage.setup()
    # the held-out clip is passed too: the stage must leave it out
    inputs = train_inputs([*world["train"], world["held"]], world["bank"])
    ctx = ItemContext(world["env"].store(), "train", "train", key)
    try:
        return stage.process(inputs, ctx)
    finally:
        ctx.close()


def kill_worker_once(work: Path, rank: int, after_lines: int) -> threading.Thread:
    """SIGKILL training worker ``rank`` once ``after_lines`` steps are in the history."""

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            history = work / HISTORY_NAME
            record = work / RANKS_DIR / f"worker-{rank}.json"
            lines = len(history.read_text().splitlines()) if history.exists() else 0
            if lines >= after_lines and record.exists():
                os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def trained(world, ray_session):
    key = "a" * 40
    work = work_dir_for(world["env"].data_root, key)
    killer = kill_worker_once(work, rank=1, after_lines=4)
    rec = run_stage(world, key)
    killer.join(timeout=1)
    return rec, work


def reference_training(
    manifest: TrainManifest, rank0_only: bool = False
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same optimisation in one process on the whole global batch, without Ray,
    accelerate or the family registry (MSE of the timestep-0 UNet's prediction).

    DDP averages the workers' gradients, so two workers on two halves of a batch must match
    one process on the whole batch (up to float summation order). ``rank0_only`` trains on
    worker 0's half only: what a run whose second worker did nothing would produce.
    """
    s = manifest.settings
    torch.manual_seed(s.seed)
    clips = load_clips(manifest.clips, manifest.bank_path)
    model = build_unet_from_spec(manifest.spec())
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=s.learning_rate,
        betas=(s.adam_beta1, s.adam_beta2),
        eps=s.adam_epsilon,
        weight_decay=s.adam_weight_decay,
    )
    counts = [c.num_frames for c in clips]
    losses = []
    for step in range(1, s.steps + 1):
        picks = step_picks(counts, s.seed, step, s.batch_size * manifest.world_size)
        if rank0_only:
            picks = picks[: s.batch_size]
        x, tokens, target = make_batch(clips, picks, manifest.model.audio_window_frames)
        loss = torch.nn.functional.mse_loss(predict_latents(model, x, tokens), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


def test_lost_worker_is_replaced_and_the_run_resumes_from_its_checkpoint(world, trained):
    rec, work = trained
    assert rec.worker_restarts == 1  # worker 1 was killed once; Ray Train replaced the group
    lines = (work / RANKS_DIR / "attempts.jsonl").read_text().splitlines()
    attempts = [json.loads(line)["resumed_from_step"] for line in lines]
    assert len(attempts) == 2 and attempts[0] == 0
    resumed = attempts[1]
    assert resumed > 0 and resumed % CFG.checkpoint_every == 0  # a checkpoint, not a step
    # every step exactly once, although steps after the checkpoint ran twice
    assert [h.step for h in rec.history] == list(range(1, STEPS + 1))
    assert [h.step for h in read_history(work / HISTORY_NAME)] == list(range(1, STEPS + 1))


def test_two_workers_train_on_gloo_and_commit_a_checkpoint(world, trained):
    rec, work = trained
    assert rec.steps == STEPS and rec.num_processes == 2 and rec.resumed_from_step == 0
    assert rec.train_clips == sorted(c.clip_id for c in world["train"])
    assert all(np.isfinite(h.loss) and h.lr == pytest.approx(1e-3) for h in rec.history)
    assert all(h.grad_norm > 0 and h.samples_per_s > 0 for h in rec.history)
    assert rec.history[-1].loss < rec.history[0].loss
    ranks = [json.loads((work / RANKS_DIR / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r, report in enumerate(ranks):
        assert report["rank"] == r and report["world_size"] == 2
        assert (report["distributed_type"], report["backend"]) == ("MULTI_CPU", "gloo")
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]  # DDP replicas agree
    path = world["env"].store().local_path(rec.checkpoint.uri, world["tmp"])
    assert rec.checkpoint.kind == "checkpoint" and path.name == "model.safetensors"
    assert rec.family == "musetalk15" == json.loads(rec.model_config_json)["family"]
    assert rec.config_hash == CFG.params_hash() and rec.bank_sha256 == world["bank"].bank.sha256
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["model_spec"]) == json.loads(rec.model_config_json)
    # TensorBoard event files for the same steps (written by worker 0)
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))


def test_two_workers_equal_one_process_on_the_whole_batch(world, trained):
    rec, work = trained
    manifest = TrainManifest.read(work / "manifest.json")
    got = load_file(str(world["env"].store().local_path(rec.checkpoint.uri, world["tmp"])))

    def max_diff(state: dict[str, torch.Tensor]) -> float:
        assert got.keys() == state.keys()
        return max(float((got[k] - v).abs().max()) for k, v in state.items())

    losses, state = reference_training(manifest)
    assert [h.loss for h in rec.history] == pytest.approx(losses, rel=1e-4)
    # Tolerance: Adam amplifies summation-order noise on near-zero gradients; allow a
    # fraction of one step's update (lr = 1e-3). A run missing worker 1's half is far off.
    assert max_diff(state) < 5e-4
    _, state_half = reference_training(manifest, rank0_only=True)
    assert max_diff(state_half) > 2e-3


def test_checkpoint_loads_back_through_the_family_registry(world, trained):
    rec, work = trained
    path = world["env"].store().local_path(rec.checkpoint.uri, world["tmp"])
    family = registry.get(rec.family)()
    unet = family.load_model(path, family.parse_spec(rec.model_config_json))
    manifest = TrainManifest.read(work / "manifest.json")
    torch.manual_seed(0)
    fresh = build_unet_from_spec(manifest.spec()).eval()
    clips = load_clips(manifest.clips, manifest.bank_path)
    x, tokens, target = make_batch(clips, [(0, 3, 15), (1, 20, 2)], 2)
    with torch.no_grad():
        out = predict_latents(unet, x, tokens)
        assert not torch.allclose(out, predict_latents(fresh, x, tokens))
    assert out.shape == target.shape == (2, 16, 16, 16)


def test_rerun_of_a_finished_key_resumes_at_the_end_without_training(world, trained):
    rec, _ = trained
    again = run_stage(world, "a" * 40)
    assert again.resumed_from_step == STEPS and again.worker_restarts == 0
    assert again.history == rec.history
    assert again.checkpoint.sha256 == rec.checkpoint.sha256


def test_accepts_only_training_clips_and_fails_typed_without_any(world):
    stage = TrainStage(CFG, world["env"])
    assert all(stage.accepts(c.clip_id, {}) for c in world["train"])
    assert not stage.accepts(world["held"].clip_id, {})
    only_held = AggregateInputs(
        item_id="train",
        items=[ItemInputs(item_id=world["held"].clip_id, records=world["held"].inputs.records)],
        shared={"engram": world["bank"]},
    )
    ctx = ItemContext(world["env"].store(), "train", "train", "c" * 40)
    with pytest.raises(ItemFailure) as exc:
        stage.process(only_held, ctx)
    assert exc.value.kind == FailureKind.FORMAT


def test_manifest_skips_misaligned_clips_and_bf16_on_cpu_fails_typed(world, tmp_path):
    bad = world["train"][0]
    feats = bad.inputs.records["features"]
    broken = feats.model_copy(update={"num_frames": feats.num_frames + 3})
    inputs = train_inputs(world["train"], world["bank"])
    items = [
        ItemInputs(item_id=it.item_id, records={"features": broken})
        if it.item_id == bad.clip_id
        else it
        for it in inputs.items
    ]
    stage = TrainStage(CFG, world["env"])
    ctx = ItemContext(world["env"].store(), "train", "train", "d" * 40)
    agg = AggregateInputs(item_id="train", items=items, shared=inputs.shared)
    manifest, parent = stage.build_manifest(agg, ctx, tmp_path)
    assert parent is None and manifest.init is None
    assert bad.clip_id not in [c.clip_id for c in manifest.clips]
    assert len(manifest.clips) == len(world["train"]) - 1
    assert manifest.skipped and manifest.skipped[0].startswith(bad.clip_id)
    assert manifest.layout.shapes == {"vae_latents": [16, 16, 16], "hubert": [2, 32]}
    assert manifest.model.family == "musetalk15" and manifest.bank_path
    assert all(c.audio_path and Path(c.audio_path).exists() for c in manifest.clips)
    assert manifest.world_size == 2 and not manifest.use_gpu

    bf16 = TrainStage(CFG.model_copy(update={"mixed_precision": "bf16"}), world["env"])
    with pytest.raises(ItemFailure) as exc:
        bf16.build_manifest(agg, ctx, tmp_path)
    assert exc.value.kind == FailureKind.FORMAT and not exc.value.retryable
    assert "num_gpus" in exc.value.message


def test_fingerprint_ignores_operational_knobs_but_not_the_world_size(world, tmp_path):
    stage = TrainStage(CFG, world["env"])
    ctx = ItemContext(world["env"].store(), "train", "train", "e" * 40)
    inputs = train_inputs(world["train"], world["bank"])
    manifest, _ = stage.build_manifest(inputs, ctx, tmp_path)
    knobs = manifest.settings.model_copy(update={"checkpoint_every": 7, "data_workers": 0})
    assert manifest.model_copy(update={"settings": knobs}).fingerprint() == manifest.fingerprint()
    assert manifest.model_copy(update={"world_size": 1}).fingerprint() != manifest.fingerprint()
    lr = manifest.settings.model_copy(update={"learning_rate": 5e-4})
    assert manifest.model_copy(update={"settings": lr}).fingerprint() != manifest.fingerprint()

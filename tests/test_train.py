"""Train stage: accelerate with 2 CPU ranks (gloo DDP), checkpoints, kill + resume.

One module-scoped training run (6 steps, checkpoint every 3) serves every test: rank 0 is
SIGKILLed after step 4, the stage fails typed, and the rerun resumes from the step-3
checkpoint. Its losses and final weights must equal an uninterrupted single-process
reference on the whole global batch, which holds only if both ranks trained on their
halves, DDP averaged their gradients, and resume restored model and optimizer exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from generators import registry
from generators.musetalk15.data import load_clips, make_batch, step_picks
from generators.musetalk15.model import build_unet_from_spec, predict_latents
from tasks.base import AggregateInputs, FailureKind, ItemContext, ItemFailure, ItemInputs
from tasks.evaluate import EvaluateConfig, EvaluateStage
from tasks.generate import GenerateConfig, GenerateStage
from tasks.records import TrainedCheckpoint
from tasks.train import (
    TrainStage,
    TrainStageConfig,
    failure_summary,
    launch_command,
    launch_env,
    train_config,
    work_dir_for,
)
from tasks.train_data import CHECKPOINT_NAME, TrainManifest, load_checkpoint
from tasks.train_worker import KILL_HOOK_ENV, MAX_GRAD_NORM, WEIGHT_DECAY
from tests.train_helpers import build_bank, commit_clip, make_env, split_ids, tiny_vae, train_inputs

T = 24
SIZE = 128  # 16×16 latents
CFG = train_config(steps=6, checkpoint_every=3, batch_size=2, num_processes=2, learning_rate=1e-3)


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


def _train(world, key: str, cfg: TrainStageConfig = CFG) -> TrainedCheckpoint:
    stage = TrainStage(cfg, world["env"])
    stage.setup()
    # the held-out clip is passed too: the stage must leave it out
    inputs = train_inputs([*world["train"], world["held"]], world["bank"])
    ctx = ItemContext(world["env"].store(), "train", "train", key)
    try:
        return stage.process(inputs, ctx)
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def trained(world):
    """One training run, interrupted: rank 0 is SIGKILLed after step 4 (checkpoint at 3),
    then the stage is run again with the same key and resumes."""
    key = "a" * 40
    work = work_dir_for(world["env"].data_root, key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KILL_HOOK_ENV, "4")
        with pytest.raises(ItemFailure) as exc:
            _train(world, key)
    killed = {
        "failure": exc.value,
        "checkpoint_step": load_checkpoint(work / CHECKPOINT_NAME).step,
        "history_lines": len((work / "history.jsonl").read_text().splitlines()),
    }
    rec = _train(world, key)
    return rec, work, killed


def reference_training(
    manifest: TrainManifest, rank0_only: bool = False
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same optimisation in one process on the whole global batch, without accelerate.

    Written out here as the baseline trained before the family registry existed (MSE of
    the timestep-0 UNet's prediction on the same batches), so the ``musetalk15`` family
    run through the registry must reproduce it. DDP averages the ranks' gradients, so two
    ranks on two halves of a batch must match one process on the whole batch (up to float
    summation order). ``rank0_only`` trains on rank 0's half only: what a run whose second
    rank did nothing would produce.
    """
    torch.manual_seed(manifest.seed)
    clips = load_clips(manifest.clips, manifest.bank_path)
    model = build_unet_from_spec(manifest.spec())
    opt = torch.optim.AdamW(
        model.parameters(), lr=manifest.learning_rate, weight_decay=WEIGHT_DECAY
    )
    counts = [c.num_frames for c in clips]
    losses = []
    for step in range(1, manifest.steps + 1):
        picks = step_picks(counts, manifest.seed, step, manifest.batch_size * 2)
        if rank0_only:
            picks = picks[: manifest.batch_size]
        x, tokens, target = make_batch(clips, picks, manifest.model.audio_window_frames)
        loss = torch.nn.functional.mse_loss(predict_latents(model, x, tokens), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


def test_killed_run_fails_typed_and_keeps_its_last_checkpoint(trained):
    _, _, killed = trained
    failure = killed["failure"]
    assert failure.kind == FailureKind.INTERNAL and failure.retryable
    assert "accelerate launch exit code" in failure.message
    assert "SIGKILL" in failure.message  # torchrun's report, from stderr's tail
    assert killed["checkpoint_step"] == 3
    assert killed["history_lines"] == 4  # step 4 was logged but is in no checkpoint


def test_rerun_resumes_on_two_cpu_ranks_and_commits_a_checkpoint(world, trained):
    rec, work, _ = trained
    assert rec.steps == 6 and rec.num_processes == 2 and rec.resumed_from_step == 3
    assert "resumed from step 3" in (work / "launch.stdout.log").read_text()
    assert rec.train_clips == sorted(c.clip_id for c in world["train"])
    assert [h.step for h in rec.history] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(h.loss) and h.lr == pytest.approx(1e-3) for h in rec.history)
    assert rec.history[-1].loss < rec.history[0].loss
    ranks = [json.loads((work / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r, report in enumerate(ranks):
        assert report["rank"] == r and report["world_size"] == 2
        assert (report["distributed_type"], report["backend"]) == ("MULTI_CPU", "gloo")
        assert report["resumed_from_step"] == 3
        assert report["samples_seen"] == 3 * CFG.batch_size  # steps 4..6
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    path = world["env"].store().local_path(rec.checkpoint.uri, world["tmp"])
    assert rec.checkpoint.kind == "checkpoint" and path.name == "model.safetensors"
    assert rec.family == "musetalk15" == json.loads(rec.model_config_json)["family"]
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["model_spec"]) == json.loads(rec.model_config_json)
        assert f.metadata()["family"] == rec.family


def test_interrupted_two_rank_run_equals_one_process_on_the_whole_batch(world, trained):
    rec, work, _ = trained
    manifest = TrainManifest.read(work / "manifest.json")
    path = world["env"].store().local_path(rec.checkpoint.uri, world["tmp"])
    got = load_file(str(path))

    def max_diff(state: dict[str, torch.Tensor]) -> float:
        assert got.keys() == state.keys()
        return max(float((got[k] - v).abs().max()) for k, v in state.items())

    losses, state = reference_training(manifest)
    assert [h.loss for h in rec.history] == pytest.approx(losses, rel=1e-4)
    # Adam amplifies summation-order noise on near-zero gradients: allow a fraction of
    # one step's update (lr = 1e-3); a run missing rank 1's half is ~10× further away.
    assert max_diff(state) < 5e-4
    losses_half, state_half = reference_training(manifest, rank0_only=True)
    assert max_diff(state_half) > 2e-3
    assert [h.loss for h in rec.history] != pytest.approx(losses_half, rel=1e-4)


def test_checkpoint_loads_back_and_reproduces_the_trained_model(world, trained):
    rec, work, _ = trained
    path = world["env"].store().local_path(rec.checkpoint.uri, world["tmp"])
    family = registry.get(rec.family)()
    unet = family.load_model(path, family.parse_spec(rec.model_config_json))
    manifest = TrainManifest.read(work / "manifest.json")
    worker_state = load_checkpoint(work / CHECKPOINT_NAME)
    assert worker_state.step == 6
    again = build_unet_from_spec(manifest.spec())
    again.load_state_dict(worker_state.model)
    torch.manual_seed(0)
    fresh = build_unet_from_spec(manifest.spec())

    clips = load_clips(manifest.clips, manifest.bank_path)
    window = manifest.model.audio_window_frames
    x, tokens, target = make_batch(clips, [(0, 3, 15), (1, 20, 2)], window)
    with torch.no_grad():
        out = predict_latents(unet, x, tokens)
        assert torch.equal(out, predict_latents(again.eval(), x, tokens))
        assert not torch.allclose(out, predict_latents(fresh.eval(), x, tokens))
    assert out.shape == target.shape == (2, 16, 16, 16)


def test_trained_checkpoint_generates_and_evaluates_a_heldout_clip(world, trained):
    rec, _, _ = trained
    held = world["held"]
    gen = GenerateStage(GenerateConfig(batch_size=12), world["env"])
    gen.setup()
    assert gen.accepts(held.clip_id, {})
    shared = {"engram": world["bank"], "train": rec}
    ctx = ItemContext(world["env"].store(), "generate", held.clip_id, "g" * 40)
    out = gen.process(
        ItemInputs(item_id=held.clip_id, records=dict(held.inputs.records), shared=shared), ctx
    )
    assert out.num_frames == T and out.crop_size_px == SIZE
    ev = EvaluateStage(EvaluateConfig(metrics=["psnr_db", "ssim"]), world["env"])
    ctx = ItemContext(world["env"].store(), "evaluate", held.clip_id, "e" * 40)
    metrics = ev.process(
        ItemInputs(
            item_id=held.clip_id,
            records={
                "faces": held.inputs.records["faces"],
                "features": held.inputs.records["features"],
                "generate": out,
            },
            shared={"train": rec},
        ),
        ctx,
    )
    assert metrics.num_frames == T and np.isfinite(metrics.psnr_db)


def test_launch_uses_torchrun_fanout_with_cpu_ranks(tmp_path):
    cmd = launch_command(tmp_path / "m.json", tmp_path / "c.yaml", 2, "no")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and "--cpu" not in cmd  # --cpu would start ONE process
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("-m", 3) :][:2] == ["-m", "tasks.train_worker"]
    assert launch_env(2)["ACCELERATE_USE_CPU"] == "true"
    assert "--cpu" in launch_command(tmp_path / "m.json", tmp_path / "c.yaml", 1, "no")


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


def test_manifest_skips_misaligned_clips_and_fp16_on_cpu_fails_typed(world, tmp_path):
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
    manifest = stage.build_manifest(
        AggregateInputs(item_id="train", items=items, shared=inputs.shared), ctx, tmp_path
    )
    assert bad.clip_id not in [c.clip_id for c in manifest.clips]
    assert len(manifest.clips) == len(world["train"]) - 1
    assert manifest.skipped and manifest.skipped[0].startswith(bad.clip_id)
    assert manifest.layout.shapes == {"vae_latents": [16, 16, 16], "hubert": [2, 32]}
    assert manifest.model.family == "musetalk15" and manifest.bank_path

    fp16 = TrainStage(CFG.model_copy(update={"mixed_precision": "fp16"}), world["env"])
    with pytest.raises(ItemFailure) as exc:
        fp16.run_training(manifest)
    assert exc.value.kind == FailureKind.INTERNAL and not exc.value.retryable


def test_failure_summary_finds_the_rank_exception_in_this_launch_only(tmp_path):
    log = tmp_path / "err.log"
    old = "[rank1]: KeyError: 'from an earlier launch'\n"
    new = (
        "[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "x.py", line 1, in <module>\n'
        "[rank0]: ValueError: bank does not fit\n"
        "Root Cause (first observed failure):\n"
        "[0]:\n"
        "  rank      : 0 (local_rank: 0)\n"
        "  exitcode  : 1 (pid: 7)\n"
        "  traceback : To enable traceback see: https://pytorch.org/docs\n"
    )
    log.write_text(old + new)
    summary = failure_summary(log, offset=len(old))
    assert summary.startswith("rank 0: ValueError: bank does not fit")
    assert "exitcode  : 1" in summary
    assert "earlier launch" not in summary

"""DualForce through the train and generate stages (Ray Train, 2 CPU workers, gloo DDP).

Real clips (tiny FLUX.1 VAE latents of real face crops) with the five feature files the
features stage writes; the train stage runs stage 1, then stage 2 and stage 3 each from the
previous run's committed checkpoint (the ``init`` input the planner resolves from
``init_from``); stage 3's worker 1 is SIGKILLed once a few steps are logged and Ray Train
resumes from the last checkpoint. The generate stage then samples every committed
checkpoint for a held-out clip, in both settings. (The same chain through the CLI is
``tests/test_dualforce_cli.py``.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.fingerprint import ModelFingerprint
from talkforge.ray_train import RayTrainLauncher
from tasks.base import ItemContext
from tasks.generate import GenerateConfig, GenerateStage
from tasks.records import ClipFeatures, FeatureFile, TrainedCheckpoint
from tasks.train import TrainStage, work_dir_for
from tasks.train_config import train_config
from tasks.train_data import RANKS_DIR
from tests.test_generate import _history
from tests.test_train import kill_worker_once
from tests.train_helpers import (
    build_bank,
    commit_clip,
    make_env,
    split_ids,
    tiny_vae,
    train_inputs,
)

pytestmark = pytest.mark.slow

T, SIZE, STEPS = 12, 64, 6  # 64-px crops: 8×8 latents
TINY = {
    "family": "dualforce", "size": "tiny", "clip_frames": 4, "steps": STEPS,
    "checkpoint_every": 2, "batch_size": 1, "lora": {"attention_rank": 4, "ffn_rank": 2},
    "sampler": {"steps_per_frame": 2}, "augment": {"p_noise": 0.0},  # random "HuBERT" here
}  # fmt: skip


def add_structure_features(tmp, env, fixture, seed: int) -> None:
    """The features stage's other three files for a committed clip (random values)."""
    g = torch.Generator().manual_seed(seed)
    fake = ModelFingerprint(name="random", source="random", resolved_path="", sha256="0" * 64,
                            origin="random-init")  # fmt: skip
    tensors = {
        "liveportrait_motion": ("motion", torch.randn(T, 133, generator=g)),
        "emoca_flame": ("flame", torch.randn(T, 159, generator=g)),
        "reference": ("patch_tokens", torch.randn(16, 8, generator=g)),
    }
    feats = fixture.inputs.records["features"]
    ctx = ItemContext(env.store(), "features", fixture.clip_id, "k" * 40)
    files = list(feats.files)
    for family, (name, tensor) in tensors.items():
        path = tmp / f"{fixture.clip_id}-{family}.safetensors"
        save_file({name: tensor}, str(path))
        files.append(
            FeatureFile(
                family=family,
                artifact=ctx.commit(path, f"{family}.safetensors", "features"),
                shape=list(tensor.shape),
                dtype="float32",
                frame_rate_hz=0.0 if family == "reference" else 25.0,
                model=fake,
            )
        )
    fixture.inputs.records["features"] = ClipFeatures(**{**dict(feats), "files": files})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dualforce-stage")
    env = make_env(tmp)
    vae, vae_fp = tiny_vae(tmp)
    train_ids, held_ids = split_ids(2, 2)
    clips = [
        commit_clip(tmp, env, vae, vae_fp, c, T, SIZE, seed=i)
        for i, c in enumerate([*train_ids, *held_ids])
    ]
    for i, clip in enumerate(clips):
        add_structure_features(tmp, env, clip, seed=i)
    bank = build_bank(env, clips[:2])  # the stage's input contract (DualForce does not read it)
    return {"tmp": tmp, "env": env, "train": clips[:2], "held": clips[2:], "bank": bank}


def train(world, stage: str, key: str, parent: TrainedCheckpoint | None) -> TrainedCheckpoint:
    cfg = dict(TINY, training_stage=stage)
    if parent is not None:
        cfg["init_from"] = {"stage": parent.training_stage}
    runner = TrainStage(train_config(**cfg), world["env"])
    runner.trainer = RayTrainLauncher()
    runner.setup()
    inputs = train_inputs([*world["train"], *world["held"]], world["bank"])
    if parent is not None:
        inputs = inputs.model_copy(update={"shared": {**inputs.shared, "init": parent}})
    ctx = ItemContext(world["env"].store(), "train", "train", key)
    try:
        return runner.process(inputs, ctx)
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def chain(world, ray_session):
    one = train(world, "stage1", "1" * 40, None)
    two = train(world, "stage2", "2" * 40, one)
    work = work_dir_for(world["env"].data_root, "3" * 40)
    killer = kill_worker_once(work, rank=1, after_lines=3)
    three = train(world, "stage3", "3" * 40, two)
    killer.join(timeout=1)
    return {"stage1": one, "stage2": two, "stage3": three, "work3": work}


def test_each_stage_trains_its_terms_from_its_parent(chain):
    assert chain["stage1"].parent is None
    for child, parent in (("stage2", "stage1"), ("stage3", "stage2")):
        rec = chain[child]
        assert rec.parent is not None and rec.parent.training_stage == parent
        assert rec.parent.artifact_id == chain[parent].checkpoint.artifact_id
    for stage, terms in (("stage1", {"recon", "flame"}), ("stage2", {"video"}),
                         ("stage3", {"video", "struct", "flame", "lip"})):  # fmt: skip
        rec = chain[stage]
        assert rec.family == "dualforce" and rec.training_stage == stage
        assert rec.num_processes == 2 and [h.step for h in rec.history] == [*range(1, STEPS + 1)]
        assert all(set(h.terms) == terms and h.grad_norm > 0 for h in rec.history), stage
    # stage 2 starts from stage 1's projector: the structure targets stage 3 sees are its
    assert json.loads(chain["stage3"].model_config_json)["training_stage"] == "stage3"


def test_killed_stage3_worker_resumes_from_its_last_checkpoint(chain):
    rec, work = chain["stage3"], chain["work3"]
    assert rec.worker_restarts == 1
    lines = (work / RANKS_DIR / "attempts.jsonl").read_text().splitlines()
    attempts = [json.loads(line)["resumed_from_step"] for line in lines]
    assert len(attempts) == 2 and attempts[0] == 0 and attempts[1] > 0 and attempts[1] % 2 == 0
    assert [h.step for h in rec.history] == [*range(1, STEPS + 1)]


def test_generate_samples_every_dualforce_checkpoint_in_both_settings(world, chain):
    stage = GenerateStage(GenerateConfig(batch_size=5), world["env"])
    stage.setup()
    a, b = world["held"]
    ckpts = [chain["stage1"], chain["stage2"], chain["stage3"]]
    records = dict(a.inputs.records)
    records["features@partner"] = b.inputs.records["features"]
    inputs = a.inputs.model_copy(
        update={"records": records,
                "shared": {"train": ckpts[-1], "train@history": _history(*ckpts)}}
    )  # fmt: skip
    ctx = ItemContext(world["env"].store(), "generate", a.clip_id, "g" * 40)
    try:
        out = stage.process(inputs, ctx)
    finally:
        ctx.close()
    by = {(v.checkpoint_sha256, v.setting): v for v in out.videos}
    for rec in ckpts[1:]:
        for setting in ("self", "cross"):
            video = by[(rec.checkpoint.sha256, setting)]
            assert video.family == "dualforce" and video.num_frames == T
    assert not any(v.checkpoint_sha256 == chain["stage1"].checkpoint.sha256 for v in out.videos)
    assert any("structure projector" in note for note in out.notes)

"""bf16 training on a GPU Ray Train worker (NCCL), DDP and FSDP (skipped without CUDA).

The same stage and loop as the CPU tests, with ``train.resources.num_gpus: 1``: accelerate
must pick the GPU and NCCL, autocast to bf16, and the run must still train (finite losses
that go down) and commit a checkpoint that loads back in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

from generators import registry
from talkforge.ray_train import RayTrainLauncher
from tasks.base import ItemContext
from tasks.train import TrainStage, work_dir_for
from tasks.train_config import train_config
from tests.train_helpers import build_bank, commit_clip, make_env, split_ids, tiny_vae, train_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-gpu")
    env = make_env(tmp)
    vae, vae_fp = tiny_vae(tmp)
    clips = [
        commit_clip(tmp, env, vae, vae_fp, c, 24, 128, seed=i)
        for i, c in enumerate(split_ids(3, 0)[0])
    ]
    return {"tmp": tmp, "env": env, "clips": clips, "bank": build_bank(env, clips)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_bf16_training_on_one_gpu_worker(world, ray_session, strategy):
    cfg = train_config(
        steps=12,
        checkpoint_every=6,
        batch_size=8,
        learning_rate=1e-3,
        mixed_precision="bf16",
        strategy=strategy,
        resources={"num_workers": 1, "num_cpus": 1, "num_gpus": 1},
    )
    stage = TrainStage(cfg, world["env"])
    stage.trainer = RayTrainLauncher()
    key = ("g" if strategy == "ddp" else "f") * 40
    ctx = ItemContext(world["env"].store(), "train", "train", key)
    try:
        rec = stage.process(train_inputs(world["clips"], world["bank"]), ctx)
    finally:
        ctx.close()
    report = json.loads(
        (work_dir_for(world["env"].data_root, key) / "ranks" / "rank-0.json").read_text()
    )
    assert report["device"].startswith("cuda") and report["mixed_precision"] == "bf16"
    assert report["backend"] == "nccl"
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in rec.history)
    assert rec.history[-1].loss < rec.history[0].loss
    path = world["env"].store().local_path(rec.checkpoint.uri, world["tmp"])
    family = registry.get(rec.family)()
    model = family.load_model(path, family.parse_spec(rec.model_config_json))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 only in autocast

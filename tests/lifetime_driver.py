"""A training driver for the lifetime tests: ``python -m tests.lifetime_driver ROOT STEPS``.

Builds (deterministically, so a second invocation resumes the first one's work dir) two
small training clips and an Engram bank under ``ROOT`` with :mod:`tests.train_helpers`,
then runs the real train stage once on Ray Train (a local Ray started in this process, as
the local executor does) and prints the record's ``resumed_from_step``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from talkforge.config import RayConfig
from talkforge.ray_train import RayTrainLauncher
from tasks.base import ItemContext
from tasks.train import TrainStage
from tasks.train_config import train_config
from tests.train_helpers import build_bank, commit_clip, make_env, split_ids, tiny_vae, train_inputs

KEY = "d" * 40


def main(root: Path, steps: int) -> None:
    env = make_env(root)
    vae, vae_fp = tiny_vae(root)  # built on the first call only: seed after it
    torch.manual_seed(0)  # the VAE samples its latents: same seed, same clips, same manifest
    clips = [
        commit_clip(root, env, vae, vae_fp, c, 12, 64, seed=i)
        for i, c in enumerate(split_ids(2, 0)[0])
    ]
    bank = build_bank(env, clips)
    cfg = train_config(steps=steps, checkpoint_every=2, batch_size=2)
    stage = TrainStage(cfg, env)
    stage.trainer = RayTrainLauncher(RayConfig(num_cpus=2))
    stage.setup()
    ctx = ItemContext(env.store(), "train", "train", KEY)
    try:
        rec = stage.process(train_inputs(clips, bank), ctx)
    finally:
        ctx.close()
    print(f"resumed_from_step={rec.resumed_from_step}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))

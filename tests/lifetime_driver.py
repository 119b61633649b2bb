"""A training driver for the lifetime tests: ``python -m tests.lifetime_driver ROOT STEPS``.

Builds two small training clips and an Engram bank under ``ROOT`` with
:mod:`tests.train_helpers` on the first invocation and keeps their records in
``ROOT/fixture.json``, so a second invocation trains on the very same inputs (same item,
same manifest) and resumes the first one's work dir, as the engine's retry would. It then
runs the real train stage once on Ray Train (a local Ray started in this process, as the
local executor does) and prints the record's ``resumed_from_step``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from talkforge.config import RayConfig
from talkforge.ray_train import RayTrainLauncher
from tasks.base import AggregateInputs, ItemContext, ItemInputs
from tasks.records import ClipFeatures, MemoryBank
from tasks.train import TrainStage
from tasks.train_config import train_config
from tests.train_helpers import build_bank, commit_clip, make_env, split_ids, tiny_vae, train_inputs

KEY = "d" * 40


def inputs(root: Path, env) -> AggregateInputs:
    """The committed features of two clips and their bank, built once under ``root``."""
    saved = root / "fixture.json"
    if saved.exists():
        data = json.loads(saved.read_text())
        return AggregateInputs(
            item_id="train",
            items=[
                ItemInputs(item_id=cid, records={"features": ClipFeatures.model_validate(f)})
                for cid, f in data["clips"].items()
            ],
            shared={"engram": MemoryBank.model_validate(data["bank"])},
        )
    vae, vae_fp = tiny_vae(root)
    torch.manual_seed(0)  # the VAE samples its latents
    clips = [
        commit_clip(root, env, vae, vae_fp, c, 12, 64, seed=i)
        for i, c in enumerate(split_ids(2, 0)[0])
    ]
    agg = train_inputs(clips, build_bank(env, clips))
    records = {it.item_id: it.records["features"].model_dump(mode="json") for it in agg.items}
    bank = agg.shared["engram"].model_dump(mode="json")
    saved.write_text(json.dumps({"clips": records, "bank": bank}))
    return agg


def main(root: Path, steps: int) -> None:
    env = make_env(root)
    cfg = train_config(steps=steps, checkpoint_every=2, batch_size=2)
    stage = TrainStage(cfg, env)
    stage.trainer = RayTrainLauncher(RayConfig(num_cpus=2))
    stage.setup()
    ctx = ItemContext(env.store(), "train", "train", KEY)
    try:
        rec = stage.process(inputs(root, env), ctx)
    finally:
        ctx.close()
    print(f"resumed_from_step={rec.resumed_from_step}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))

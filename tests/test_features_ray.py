"""A multi-actor Ray run of the features stage gives the same tensors as one process."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from storage.store import ArtifactStore
from talkforge.config import ExecutionConfig, RayConfig
from talkforge.executors import LocalExecutor, RayExecutor
from tasks.base import Resources
from tasks.features import FeaturesConfig, FeaturesStage
from tasks.records import record_from_json
from tasks.runner import WorkItem
from tests.features_helpers import commit_clip, env_for


def _tensors(store: ArtifactStore, outcome) -> dict[str, dict[str, torch.Tensor]]:
    record = record_from_json(outcome.record_type, outcome.record_json)
    return {f.family: load_file(store._path(f.artifact.uri)) for f in record.files}


def test_two_ray_actors_match_a_single_process(tmp_path: Path, ray_session: None) -> None:
    inputs = [
        commit_clip(tmp_path, f"clip{i}", num_frames=10, size_px=64, seed=i) for i in range(3)
    ]
    config = FeaturesConfig(resources=Resources(num_workers=2, batch_size=4))
    env = env_for(tmp_path)

    def items(tag: str) -> list[WorkItem]:
        return [
            WorkItem(item_id=x.item_id, item_key=(tag * 40)[:40], attempt=1, inputs=x)
            for x in inputs
        ]

    local: list = []
    LocalExecutor().run(FeaturesStage, config, env, items("a"), local.append)
    executor = RayExecutor(RayConfig(), ExecutionConfig())
    remote: list = []
    executor.run(FeaturesStage, config, env, items("b"), remote.append)
    workers = {w["worker"] for w in executor.describe_workers("features")}
    executor.release("features")

    assert len(workers) == 2
    assert [o.status for o in local] == ["done"] * 3 and [o.status for o in remote] == ["done"] * 3
    store = ArtifactStore(str(tmp_path / "store"))
    by_item = {o.item_id: _tensors(store, o) for o in local}
    for outcome in remote:
        expected = by_item[outcome.item_id]
        got = _tensors(store, outcome)
        assert set(got) == set(expected) == {
            "vae_latents", "hubert", "liveportrait_motion", "emoca_flame", "reference", "sensevoice"
        }  # fmt: skip
        for family, tensors in expected.items():
            for name, value in tensors.items():
                torch.testing.assert_close(got[family][name], value, atol=1e-4, rtol=1e-4)

"""Multi-actor Ray runs of the features stage give the same tensors as one process.

Two placements: every model inside each stage worker (``in_worker``), and one Ray actor
pool per extractor (``own_pools``), where pool actors that die are replaced by Ray and
their calls re-run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from storage.store import ArtifactStore
from talkforge.config import ExecutionConfig, RayConfig
from talkforge.executors import LocalExecutor, RayExecutor
from talkforge.ray_pools import RayPool, check_fits
from tasks.base import Resources
from tasks.features import FeaturesStage
from tasks.features_config import ExtractorPools, FeaturesConfig
from tasks.features_video import FRAME_FAMILIES
from tasks.records import record_from_json
from tasks.runner import WorkItem
from tests.features_helpers import commit_clip, env_for, face_frames

FAMILIES = {
    "vae_latents", "hubert", "liveportrait_motion", "emoca_flame", "reference", "sensevoice"
}  # fmt: skip
# 1 stage worker + 6 one-actor pools on the tests' 2-CPU Ray instance
SMALL = Resources(num_cpus=0.25, num_workers=1, batch_size=4)
OWN_POOLS = ExtractorPools(
    placement="own_pools", vae_latents=SMALL, liveportrait_motion=SMALL, emoca_flame=SMALL,
    reference=SMALL, hubert=SMALL, sensevoice=SMALL,
)  # fmt: skip


def _tensors(store: ArtifactStore, outcome) -> dict[str, dict[str, torch.Tensor]]:
    record = record_from_json(outcome.record_type, outcome.record_json)
    return {f.family: load_file(store._path(f.artifact.uri)) for f in record.files}


def _items(inputs: list, tag: str) -> list[WorkItem]:
    return [
        WorkItem(item_id=x.item_id, item_key=(tag * 40)[:40], attempt=1, inputs=x) for x in inputs
    ]


def _assert_same(store: ArtifactStore, local: list, remote: list) -> None:
    assert [o.status for o in local] == ["done"] * len(local)
    assert [o.status for o in remote] == ["done"] * len(local)
    by_item = {o.item_id: _tensors(store, o) for o in local}
    for outcome in remote:
        expected = by_item[outcome.item_id]
        got = _tensors(store, outcome)
        assert set(got) == set(expected) == FAMILIES
        for family, tensors in expected.items():
            for name, value in tensors.items():
                # A Ray actor computes with its own thread count, so float32 sums may differ
                # in the last bits; a tensor stored in float16 can then round one ulp apart.
                tol = 1e-3 if value.dtype == torch.float16 else 1e-4
                torch.testing.assert_close(got[family][name], value, atol=tol, rtol=tol)


def test_two_ray_actors_match_a_single_process(tmp_path: Path, ray_session: None) -> None:
    inputs = [
        commit_clip(tmp_path, f"clip{i}", num_frames=10, size_px=64, seed=i) for i in range(3)
    ]
    config = FeaturesConfig(resources=Resources(num_workers=2, batch_size=4))
    env = env_for(tmp_path)

    def items(tag: str) -> list[WorkItem]:
        return _items(inputs, tag)

    local: list = []
    LocalExecutor().run(FeaturesStage, config, env, items("a"), local.append)
    executor = RayExecutor(RayConfig(), ExecutionConfig())
    remote: list = []
    executor.run(FeaturesStage, config, env, items("b"), remote.append)
    workers = {w["worker"] for w in executor.describe_workers("features")}
    executor.release("features")

    assert len(workers) == 2
    _assert_same(ArtifactStore(str(tmp_path / "store")), local, remote)


def test_one_actor_pool_per_extractor_matches_a_single_process(
    tmp_path: Path, ray_session: None
) -> None:
    import ray

    inputs = [
        commit_clip(tmp_path, f"clip{i}", num_frames=10, size_px=64, seed=i) for i in range(3)
    ]
    env = env_for(tmp_path)
    resources = Resources(num_cpus=0.5, num_workers=1, batch_size=4)
    local: list = []
    LocalExecutor().run(
        FeaturesStage, FeaturesConfig(resources=resources), env, _items(inputs, "a"), local.append
    )
    config = FeaturesConfig(resources=resources, pools=OWN_POOLS)
    executor = RayExecutor(RayConfig(), ExecutionConfig())
    remote: list = []
    executor.run(FeaturesStage, config, env, _items(inputs, "b"), remote.append)
    pools = executor.describe_model_pools("features")
    _assert_same(ArtifactStore(str(tmp_path / "store")), local, remote)
    # one actor per extractor, each its own process, models loaded there once, all used
    assert sorted(p["pool"] for p in pools) == sorted(FAMILIES)
    assert len({p["worker"] for p in pools}) == len(FAMILIES)
    stage_workers = {w["worker"] for w in executor.describe_workers("features")}
    assert stage_workers.isdisjoint(p["worker"] for p in pools)
    calls = {p["pool"]: p["calls"] for p in pools}
    assert all(calls[f] >= 3 for f in FRAME_FAMILIES)  # every clip's chunks went through
    assert calls["hubert"] == calls["sensevoice"] == calls["reference"] == 3
    assert all(p["device"] == "cpu" for p in pools)

    # a pool actor killed with a call in flight is replaced by Ray and the call re-runs
    vae_actors = executor._model_pools[next(iter(executor._model_pools))]["vae_latents"]
    pool = RayPool("vae_latents", vae_actors)
    frames = face_frames(4, 64)
    expected = pool.submit("encode", frames).result()
    task = pool.submit("encode", frames)
    ray.kill(vae_actors[0], no_restart=False)
    np.testing.assert_allclose(task.result(), expected, atol=1e-5)
    again: list = []
    executor.run(FeaturesStage, config, env, _items(inputs[:1], "c"), again.append)
    assert [o.status for o in again] == ["done"]
    executor.release("features")


def test_pools_that_cannot_all_be_placed_are_refused_with_the_arithmetic() -> None:
    stage = FeaturesStage(FeaturesConfig(pools=OWN_POOLS), env_for(Path("/nonexistent")))
    specs = [s for s in stage.pool_specs() if s.remote]
    check_fits("features", 1, Resources(num_cpus=0.5), specs, {"CPU": 2.0})  # 0.5 + 6 × 0.25
    with pytest.raises(ValueError, match=r"need 3.5 CPU .*2 stage workers: 2.*has 2"):
        check_fits("features", 2, Resources(num_cpus=1), specs, {"CPU": 2.0})

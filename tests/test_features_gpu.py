"""The features stage on CUDA: same tensors as on the CPU, in float32 and under autocast.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``pytest -m gpu``. Tiny random models are built once and loaded by both stages, so any
difference comes from the device and the precision alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from storage.store import ArtifactStore
from talkforge.config import ExecutionConfig, RayConfig
from talkforge.executors import RayExecutor
from tasks.base import Resources
from tasks.features import FeaturesStage
from tasks.features_config import ExtractorPools, FeaturesConfig
from tasks.records import ClipFeatures, record_from_json
from tasks.runner import WorkItem
from tests.features_helpers import commit_clip, env_for, make_features_stage, run_item

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tensors(tmp_path: Path, record: ClipFeatures) -> dict[str, dict[str, torch.Tensor]]:
    store = ArtifactStore(str(tmp_path / "store"))
    return {f.family: load_file(store._path(f.artifact.uri)) for f in record.files}


def _assert_near(got: dict, want: dict, rel_tol: float) -> None:
    """Every float tensor within ``rel_tol`` of the reference's largest magnitude."""
    assert set(got) == set(want)
    for family, tensors in want.items():
        for name, ref in tensors.items():
            value = got[family][name]
            assert value.shape == ref.shape and value.dtype == ref.dtype, (family, name)
            if not ref.is_floating_point():
                assert torch.equal(value, ref), (family, name)
                continue
            assert torch.isfinite(value.float()).all(), (family, name)
            scale = ref.float().abs().max().clamp_min(1e-6)
            err = (value.float() - ref.float()).abs().max() / scale
            assert err <= rel_tol, f"{family}/{name}: relative error {err:.3g} > {rel_tol}"


@pytest.mark.parametrize(
    ("amp_dtype", "rel_tol"), [("none", 1e-3), ("bfloat16", 0.1), ("float16", 0.05)]
)
def test_cuda_stage_matches_cpu(tmp_path: Path, amp_dtype: str, rel_tol: float) -> None:
    common = {"latent_dtype": "float32", "hubert_dtype": "float32", "amp_dtype": amp_dtype}
    cpu = make_features_stage(tmp_path, **common)
    gpu = make_features_stage(tmp_path, resources=Resources(num_gpus=1, batch_size=6), **common)
    assert {p.worker.device.type for p in gpu.pools.values()} == {"cuda"}
    assert {p.worker.device.type for p in cpu.pools.values()} == {"cpu"}
    inputs = commit_clip(tmp_path, "clip-gpu", num_frames=16, size_px=64)
    want, _ = run_item(cpu, tmp_path, inputs)
    got, _ = run_item(gpu, tmp_path, inputs)
    assert got.num_frames == want.num_frames == 16
    _assert_near(_tensors(tmp_path, got), _tensors(tmp_path, want), rel_tol)


def test_extractor_pools_on_gpu_fractions(tmp_path: Path, ray_session: None) -> None:
    """Six one-actor pools sharing one GPU in tenths; tensors match the CPU stage."""
    cpu = make_features_stage(tmp_path, latent_dtype="float32", hubert_dtype="float32")
    inputs = commit_clip(tmp_path, "clip-pools", num_frames=12, size_px=64)
    want, _ = run_item(cpu, tmp_path, inputs)

    gpu_tenth = Resources(num_cpus=0.25, num_gpus=0.1, num_workers=1, batch_size=8)
    config = FeaturesConfig(
        latent_dtype="float32", hubert_dtype="float32", amp_dtype="none",
        resources=Resources(num_cpus=0.5, batch_size=6),
        pools=ExtractorPools(
            placement="own_pools", vae_latents=gpu_tenth, liveportrait_motion=gpu_tenth,
            emoca_flame=gpu_tenth, reference=gpu_tenth, hubert=gpu_tenth, sensevoice=gpu_tenth,
        ),
    )  # fmt: skip
    executor = RayExecutor(RayConfig(), ExecutionConfig())
    outcomes: list = []
    work = WorkItem(item_id=inputs.item_id, item_key="g" * 40, attempt=1, inputs=inputs)
    executor.run(FeaturesStage, config, env_for(tmp_path), [work], outcomes.append)
    pools = executor.describe_model_pools("features")
    executor.release("features")
    assert [o.status for o in outcomes] == ["done"], outcomes
    assert {p["device"] for p in pools} == {"cuda"} and len(pools) == 6
    got = record_from_json(outcomes[0].record_type, outcomes[0].record_json)
    _assert_near(_tensors(tmp_path, got), _tensors(tmp_path, want), 1e-3)

"""GPU: every metric network gives the CPU's numbers on CUDA (same random-init weights), and
the evaluate stage runs on the GPU when its resources ask for one. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metrics.registry import METRICS
from metrics.suite import Geometry, MetricSuite
from models.registry import ModelSpec, ensure_model
from tests.train_helpers import face_frames

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _paths(root: Path) -> dict[str, Path]:
    out = {}
    for family in {m.network for m in METRICS.values() if m.network}:
        path = ensure_model(ModelSpec(family=family, source=family, tiny_random=True), root)
        assert path is not None
        out[family] = path
    return out


def test_every_network_matches_the_cpu_on_cuda(tmp_path):
    paths = _paths(tmp_path)
    frames = face_frames(40, 128, seed=0)
    rng = np.random.default_rng(0)
    noisy = np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)
    samples = 0.2 * np.sin(np.arange(40 * 640) / 7.0)
    geometry = Geometry(syncnet=np.tile(np.array([[1.75, 0, 0], [0, 1.75, 0]]), (40, 1, 1)))
    values = {}
    for device in ("cpu", "cuda"):
        suite = MetricSuite(list(METRICS), paths, device=device, batch_size=8)
        truth = suite.describe(frames, samples, 16000, 25.0, geometry)
        gen = suite.describe(noisy, samples, 16000, 25.0, geometry)
        values[device] = (suite.compare(gen, truth), gen.set_features())
    cpu, gpu = values["cpu"], values["cuda"]
    assert set(cpu[0]) == set(gpu[0])
    for name, v in cpu[0].items():
        if name == "av_offset_frames":  # an argmin over a random net's near-flat distances
            continue
        assert gpu[0][name] == pytest.approx(v, rel=2e-2, abs=2e-3), name  # cuDNN / TF32
    for key, feats in cpu[1].items():
        scale = np.abs(feats).max()
        np.testing.assert_allclose(gpu[1][key], feats, atol=2e-2 * scale, err_msg=key)

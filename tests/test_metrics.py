"""Metrics without networks: PSNR/SSIM against skimage, Fréchet distance, the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from metrics import METRICS, Level, Setting, metrics_for
from metrics.frechet import (
    GaussianStats,
    frechet_distance,
    frechet_from_samples,
    frechet_of_features,
    gaussian_stats,
)
from metrics.image import PSNR_CAP_DB, psnr_db, ssim


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_and_ssim_match_skimage():
    a, b = _pair()
    assert psnr_db(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255))
    ref = structural_similarity(a, b, channel_axis=2, data_range=255, win_size=7)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-12)
    assert psnr_db(a, a) == PSNR_CAP_DB and ssim(a, a) == pytest.approx(1.0)
    z = np.zeros((4, 4, 3), np.uint8)
    assert psnr_db(z, z + 10) == pytest.approx(10 * math.log10(255**2 / 100))


def test_frechet_closed_form_for_two_gaussians():
    # diagonal covariances: d² = ‖μ₁−μ₂‖² + Σ (σ₁ − σ₂)²  (σ the standard deviations)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    d = frechet_distance(GaussianStats(mu1, np.diag(v1), 10), GaussianStats(mu2, np.diag(v2), 10))
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert d == pytest.approx(expected)


def test_frechet_matches_the_scipy_sqrtm_formula_on_full_covariances():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    sa, sb = gaussian_stats(a), gaussian_stats(b)
    covmean = linalg.sqrtm(sa.sigma @ sb.sigma).real
    diff = sa.mu - sb.mu
    ref = diff @ diff + np.trace(sa.sigma + sb.sigma - 2 * covmean)
    assert frechet_of_features(a, b) == pytest.approx(ref, rel=1e-9)
    np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False))


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    assert frechet_of_features(x, x) == pytest.approx(0.0, abs=1e-8)
    values = [
        frechet_of_features(x, x + rng.normal(scale=s, size=x.shape)) for s in (0.2, 0.5, 1.0)
    ]
    assert values == sorted(values) and values[0] > 0
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])


def test_sample_space_path_equals_the_feature_space_path():
    rng = np.random.default_rng(4)
    for n1, n2, dim in ((200, 150, 6), (7, 9, 64), (3, 40, 30)):
        a = rng.normal(size=(n1, dim)) * rng.uniform(0.5, 2, dim)
        b = rng.normal(size=(n2, dim)) + 0.3
        feature_space = frechet_distance(gaussian_stats(a), gaussian_stats(b))
        assert frechet_from_samples(a, b) == pytest.approx(feature_space, rel=1e-7, abs=1e-9)
        assert frechet_of_features(a, b) == pytest.approx(feature_space, rel=1e-7, abs=1e-9)
    # 2048-d features of a few frames (FID on a short clip): the sample path, exact and fast
    a, b = rng.normal(size=(12, 2048)), rng.normal(size=(10, 2048)) + 0.1
    assert frechet_of_features(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_of_features(a, b) > 0


def test_frechet_of_rank_deficient_sets_stays_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))  # fewer samples than dims
    d = frechet_of_features(a, b)
    assert np.isfinite(d) and d > 0


def test_registry_levels_and_settings():
    assert METRICS["fid"].level == METRICS["fvd"].level == Level.SET
    assert METRICS["psnr_db"].level == Level.CLIP
    cross = {m.name for m in metrics_for(Setting.CROSS)}
    assert {"fid", "csim", "sync_c", "sync_d", "apd_deg"} <= cross
    assert not {"psnr_db", "ssim", "lpips_alex", "fvd"} & cross  # paired metrics need own audio
    self_set = {m.name for m in metrics_for(Setting.SELF, Level.SET)}
    assert self_set == {"fid", "fvd"}
    assert all(m.network is None or m.network for m in METRICS.values())

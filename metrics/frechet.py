"""Fréchet distance between Gaussians fitted to two feature sets (FID, FVD).

``d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)``. pytorch-fid takes the trace term from
``scipy.linalg.sqrtm(Σ₁Σ₂)``; that general square root of a non-symmetric product breaks
down (huge imaginary parts) when the covariances are singular, which they are whenever a set
has fewer samples than feature dimensions (FID on a few hundred frames of 2048-d features).
Here the same trace is computed from symmetric matrices only, in float64:
``Tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½)`` (the product is similar to a PSD matrix, so its
eigenvalues are those of the PSD one), with negative rounding clipped to 0. On well-conditioned
covariances it equals the sqrtm value (tested); on singular ones it stays exact and finite.
Covariances are unbiased (``ddof=1``), so a set needs at least 2 samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class GaussianStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of ``(N, D)`` features (``N ≥ 2``)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
    return GaussianStats(x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False)), len(x))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr (s1 s2)^½`` for PSD ``s1``, ``s2`` (see module docstring)."""
    h = _psd_sqrt(s1)
    inner = h @ s2 @ h
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"feature dims differ: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    trace = np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return max(float(diff @ diff + trace), 0.0)  # rounding can take an identical pair below 0


def frechet_of_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(gaussian_stats(a), gaussian_stats(b))

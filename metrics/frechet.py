"""Fréchet distance between Gaussians fitted to two feature sets (FID, FVD).

``d² = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁Σ₂)^½``. pytorch-fid takes the trace term from
``scipy.linalg.sqrtm(Σ₁Σ₂)``; that general square root of a non-symmetric product breaks
down (huge imaginary parts) when the covariances are singular, which they are whenever a set
has fewer samples than feature dimensions (FID on a few hundred frames of 2048-d features).
Two exact paths are used instead, both in float64:

- **feature space** (:func:`frechet_distance`, from :class:`GaussianStats`):
  ``Tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½)`` (the product is similar to a PSD matrix, so its
  eigenvalues are those of the PSD one), negative rounding clipped to 0: two ``D × D``
  eigendecompositions;
- **sample space** (:func:`frechet_of_features` when ``N₁·N₂ < D²``): with centred
  samples ``Σ₁ = AAᵀ``, ``Σ₂ = BBᵀ`` (``A = X̃₁ᵀ/√(N₁−1)``), the non-zero eigenvalues of
  ``Σ₁Σ₂`` are those of ``(BᵀA)(BᵀA)ᵀ``, so ``Tr (Σ₁Σ₂)^½`` is the nuclear norm of the
  ``N₂ × N₁`` matrix ``BᵀA`` and ``Tr Σ₁ = ‖A‖²_F``. The same number without ever forming a
  ``D × D`` matrix: for 2048-d Inception features of a few hundred frames it is one small
  SVD instead of two ``2048³`` eigendecompositions (seconds → milliseconds on CPU).

Both equal the sqrtm value on well-conditioned covariances (tested) and stay exact and
finite on singular ones. Covariances are unbiased (``ddof=1``), so a set needs ≥ 2 samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class GaussianStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int


def _samples(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
    return x


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of ``(N, D)`` features (``N ≥ 2``)."""
    x = _samples(features)
    return GaussianStats(x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False)), len(x))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr (s1 s2)^½`` for PSD ``s1``, ``s2`` (feature-space path, see module docstring)."""
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


def frechet_from_samples(a: np.ndarray, b: np.ndarray) -> float:
    """The sample-space path (module docstring): exact for any ``N``, cheap when ``N ≪ D``."""
    x, y = _samples(a), _samples(b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    diff = x.mean(axis=0) - y.mean(axis=0)
    fa = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)  # rows: Σ₁ = faᵀ fa
    fb = (y - y.mean(axis=0)) / np.sqrt(len(y) - 1)
    nuclear = float(np.linalg.svd(fb @ fa.T, compute_uv=False).sum())
    trace = float((fa * fa).sum() + (fb * fb).sum()) - 2.0 * nuclear
    return max(float(diff @ diff) + trace, 0.0)


def frechet_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two ``(N, D)`` feature sets, by the cheaper exact path."""
    if np.shape(a) == np.shape(b) and np.array_equal(a, b):
        return 0.0  # exact; the trace terms below cancel only to rounding of their size
    n1, n2, dim = len(a), len(b), np.shape(a)[-1]
    if n1 * n2 < dim * dim:
        return frechet_from_samples(a, b)
    return frechet_distance(gaussian_stats(a), gaussian_stats(b))

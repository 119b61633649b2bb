"""Which samples a training step sees: weighted clips, windows, IFS references, DMS margins.

Everything here is a pure function of ``(seed, step)`` and the clips' static metadata, so
ranks slice one global batch and a resumed run sees the batches an uninterrupted run
would (no sampler state to checkpoint).

- **Clips and windows.** A sample is ``F = n_sample_frames`` consecutive frames. Clip ``c``
  is drawn with probability ``∝ sampling_weight_c × starts_c`` (``starts_c``: its valid
  window starts), then the start uniformly: with weight 1 everywhere every window is
  equally likely (long clips count more, as frames do in MuseTalk 1.5's HDTF repeats), and a
  clip's quality weight multiplies its frequency; weight 0 never samples it.
- **Informative Frame Sampling** (MuseTalk §3.3; ``sample_method:
  pose_similarity_and_mouth_dissimilarity``, ``top_k_ratio 0.51``): one reference per
  target frame from the intersection of the ``k = ⌈ratio·T⌉`` frames nearest in head pose
  and the ``k`` farthest in mouth shape, at least ``min_gap_frames`` away; an empty
  intersection falls back to any frame that far. MuseTalk measures pose on DWPose jaw
  landmarks and mouth on inner-lip landmarks; the faces stage keeps only 5-point landmarks,
  so this uses the feature cache: **pose** = LivePortrait pitch/yaw/roll (degrees), **mouth**
  = EMOCA FLAME jaw rotation (3) and expression (50), the two blocks weighted equally
  (:func:`mouth_descriptor`; the jaw alone misses lip rounding, the expression alone
  under-weights opening).
- **Dynamic Margin Sampling** (stage 2): MuseTalk extends the crop's bottom edge by
  ``m ~ clip(N(10, 10), 0, 20)`` px per sample and masks the lower half of that taller crop,
  whose upper edge lies ``m/2`` below the original crop's middle (``m/2 · H/(H+m)`` px once
  resized back to ``H``). Training reads cached latents of fixed crops, so the margin moves
  the **mask's upper edge** down by that amount instead: ``m`` from the same distribution,
  converted to latent rows (``/ stride``) and rounded stochastically, so the expected edge is
  exact at latent resolution. Sampling uses the mean margin's edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from generators.musetalk2.config import DMSOptions, SamplingOptions


@dataclass(frozen=True)
class ClipMeta:
    """What sampling needs of one clip (arrays are per frame)."""

    num_frames: int
    weight: float
    pose: np.ndarray | None  # (T, 3) degrees
    mouth: np.ndarray | None  # (T, M) standardised
    max_start: int  # last valid window start (e.g. the audio for the sync mel must cover it)


@dataclass(frozen=True)
class SamplePick:
    clip: int
    start: int
    references: tuple[int, ...]  # one per frame of the window
    margin_px: float  # DMS margin (0 without DMS)
    mask_rows: int  # latent rows the mask edge moves down


def step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def clip_probabilities(clips: list[ClipMeta], frames: int) -> np.ndarray:
    """``P(clip) ∝ weight × number of valid window starts``."""
    starts = np.array([max(0, min(c.max_start, c.num_frames - frames) + 1) for c in clips])
    mass = np.array([c.weight for c in clips], dtype=np.float64) * starts
    if mass.sum() <= 0:
        raise ValueError(f"no clip has a positive weight and a full {frames}-frame window")
    return mass / mass.sum()


def mouth_descriptor(jaw: np.ndarray, expression: np.ndarray) -> np.ndarray:
    """``[jaw, expression]``, each block centred over the clip and scaled to unit mean
    squared norm, so both blocks weigh the same while each keeps its coefficients' relative
    scales (per-coefficient standardisation would let the many near-constant expression
    coefficients drown the few that move with the mouth)."""

    def unit(block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float64)
        centred = block - block.mean(axis=0)
        rms = math.sqrt(float((centred**2).sum(axis=1).mean()))
        return centred / (rms if rms > 1e-12 else 1.0)

    return np.concatenate([unit(jaw), unit(expression)], 1)


def far_enough(t: int, num_frames: int, min_gap: int) -> np.ndarray:
    idx = np.arange(num_frames)
    return np.abs(idx - t) >= max(min_gap, 1)


def ifs_candidates(
    pose: np.ndarray, mouth: np.ndarray, t: int, top_k_ratio: float, min_gap: int
) -> np.ndarray:
    """Frames that are among the ``k`` most pose-similar and the ``k`` most mouth-dissimilar
    to frame ``t`` and at least ``min_gap`` away (possibly empty)."""
    n = pose.shape[0]
    k = max(1, math.ceil(top_k_ratio * n))
    d_pose = np.linalg.norm(pose - pose[t], axis=1)
    d_mouth = np.linalg.norm(mouth - mouth[t], axis=1)
    similar = np.argsort(d_pose, kind="stable")[:k]
    dissimilar = np.argsort(-d_mouth, kind="stable")[:k]
    both = np.intersect1d(similar, dissimilar)
    return both[far_enough(t, n, min_gap)[both]]


def pick_reference(clip: ClipMeta, t: int, opts: SamplingOptions, rng) -> int:
    """One reference frame for target frame ``t`` (IFS, or uniform with the gap)."""
    if opts.reference == "ifs" and clip.pose is not None and clip.mouth is not None:
        cands = ifs_candidates(clip.pose, clip.mouth, t, opts.top_k_ratio, opts.min_gap_frames)
        if len(cands):
            return int(cands[rng.integers(len(cands))])
    allowed = np.flatnonzero(far_enough(t, clip.num_frames, opts.min_gap_frames))
    if len(allowed) == 0:  # a clip shorter than the gap: the farthest frame
        return 0 if t >= clip.num_frames - 1 - t else clip.num_frames - 1
    return int(allowed[rng.integers(len(allowed))])


def dms_margin(opts: DMSOptions, rng) -> float:
    """``clip(N(mean, std), 0, max)`` pixels (0 when DMS is off)."""
    if not opts.enabled:
        return 0.0
    return float(np.clip(rng.normal(opts.mean_px, opts.std_px), 0.0, opts.max_px))


def edge_shift_rows(margin_px: float, height_px: int, stride: int) -> float:
    """How far (latent rows) a crop margin of ``margin_px`` moves the mask edge down."""
    return margin_px / 2 * height_px / (height_px + margin_px) / stride


def margin_rows(margin_px: float, height_px: int, stride: int, rng) -> int:
    """:func:`edge_shift_rows` rounded stochastically: exact in expectation."""
    rows = edge_shift_rows(margin_px, height_px, stride)
    base = math.floor(rows)
    return base + int(rng.random() < rows - base)


def step_picks(
    clips: list[ClipMeta],
    frames: int,
    opts: SamplingOptions,
    height_px: int,
    stride: int,
    seed: int,
    step: int,
    global_batch: int,
) -> list[SamplePick]:
    """The ``global_batch`` samples of ``step``, from ``(seed, step)`` alone."""
    rng = step_rng(seed, step)
    probs = clip_probabilities(clips, frames)
    chosen = rng.choice(len(clips), size=global_batch, p=probs)
    picks = []
    for c in chosen.tolist():
        clip = clips[c]
        last = min(clip.max_start, clip.num_frames - frames)
        start = int(rng.integers(0, last + 1))
        refs = tuple(pick_reference(clip, start + f, opts, rng) for f in range(frames))
        margin = dms_margin(opts.dms, rng)
        rows = margin_rows(margin, height_px, stride, rng) if opts.dms.enabled else 0
        picks.append(SamplePick(c, start, refs, margin, rows))
    return picks


def mouth_mask(height: int, width: int, rows_down: int) -> np.ndarray:
    """``(1, h, w)`` float mask: 1 from row ``h//2 + rows_down`` on (the inpainted region)."""
    edge = min(height - 1, height // 2 + rows_down)
    mask = np.zeros((1, height, width), dtype=np.float32)
    mask[:, edge:, :] = 1.0
    return mask

"""Training-data sampling of musetalk2 (issue 11 §1): IFS, DMS, clip weights, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from generators.musetalk2.config import DMSOptions, SamplingOptions
from generators.musetalk2.sampling import (
    ClipMeta,
    dms_margin,
    edge_shift_rows,
    ifs_candidates,
    margin_rows,
    mouth_descriptor,
    mouth_mask,
    pick_reference,
    step_picks,
    step_rng,
)


def _constructed(frames: int = 80):
    """Two head poses (frames < 40 look left, ≥ 40 right) and a mouth that opens on even
    frames; jitter keeps the distances distinct."""
    rng = np.random.default_rng(0)
    pose = np.zeros((frames, 3))
    pose[:, 1] = np.where(np.arange(frames) < frames // 2, -25.0, 25.0)
    pose += rng.normal(scale=0.5, size=pose.shape)
    jaw = np.zeros((frames, 3))
    jaw[:, 0] = np.where(np.arange(frames) % 2 == 0, 0.3, 0.0) + rng.normal(0, 0.01, frames)
    expression = rng.normal(scale=0.05, size=(frames, 50))
    expression[:, 0] += jaw[:, 0] * 10
    return pose, mouth_descriptor(jaw, expression)


def test_ifs_picks_pose_similar_mouth_dissimilar_references_away_from_the_target():
    pose, mouth = _constructed()
    clip = ClipMeta(80, 1.0, pose, mouth, 79)
    opts = SamplingOptions(top_k_ratio=0.45)  # k = 36 < 40 frames per pose
    rng = np.random.default_rng(1)
    for t in range(80):
        cands = ifs_candidates(pose, mouth, t, opts.top_k_ratio, opts.min_gap_frames)
        assert len(cands) > 0
        same_side = (cands < 40) == (t < 40)
        other_mouth = cands % 2 != t % 2
        assert same_side.all() and other_mouth.all() and (np.abs(cands - t) >= 5).all()
        ref = pick_reference(clip, t, opts, rng)
        assert ref in cands
    # a random reference ignores both: about half its picks have the wrong pose or mouth
    random = SamplingOptions(reference="random")
    picks = [(t, pick_reference(clip, t, random, rng)) for t in range(80) for _ in range(5)]
    wrong = [((r < 40) != (t < 40)) or (r % 2 == t % 2) for t, r in picks]
    assert 0.6 < np.mean(wrong) < 0.9


def test_ifs_falls_back_to_any_frame_far_enough_when_the_sets_do_not_meet():
    frames = 30
    pose = np.arange(frames, dtype=float)[:, None].repeat(3, 1)  # pose and mouth move together,
    mouth = pose.copy()  # so the nearest poses are the nearest mouths: no intersection
    cands = ifs_candidates(pose, mouth, 15, 0.2, 5)
    assert len(cands) == 0
    clip = ClipMeta(frames, 1.0, pose, mouth, frames - 1)
    rng = np.random.default_rng(0)
    refs = {pick_reference(clip, 15, SamplingOptions(top_k_ratio=0.2), rng) for _ in range(200)}
    assert all(abs(r - 15) >= 5 for r in refs) and len(refs) > 10


def test_dms_margins_follow_the_configured_clipped_normal():
    opts = DMSOptions(enabled=True, mean_px=10.0, std_px=10.0, max_px=20.0)
    rng = np.random.default_rng(2)
    m = np.array([dms_margin(opts, rng) for _ in range(20_000)])
    assert m.min() == 0.0 and m.max() == 20.0
    # atoms at the clip points: P(N < 0) = P(N > 20) = Φ(-1)
    assert np.mean(m == 0.0) == pytest.approx(stats.norm.cdf(-1), abs=0.01)
    assert np.mean(m == 20.0) == pytest.approx(stats.norm.cdf(-1), abs=0.01)
    inner = m[(m > 0) & (m < 20)]
    truncated = stats.truncnorm(-1, 1, loc=10, scale=10)
    assert stats.kstest(inner, truncated.cdf).pvalue > 0.01
    assert stats.kstest(inner, stats.uniform(0, 20).cdf).pvalue < 1e-6  # the test can fail
    assert dms_margin(DMSOptions(enabled=False), rng) == 0.0


def test_dms_mask_edge_moves_by_the_margin_in_expectation():
    rng = np.random.default_rng(3)
    height_px, stride = 256, 8
    margin = 14.0
    rows = [margin_rows(margin, height_px, stride, rng) for _ in range(20_000)]
    expected = edge_shift_rows(margin, height_px, stride)  # 7 px · 256/270 / 8
    assert expected == pytest.approx(14 / 2 * 256 / 270 / 8)
    assert set(rows) == {0, 1} and np.mean(rows) == pytest.approx(expected, abs=0.01)
    mask = mouth_mask(32, 32, 2)
    assert mask[0, 17].sum() == 0 and mask[0, 18].all() and mask[0, 31].all()


def _clips(weights, frames=60):
    return [ClipMeta(frames, w, None, None, frames - 1) for w in weights]


def test_sampling_weights_change_clip_frequencies_as_configured():
    clips = _clips([1.0, 3.0, 0.0, 1.0])
    opts = SamplingOptions(reference="random")
    counts = np.zeros(4)
    for step in range(1, 401):
        for p in step_picks(clips, 4, opts, 256, 8, 0, step, 8):
            counts[p.clip] += 1
    assert counts[2] == 0
    expected = np.array([1, 3, 1]) / 5 * counts.sum()
    assert stats.chisquare(counts[[0, 1, 3]], expected).pvalue > 0.01
    uniform = np.full(3, counts.sum() / 3)
    assert stats.chisquare(counts[[0, 1, 3]], uniform).pvalue < 1e-6
    # windows of a clip of weight 1 are uniform over its starts
    starts = [
        p.start for s in range(1, 300) for p in step_picks(_clips([1.0]), 4, opts, 256, 8, 0, s, 4)
    ]
    assert stats.chisquare(np.bincount(starts, minlength=57)).pvalue > 0.01


def test_picks_depend_only_on_seed_and_step_and_ranks_slice_one_batch():
    pose, mouth = _constructed()
    clips = [ClipMeta(80, 1.0, pose, mouth, 79), ClipMeta(80, 2.0, pose, mouth, 70)]
    opts = SamplingOptions(dms=DMSOptions(enabled=True))
    a = step_picks(clips, 16, opts, 256, 8, 5, 12, 6)
    assert a == step_picks(clips, 16, opts, 256, 8, 5, 12, 6)
    assert a != step_picks(clips, 16, opts, 256, 8, 5, 13, 6)
    assert a != step_picks(clips, 16, opts, 256, 8, 6, 12, 6)
    assert all(p.start <= (79 - 15 if p.clip == 0 else 64) for p in a)
    assert all(len(p.references) == 16 for p in a)
    assert step_rng(5, 12).random() == step_rng(5, 12).random()


def test_a_clip_without_a_full_window_is_never_sampled_and_all_zero_is_an_error():
    clips = [ClipMeta(10, 1.0, None, None, 9), ClipMeta(40, 1.0, None, None, 39)]
    opts = SamplingOptions(reference="random")
    assert {p.clip for s in range(50) for p in step_picks(clips, 16, opts, 256, 8, 0, s, 4)} == {1}
    with pytest.raises(ValueError, match="positive weight"):
        step_picks(_clips([0.0, 0.0]), 4, opts, 256, 8, 0, 1, 2)

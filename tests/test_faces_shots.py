"""Shot-change detection: adaptive content scores (no model)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tasks.faces_shots import ContentScorer, CutFinder, detect_cuts
from tasks.media import iter_frames, probe
from tests.faces_helpers import CLIPS


def test_single_jump_is_a_cut_but_steady_fast_motion_is_not():
    calm = [0.0, 1.0, 1.2, 0.9, 30.0, 1.1, 1.0, 0.8]
    assert list(detect_cuts(calm)) == [4]
    fast = [0.0, 20.0, 22.0, 25.0, 21.0, 24.0, 23.0]  # whip pan: every frame changes a lot
    assert list(detect_cuts(fast)) == []
    assert list(detect_cuts([0.0, 10.0, 0.5, 0.4], min_content=15.0)) == []  # too small
    assert list(detect_cuts([0.0, 40.0])) == [1]  # no neighbours but itself: a cut
    assert list(detect_cuts([])) == [] and list(detect_cuts([0.0])) == []


def test_content_scorer_sees_a_scene_change_not_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(60, 200, (1, 48, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (1, 48, 64, 3), dtype=np.uint8)
    noise = lambda f: np.clip(f.astype(int) + rng.integers(-2, 3, f.shape), 0, 255).astype(np.uint8)  # noqa: E731
    frames = np.concatenate([a, noise(a), noise(a), b, noise(b), noise(b)])
    scorer = ContentScorer()
    scorer.add(frames[:2])  # streamed in chunks
    scorer.add(frames[2:])
    assert len(scorer.scores) == 6 and scorer.scores[0] == 0.0
    assert list(detect_cuts(scorer.scores)) == [3]


def test_cut_finder_decides_while_streaming_as_detect_cuts_does_at_the_end():
    rng = np.random.default_rng(1)
    for trial in range(20):
        scores = [0.0, *rng.choice([0.5, 2.0, 20.0, 60.0], size=60, p=[0.5, 0.3, 0.1, 0.1])]
        finder, fed = CutFinder(), []
        bounds = sorted(rng.choice(np.arange(1, len(scores)), size=6, replace=False))
        for lo, hi in zip([0, *bounds], [*bounds, len(scores)], strict=True):
            fed.extend(scores[lo:hi])
            decided = finder.update(fed)
            assert decided == max(1, len(fed) - finder.window)
            # a decided cut never changes once later scores arrive
            assert finder.cuts == [c for c in detect_cuts(scores) if c < decided], trial
        finder.update(fed, final=True)
        assert finder.cuts == list(detect_cuts(scores))


def test_strided_scores_keep_real_shots_apart():
    """Two real clips back to back: one cut at the join, none inside either shot."""
    if not (CLIPS / "face_3.mp4").exists():
        pytest.skip("shared fixture clips are not present")
    shots = []
    for name in ("face_3", "face_5"):
        path = CLIPS / f"{name}.mp4"
        info = probe(path)
        frames = np.concatenate(list(iter_frames(path, info.width, info.height)))[:60]
        shots.append(np.stack([cv2.resize(f, (512, 512)) for f in frames]))
    scorer = ContentScorer()
    for chunk in np.array_split(np.concatenate(shots), 7):
        scorer.add(chunk)
    scores = np.asarray(scorer.scores)
    assert list(detect_cuts(scores)) == [60]
    assert scores[60] > 30 and np.delete(scores, 60).max() < 10

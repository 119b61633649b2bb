"""Shot-change detection: adaptive content scores (no model)."""

from __future__ import annotations

import numpy as np

from tasks.faces_shots import ContentScorer, detect_cuts


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

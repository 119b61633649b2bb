"""APD: average head-pose distance from the LivePortrait motion extractor's pose heads.

Per frame, pitch / yaw / roll (degrees: the expectation over 66 bins of 3°) of the generated
and the ground-truth face crop, resized to the extractor's 256 px input; APD is the mean
absolute difference over frames and the three angles. Protocols differ between papers in
the estimator; this one is the pipeline's own (the same numbers the features stage stores).
"""

from __future__ import annotations

import cv2
import numpy as np

from models.liveportrait import INPUT_SIZE, MotionExtractor, extract_motion, motion_slices


def head_pose_deg(model: MotionExtractor, frames: np.ndarray, batch: int = 32) -> np.ndarray:
    """``(N, 3)`` pitch, yaw, roll in degrees of ``(N, H, W, 3)`` uint8 RGB crops."""
    if frames.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        interp = cv2.INTER_AREA if frames.shape[1] > INPUT_SIZE else cv2.INTER_CUBIC
        frames = np.stack(
            [cv2.resize(f, (INPUT_SIZE, INPUT_SIZE), interpolation=interp) for f in frames]
        )
    motion = extract_motion(model, frames, batch_size=batch)
    s = motion_slices()
    pose = np.concatenate([motion[:, s[k]] for k in ("pitch", "yaw", "roll")], axis=1)
    return pose.astype(np.float64)


def apd_deg(generated_pose: np.ndarray, truth_pose: np.ndarray) -> float:
    """Mean absolute pose difference (degrees) over frames and angles."""
    n = min(len(generated_pose), len(truth_pose))
    return float(np.mean(np.abs(generated_pose[:n] - truth_pose[:n]))) if n else float("nan")

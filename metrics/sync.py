"""Sync-C / Sync-D (LSE-C / LSE-D) and the audio-video offset with SyncNet, as the reference.

The scorer follows ``joonson/syncnet_python`` (``SyncNetInstance.evaluate``), which the
Wav2Lip and LatentSync evaluations use: 5-frame video windows of 224 px crops and
20-step (0.2 s) MFCC windows at 25 fps / 16 kHz through the SyncNet of
:mod:`models.syncnet`; distances over lags ±15 frames; Sync-D the lowest mean distance,
Sync-C the median over lags of the mean distance minus the lowest
(:func:`models.syncnet.sync_scores`). Sign: ``offset > 0`` means the audio lags the video
(syncnet_python prints the negated value as "AV offset").

Crops: :func:`syncnet_crop_affines` cuts syncnet_python's ``crop_video`` square out of a
face crop (side 1.4 × the face box, from the box top to 0.9 box sides below its centre);
what the face crop does not cover is gray 110, the reference's padding. Arrays in: the
face-crop frames (any iterable, streamed: only one batch of windows is held), the per-frame
source→crop affines and face boxes, and the float samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from models.syncnet_spec import FPS, LIP_FRAMES, LIP_SIZE_PX, SAMPLE_RATE_HZ

if TYPE_CHECKING:
    import torch

    from models.syncnet import SyncScores

MAX_LAG_FRAMES = 15
SYNCNET_CROP_SCALE = 0.4  # syncnet_python's ``cs``
SYNCNET_PAD_VALUE = 110


@dataclass(frozen=True, slots=True)
class OffsetEstimate:
    """One measurement of the audio-video offset (sign: see module docstring).

    ``confidence``: SyncNet's Sync-C (or another estimator's z-score); ``score``: Sync-D (or
    the estimator's peak correlation). ``unmeasurable`` says why there is no estimate at all
    (empty when there is one, whatever its confidence).
    """

    method: str
    offset_frames: float
    offset_ms: float
    confidence: float
    score: float
    at_search_edge: bool = False  # the best lag is ±max_lag: the true one may lie beyond
    unmeasurable: str = ""


def unmeasurable(method: str, why: str) -> OffsetEstimate:
    return OffsetEstimate(method, 0.0, 0.0, 0.0, 0.0, unmeasurable=why)


def syncnet_crop_affines(source_to_crop: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    """``(N, 2, 3)`` affines from face-crop pixels to SyncNet's 224 px input, per frame.

    ``source_to_crop``: the faces stage's ``(N, 2, 3)`` source→crop maps; ``boxes_xyxy``:
    ``(N, 4)`` face boxes in source pixels. The box is mapped into the crop; the SyncNet
    square then spans ``(1 + cs)`` half-sides either side of the box centre and from the box
    top to ``(1 + 2·cs)`` half-sides below the centre (``cs = 0.4``).
    """
    m = np.asarray(source_to_crop, dtype=np.float64)
    x1, y1, x2, y2 = np.asarray(boxes_xyxy, dtype=np.float64).T
    centre = np.einsum("nij,nj->ni", m[:, :, :2], np.stack([(x1 + x2) / 2, (y1 + y2) / 2], 1))
    centre += m[:, :, 2]
    scale = np.sqrt(np.abs(np.linalg.det(m[:, :, :2])))
    half = np.maximum(np.maximum(x2 - x1, y2 - y1) * scale / 2, 1.0)
    k = LIP_SIZE_PX / (2 * half * (1 + SYNCNET_CROP_SCALE))
    out = np.zeros((len(half), 2, 3))
    out[:, 0, 0] = out[:, 1, 1] = k
    out[:, 0, 2] = -k * (centre[:, 0] - half * (1 + SYNCNET_CROP_SCALE))
    out[:, 1, 2] = -k * (centre[:, 1] - half)
    return out


class SyncNetScorer:
    """SyncNet offset, Sync-C and Sync-D of a clip (25 fps, 16 kHz); loads the net once."""

    def __init__(self, weights: Path, device: str = "cpu", batch_windows: int = 16) -> None:
        from models.syncnet import load_syncnet

        self.device = device
        self.model = load_syncnet(weights, device)
        self.batch_windows = max(1, batch_windows)

    def measure(
        self,
        frames: Iterable[np.ndarray],
        crop_affines: np.ndarray,
        samples: np.ndarray,
        rate_hz: int,
        fps: float,
        max_lag: int = MAX_LAG_FRAMES,
    ) -> OffsetEstimate:
        """Score RGB face-crop ``frames`` with ``crop_affines`` (:func:`syncnet_crop_affines`)."""
        method = "syncnet"
        if abs(fps - FPS) > 1e-3 or rate_hz != SAMPLE_RATE_HZ:
            got = f"{fps:g} fps, {rate_hz} Hz"
            return unmeasurable(method, f"SyncNet needs 25 fps and 16 kHz audio, got {got}")
        # as the reference: windows start at frames 0 .. min(frames, audio frames) − 6
        count = min(len(crop_affines), len(samples) * int(FPS) // rate_hz) - LIP_FRAMES
        if count < 2 * max_lag + 1:
            return unmeasurable(method, f"{count} SyncNet windows < {2 * max_lag + 1}")
        s = self.distances(frames, crop_affines, samples, count, max_lag)
        return OffsetEstimate(
            method=method,
            offset_frames=float(s.offset_frames),
            offset_ms=1000.0 * s.offset_frames / fps,
            confidence=s.sync_c,
            score=s.sync_d,
            at_search_edge=abs(s.offset_frames) == max_lag,
        )

    def distances(
        self,
        frames: Iterable[np.ndarray],
        crop_affines: np.ndarray,
        samples: np.ndarray,
        count: int,
        max_lag: int = MAX_LAG_FRAMES,
    ) -> SyncScores:
        """The per-lag mean distances and scores of the first ``count`` windows."""
        from models.syncnet import sync_scores

        lips = self.lip_embeddings(frames, crop_affines, count)
        return sync_scores(lips, self.audio_embeddings(samples, count), max_lag)

    def audio_embeddings(self, samples: np.ndarray, count: int) -> np.ndarray:
        """``(count, 1024)`` embeddings of the MFCC windows of 16 kHz ``samples``."""
        from models.syncnet import mfcc, mfcc_windows

        windows = mfcc_windows(mfcc(samples, SAMPLE_RATE_HZ), count)
        return self._embed(windows, self.model.forward_aud)

    def lip_embeddings(
        self, frames: Iterable[np.ndarray], crop_affines: np.ndarray, count: int
    ) -> np.ndarray:
        """``(count, 1024)`` embeddings of the 5-frame windows starting at frames ``0…count−1``."""
        return np.concatenate(list(self._lip_batches(frames, crop_affines, count)))

    def _embed(
        self, inputs: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_windows):
                batch = inputs[start : start + self.batch_windows].to(self.device)
                out.append(forward(batch).float().cpu().numpy())
        return np.concatenate(out)

    def _lip_batches(
        self, frames: Iterable[np.ndarray], affines: np.ndarray, count: int
    ) -> Iterator[np.ndarray]:
        """Warp and embed, holding only the frames of the next batch of 5-frame windows."""
        span = self.batch_windows + LIP_FRAMES - 1
        buf: list[np.ndarray] = []
        for i, frame in enumerate(islice(frames, count + LIP_FRAMES - 1)):
            warped = cv2.warpAffine(
                frame, affines[i], (LIP_SIZE_PX, LIP_SIZE_PX),
                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                borderValue=(SYNCNET_PAD_VALUE,) * 3,
            )  # fmt: skip
            buf.append(warped[:, :, ::-1])  # RGB → BGR, as cv2.imread gives
            if len(buf) == span:
                yield self._lips(buf)
                buf = buf[-(LIP_FRAMES - 1) :]
        if len(buf) >= LIP_FRAMES:
            yield self._lips(buf)

    def _lips(self, frames: list[np.ndarray]) -> np.ndarray:
        import torch

        stack = torch.from_numpy(np.stack(frames)).float()  # [F, 224, 224, 3]
        windows = stack.unfold(0, LIP_FRAMES, 1)  # [F − 4, 224, 224, 3, 5]
        return self._embed(windows.permute(0, 3, 4, 1, 2), self.model.forward_lip)

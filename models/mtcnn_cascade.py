"""MTCNN's three-stage cascade on facenet-pytorch's P/R/O-nets, for CPU talking-head frames.

:class:`models.face_detector.MtcnnDetector` runs :func:`detect_faces` instead of
facenet-pytorch's ``detect_face``. It is the same algorithm on the same nets: the image
pyramid (``factor``, from ``min_face_px``), P-net windows above ``thresholds[0]``, NMS per
scale (0.5) and over the pyramid (0.7), bounding-box regression and squaring between stages,
R-net and O-net thresholds, O-net landmarks, and a final "Min" NMS (0.7), built from
facenet-pytorch's own helpers. Where the library spent most of its time at talking-head
sizes (one face, frames of 100–500 px, one CPU thread), this differs:

- Pyramid levels and candidate windows are resampled with OpenCV's area resize of the
  uint8 frame (candidate windows by facenet-pytorch's ``pad`` rule: clipped to the frame,
  not padded) instead of torch's ``interpolate(mode="area")`` on a float copy, one call per
  candidate. Area averaging with exact pixel weights instead of torch's whole-pixel bins
  moves boxes by ~2 % of the face side on average (up to ~8 %) against the library.
- ``group_iou``: R-net survivors are suppressed at this IoU before O-net (NMS). The
  library's 0.7 (:data:`LIBRARY_GROUP_IOU`, the default) lets 5–8 overlapping boxes per
  face through to O-net, the largest net, and keeps the best-scored refinement; 0.3 sends
  about one box per face (two faces overlap far less): ~2x faster on one face, but the
  score is that one refinement's, which can be lower (0.85 where the library says 0.99, on
  a hard frame). The faces stage uses it only where a miss is retried at 0.7.

Outputs are the nets' own: O-net score, O-net-regressed box and landmarks.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import (
    batched_nms_numpy,
    bbreg,
    generateBoundingBox,
    rerec,
)
from torch import nn
from torchvision.ops import batched_nms

PYRAMID_FACTOR = 0.709  # MTCNN's scale step between pyramid levels
PNET_SCALE_NMS_IOU = 0.5
PNET_PYRAMID_NMS_IOU = 0.7
LIBRARY_GROUP_IOU = 0.7  # facenet-pytorch's NMS of R-net survivors
FINAL_NMS_MIN = 0.7  # "Min" overlap: intersection over the smaller box


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def _pyramid(h: int, w: int, min_face_px: float, factor: float) -> list[float]:
    """Scales at which P-net's 12 px window sees faces from ``min_face_px`` up to the frame."""
    scale = 12.0 / min_face_px
    side = min(h, w) * scale
    scales = []
    while side >= 12:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def _windows(frames: np.ndarray, boxes: torch.Tensor, inds: torch.Tensor, size: int):
    """Each candidate's pixel window resampled to ``size``² (see module); returns (crops, kept).

    The window is facenet-pytorch's: columns ``max(trunc(x1), 1) - 1`` up to ``min(trunc(x2),
    w)`` (exclusive), rows likewise; empty windows are dropped (``kept`` marks the others).
    """
    h, w = frames.shape[1:3]
    b = boxes[:, :4].trunc().to(torch.int64).cpu().numpy()
    idx = inds.cpu().numpy()
    x0 = np.maximum(b[:, 0], 1) - 1
    y0 = np.maximum(b[:, 1], 1) - 1
    x1 = np.minimum(b[:, 2], w)
    y1 = np.minimum(b[:, 3], h)
    kept = (x1 > x0) & (y1 > y0)
    out = np.empty((int(kept.sum()), size, size, 3), np.uint8)
    for j, k in enumerate(np.flatnonzero(kept)):
        window = frames[idx[k], y0[k] : y1[k], x0[k] : x1[k]]
        shrink = window.shape[0] > size or window.shape[1] > size
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        cv2.resize(window, (size, size), dst=out[j], interpolation=interp)
    return _to_tensor(out, boxes.device), torch.from_numpy(kept).to(boxes.device)


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → normalised ``(N, 3, H, W)`` float on ``device``."""
    return _normalise(torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float())


def _resized(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    interp = cv2.INTER_AREA if h < frames.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def _pnet_candidates(
    frames: np.ndarray,
    pnet: nn.Module,
    min_face_px: float,
    threshold: float,
    factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: squared, regressed P-net windows ``(K, 5)`` (box, score) and their frame."""
    device = next(pnet.parameters()).device
    h, w = frames.shape[1:3]
    boxes = [torch.zeros(0, 9, device=device)]
    inds = [torch.zeros(0, dtype=torch.int64, device=device)]
    for scale in _pyramid(h, w, min_face_px, factor):
        level = _resized(frames, int(h * scale + 1), int(w * scale + 1))
        reg, probs = pnet(_to_tensor(level, device))
        found, found_inds = generateBoundingBox(reg, probs[:, 1], scale, threshold)
        pick = batched_nms(found[:, :4], found[:, 4], found_inds, PNET_SCALE_NMS_IOU)
        boxes.append(found[pick])
        inds.append(found_inds[pick])
    cand, cand_inds = torch.cat(boxes), torch.cat(inds)
    pick = batched_nms(cand[:, :4], cand[:, 4], cand_inds, PNET_PYRAMID_NMS_IOU)
    cand, cand_inds = cand[pick], cand_inds[pick]
    bw = (cand[:, 2] - cand[:, 0]).unsqueeze(1)
    bh = (cand[:, 3] - cand[:, 1]).unsqueeze(1)
    size = torch.cat([bw, bh, bw, bh], dim=1)
    regressed = torch.cat([cand[:, :4] + cand[:, 5:9] * size, cand[:, 4:5]], dim=1)
    return rerec(regressed), cand_inds


def detect_faces(
    frames: np.ndarray,
    nets: tuple[nn.Module, nn.Module, nn.Module],
    min_face_px: float,
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    group_iou: float = LIBRARY_GROUP_IOU,
    factor: float = PYRAMID_FACTOR,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Faces in ``(N, H, W, 3)`` uint8 RGB frames: per frame ``(boxes (k, 5), points (k, 5, 2))``,
    boxes as ``x1, y1, x2, y2, score`` in frame pixels. Call under ``torch.inference_mode``."""
    pnet, rnet, onet = nets
    boxes, inds = _pnet_candidates(frames, pnet, min_face_px, thresholds[0], factor)
    points = torch.zeros(0, 5, 2, device=boxes.device)
    if len(boxes):  # stage 2: R-net scores and regresses; one box per face goes on
        crops, kept = _windows(frames, boxes, inds, 24)
        reg, prob = rnet(crops)
        boxes, inds = boxes[kept], inds[kept]
        ok = prob[:, 1] > thresholds[1]
        boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], dim=1)
        inds, reg = inds[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, group_iou)
        boxes = rerec(bbreg(boxes[pick], reg[pick]))
        inds = inds[pick]
    if len(boxes):  # stage 3: O-net scores, regresses and places the 5 landmarks
        crops, kept = _windows(frames, boxes, inds, 48)
        reg, marks, prob = onet(crops)
        boxes, inds = boxes[kept], inds[kept]
        ok = prob[:, 1] > thresholds[2]
        boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], dim=1)
        inds, reg, marks = inds[ok], reg[ok], marks[ok]
        bw = (boxes[:, 2] - boxes[:, 0] + 1).unsqueeze(1)
        bh = (boxes[:, 3] - boxes[:, 1] + 1).unsqueeze(1)
        xs = bw * marks[:, :5] + boxes[:, 0:1] - 1
        ys = bh * marks[:, 5:] + boxes[:, 1:2] - 1
        points = torch.stack([xs, ys], dim=2)
        boxes = bbreg(boxes, reg)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], inds, FINAL_NMS_MIN, "Min")
        boxes, inds, points = boxes[pick], inds[pick], points[pick]
    b, p, idx = boxes.cpu().numpy(), points.cpu().numpy(), inds.cpu().numpy()
    return [(b[idx == i], p[idx == i]) for i in range(frames.shape[0])]

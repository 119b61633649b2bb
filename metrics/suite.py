"""All metrics of one clip from its decoded frames: each network loaded once, each video
decoded once by the caller and shared by every metric.

:class:`MetricSuite` holds the networks of the enabled metrics (paths resolved by the
caller through the model registry). :meth:`MetricSuite.describe` runs the networks once on
one side of a comparison (generated or ground truth) — identity embeddings, pose, Inception
and I3D features, SyncNet scores against the audio — and :meth:`MetricSuite.compare` turns a
generated side and a ground-truth side into numbers. The ground-truth reference row is
``compare(truth, truth)``: PSNR at its cap, SSIM 1, LPIPS 0, APD 0, CSIM 1, FID/FVD 0 at
set level; its Sync-C/D are the real clip's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metrics.fid import inception_features
from metrics.fvd import CURVE_LENGTHS, i3d_features, protocol_window, windows_upto
from metrics.identity import acd, acd_curve, aligned_faces, csim, embed
from metrics.image import psnr_db, ssim
from metrics.perceptual import lpips_per_frame
from metrics.pose import apd_deg, head_pose_deg
from metrics.registry import METRICS, Setting
from metrics.sync import SyncNetScorer
from models.arcface import load_arcface
from models.i3d import load_i3d
from models.inception_fid import load_fid_inception
from models.liveportrait import load_motion_extractor
from models.lpips_net import load_lpips

# network family → the metrics that need it
NETWORK_METRICS: dict[str, list[str]] = {}
for _m in METRICS.values():
    if _m.network:
        NETWORK_METRICS.setdefault(_m.network, []).append(_m.name)


@dataclass
class Side:
    """What the networks saw of one video (generated or ground truth) of a clip."""

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB face crops
    identity: np.ndarray | None = None  # (N, 512) unit ArcFace embeddings
    pose_deg: np.ndarray | None = None  # (N, 3) pitch, yaw, roll
    sync: dict[str, float] = field(default_factory=dict)
    inception: np.ndarray | None = None  # (N / stride, 2048)
    i3d: dict[str, np.ndarray] = field(default_factory=dict)  # "protocol" / "upto_<n>"


class MetricSuite:
    """The enabled metrics' networks, loaded once; ``paths`` maps family → local weights."""

    def __init__(
        self,
        metrics: list[str],
        paths: dict[str, Path],
        *,
        face_margin: float = 0.5,
        fid_frame_stride: int = 1,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
        self.metrics = list(metrics)
        self.face_margin, self.stride, self.batch = (
            face_margin,
            max(1, fid_frame_stride),
            batch_size,
        )
        need = {METRICS[m].network for m in metrics} - {None}
        missing = sorted(n for n in need if n not in paths)
        if missing:
            raise ValueError(f"no weights path for {missing}")
        self.lpips = {
            net: load_lpips(paths[f"lpips-{net}"], net, device)  # type: ignore[arg-type]
            for net in ("alex", "vgg")
            if f"lpips-{net}" in need
        }
        self.inception = (
            load_fid_inception(paths["inception-fid"], device) if "inception-fid" in need else None
        )
        self.i3d = load_i3d(paths["i3d"], device) if "i3d" in need else None
        self.arcface = load_arcface(paths["arcface"], device) if "arcface" in need else None
        motion = "liveportrait-motion"
        self.motion = load_motion_extractor(paths[motion], device) if motion in need else None
        self.syncnet = (
            SyncNetScorer(paths["syncnet"], device, batch_size) if "syncnet" in need else None
        )

    def describe(
        self,
        frames: np.ndarray,
        samples: np.ndarray | None,
        rate_hz: int,
        fps: float,
        crop_affines: np.ndarray | None,
    ) -> Side:
        side = Side(frames)
        if self.arcface is not None:
            side.identity = embed(self.arcface, aligned_faces(frames, self.face_margin), self.batch)
        if self.motion is not None:
            side.pose_deg = head_pose_deg(self.motion, frames, self.batch)
        if self.inception is not None:
            side.inception = inception_features(self.inception, frames[:: self.stride], self.batch)
        if self.i3d is not None:
            window = protocol_window(frames)
            if window is not None:
                side.i3d["protocol"] = i3d_features(self.i3d, [window])
            for n in CURVE_LENGTHS:
                windows = windows_upto(frames, n)
                if windows:
                    side.i3d[f"upto_{n}"] = i3d_features(self.i3d, windows)
        if self.syncnet is not None and samples is not None and crop_affines is not None:
            est = self.syncnet.measure(iter(frames), crop_affines, samples, rate_hz, fps)
            if not est.unmeasurable:
                side.sync = {
                    "sync_c": est.confidence,
                    "sync_d": est.score,
                    "av_offset_frames": est.offset_frames,
                }
        return side

    def compare(self, gen: Side, truth: Side, setting: Setting) -> dict[str, float]:
        """Clip-level values (means over frames) of the metrics that apply in ``setting``."""
        want = set(self.metrics)
        out: dict[str, float] = {}
        pairs = list(zip(gen.frames, truth.frames, strict=False))
        n = len(pairs)
        if "psnr_db" in want:
            out["psnr_db"] = float(np.mean([psnr_db(g, t) for g, t in pairs]))
        if "ssim" in want:
            out["ssim"] = float(np.mean([ssim(g, t) for g, t in pairs]))
        for net, model in self.lpips.items():
            if f"lpips_{net}" in want:
                d = lpips_per_frame(model, gen.frames[:n], truth.frames[:n], self.batch)
                out[f"lpips_{net}"] = float(d.mean())
        if gen.pose_deg is not None and truth.pose_deg is not None and "apd_deg" in want:
            out["apd_deg"] = apd_deg(gen.pose_deg, truth.pose_deg)
        if gen.identity is not None and truth.identity is not None:
            if "csim" in want:
                out["csim"] = csim(gen.identity, truth.identity)
            if "acd" in want:
                out["acd"] = acd(gen.identity)
                out.update({f"acd_at_{k}": v for k, v in acd_curve(gen.identity).items()})
        out.update({k: v for k, v in gen.sync.items() if k in want})
        return {k: v for k, v in out.items() if setting in METRICS[k.split("_at_")[0]].settings}

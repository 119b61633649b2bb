"""All metrics of one clip from its decoded frames: each network loaded once, each video
decoded once by the caller and shared by every metric.

:class:`MetricSuite` holds the networks of the enabled metrics (paths resolved by the
caller through the model registry). :meth:`MetricSuite.describe` runs the networks once on
one side of a comparison (a generated video or the ground truth) — identity embeddings,
pose, Inception and I3D features, SyncNet scores against the driving audio — and
:meth:`MetricSuite.compare` turns a generated side and the ground-truth side into numbers
(:func:`metrics.registry.for_setting` keeps those that mean something in a setting). The
ground-truth row is ``compare(truth, truth)``: PSNR at its cap, SSIM 1, LPIPS 0, APD 0, CSIM 1
(FID/FVD 0 at set level); its Sync-C/D are the real clip's with its own audio.

``timings`` accumulates, per metric family (``pixel`` for PSNR/SSIM, else the network
family), the seconds spent and frames seen: what ``benchmarks/bench_evaluate.py`` reports.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metrics.fid import inception_features
from metrics.fvd import CURVE_LENGTHS, i3d_features, protocol_window, windows_upto
from metrics.identity import acd, acd_curve, aligned_faces, centre_squares, csim, embed
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

ALL_SETTINGS = frozenset(Setting)


@dataclass(frozen=True)
class Geometry:
    """Per-frame maps from crop pixels to the networks' inputs.

    ``syncnet``: crop → SyncNet's 224 px square (``metrics.sync.syncnet_crop_affines``);
    ``arcface``: crop → the 112 px ArcFace template (None: centre squares at ``face_margin``).
    """

    syncnet: np.ndarray | None = None
    arcface: np.ndarray | None = None

    def head(self, n: int) -> Geometry:
        return Geometry(
            None if self.syncnet is None else self.syncnet[:n],
            None if self.arcface is None else self.arcface[:n],
        )


@dataclass
class Side:
    """What the networks saw of one video (generated or ground truth) of a clip."""

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB face crops
    identity: np.ndarray | None = None  # (N, 512) unit ArcFace embeddings
    pose_deg: np.ndarray | None = None  # (N, 3) pitch, yaw, roll
    sync: dict[str, float] = field(default_factory=dict)
    inception: np.ndarray | None = None  # (N / stride, 2048)
    i3d: dict[str, np.ndarray] = field(default_factory=dict)  # "protocol" / "upto_<n>"

    def set_features(self) -> dict[str, np.ndarray]:
        """The features set-level metrics need, keyed as ``evaluate_set`` reads them."""
        out = {f"i3d_{k}": v for k, v in self.i3d.items()}
        if self.inception is not None:
            out["inception"] = self.inception
        return out


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
        self.face_margin = face_margin
        self.stride, self.batch = max(1, fid_frame_stride), batch_size
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
        self.timings: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    @contextmanager
    def _timed(self, family: str, frames: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[family][0] += time.perf_counter() - start
        self.timings[family][1] += frames

    def describe(
        self,
        frames: np.ndarray,
        samples: np.ndarray | None,
        rate_hz: int,
        fps: float,
        geometry: Geometry,
        settings: frozenset[Setting] = ALL_SETTINGS,
    ) -> Side:
        """Run every network once on ``frames`` (``samples``: the audio that drove them),
        skipping those whose metrics mean nothing in any of ``settings`` (e.g. I3D for a
        cross-audio video: FVD is a self-reconstruction metric)."""
        side = Side(frames)
        n = len(frames)
        want = self._wanted(settings)
        if self.arcface is not None and want & {"csim", "acd"}:
            with self._timed("arcface", n):
                faces = (
                    centre_squares(frames, self.face_margin)
                    if geometry.arcface is None
                    else aligned_faces(frames, geometry.arcface)
                )
                side.identity = embed(self.arcface, faces, self.batch)
        if self.motion is not None and "apd_deg" in want:
            with self._timed("liveportrait-motion", n):
                side.pose_deg = head_pose_deg(self.motion, frames, self.batch)
        if self.inception is not None and "fid" in want:
            picked = frames[:: self.stride]
            with self._timed("inception-fid", len(picked)):
                side.inception = inception_features(self.inception, picked, self.batch)
        if self.i3d is not None and "fvd" in want:
            with self._timed("i3d", n):
                self._i3d(side)
        sync = self.syncnet is not None and want & {"sync_c", "sync_d", "av_offset_frames"}
        if sync and samples is not None and geometry.syncnet is not None:
            assert self.syncnet is not None
            with self._timed("syncnet", n):
                est = self.syncnet.measure(iter(frames), geometry.syncnet, samples, rate_hz, fps)
            if not est.unmeasurable:
                side.sync = {
                    "sync_c": est.confidence,
                    "sync_d": est.score,
                    "av_offset_frames": est.offset_frames,
                }
        return side

    def _i3d(self, side: Side) -> None:
        assert self.i3d is not None
        window = protocol_window(side.frames)
        if window is not None:
            side.i3d["protocol"] = i3d_features(self.i3d, [window])
        for n in CURVE_LENGTHS:
            windows = windows_upto(side.frames, n)
            if windows:
                side.i3d[f"upto_{n}"] = i3d_features(self.i3d, windows)

    def _wanted(self, settings: frozenset[Setting]) -> set[str]:
        return {m for m in self.metrics if METRICS[m].settings & settings}

    def compare(
        self, gen: Side, truth: Side, settings: frozenset[Setting] = ALL_SETTINGS
    ) -> dict[str, float]:
        """Clip-level values (means over frames) of the enabled metrics that apply in any of
        ``settings``, ``gen`` against the first ``len(gen.frames)`` frames of ``truth``
        (filter per setting with :func:`metrics.registry.for_setting`). ``compare(truth,
        truth)`` is the ground-truth row (PSNR cap, SSIM 1, CSIM 1, APD 0); its LPIPS is 0
        without running the network on a frame against itself."""
        want = self._wanted(settings)
        out: dict[str, float] = {}
        n = min(len(gen.frames), len(truth.frames))
        g, t = gen.frames[:n], truth.frames[:n]
        with self._timed("pixel", n):
            if "psnr_db" in want:
                out["psnr_db"] = float(np.mean([psnr_db(a, b) for a, b in zip(g, t, strict=True)]))
            if "ssim" in want:
                out["ssim"] = float(np.mean([ssim(a, b) for a, b in zip(g, t, strict=True)]))
        for net, model in self.lpips.items():
            if f"lpips_{net}" in want:
                if gen is truth:  # identical unit-normalised features: exactly 0
                    out[f"lpips_{net}"] = 0.0
                    continue
                with self._timed(f"lpips-{net}", n):
                    out[f"lpips_{net}"] = float(lpips_per_frame(model, g, t, self.batch).mean())
        if gen.pose_deg is not None and truth.pose_deg is not None and "apd_deg" in want:
            out["apd_deg"] = apd_deg(gen.pose_deg[:n], truth.pose_deg[:n])
        if gen.identity is not None and truth.identity is not None:
            if "csim" in want:
                out["csim"] = csim(gen.identity[:n], truth.identity[:n])
            if "acd" in want:
                out["acd"] = acd(gen.identity)
                out.update({f"acd_at_{k}": v for k, v in acd_curve(gen.identity).items()})
        out.update({k: v for k, v in gen.sync.items() if k in want})
        return {k: float(v) for k, v in out.items() if np.isfinite(v)}

"""Evaluation throughput: frames/s per metric family, and the decode-once saving.

On a synthetic face clip (``--frames`` frames at ``--size`` px, written as h264), with the
random-init stand-ins of every metric network (same architectures and cost as the official
weights, except ArcFace's small stand-in), this measures:

- frames/s of each metric family alone (pixel: PSNR+SSIM; lpips-alex; lpips-vgg; Inception
  features; I3D windows; ArcFace; LivePortrait pose; SyncNet), both videos of the pair;
- the decode of one video, against which "decode once for all metrics" is judged: the
  ratio (families × decode) / (1 decode + 1 decode) is what per-metric decoding would cost.

Run: ``.venv/bin/python benchmarks/bench_evaluate.py [--frames 50] [--size 256]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics.registry import METRICS, Setting
from metrics.suite import MetricSuite
from models.registry import ModelSpec, ensure_model
from tasks.media import VideoWriter, iter_frames
from tests.train_helpers import face_frames

FAMILIES = {
    "pixel": ["psnr_db", "ssim"],
    "lpips-alex": ["lpips_alex"],
    "lpips-vgg": ["lpips_vgg"],
    "inception-fid": ["fid"],
    "i3d": ["fvd"],
    "arcface": ["csim", "acd"],
    "liveportrait-motion": ["apd_deg"],
    "syncnet": ["sync_c", "sync_d", "av_offset_frames"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    frames = face_frames(args.frames, args.size, seed=0)
    video = work / "clip.mp4"
    with VideoWriter(video, args.size, args.size, 25.0, crf=17) as vw:
        vw.write(frames)
    t0 = time.perf_counter()
    decoded = np.concatenate(list(iter_frames(video, args.size, args.size)))
    decode_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    gen = np.clip(decoded + rng.normal(0, 8, decoded.shape), 0, 255).astype(np.uint8)
    samples = (0.2 * np.sin(np.arange(args.frames * 640) / 9.0)).astype(np.float64)
    affines = np.tile(
        np.array([[224 / args.size, 0, 0], [0, 224 / args.size, 0]]), (args.frames, 1, 1)
    )
    paths = {}
    for family in {m.network for m in METRICS.values() if m.network}:
        spec = ModelSpec(family=family, source=f"models/{family}", tiny_random=True)
        paths[family] = ensure_model(spec, work)
    print(f"clip: {args.frames} frames at {args.size} px; decode {args.frames / decode_s:.0f} fps")
    total = 0.0
    for family, names in FAMILIES.items():
        suite = MetricSuite(names, paths, device="cpu")
        t0 = time.perf_counter()
        truth = suite.describe(decoded, samples, 16000, 25.0, affines)
        side = suite.describe(gen, samples, 16000, 25.0, affines)
        suite.compare(side, truth, Setting.SELF)
        dt = time.perf_counter() - t0
        total += dt
        print(f"{family:22s} {2 * args.frames / dt:8.1f} frames/s  ({dt:.2f} s for both videos)")
    n = len(FAMILIES)
    print(f"all metrics: {2 * args.frames / total:.1f} frames/s; decode share once: "
          f"{2 * decode_s / (total + 2 * decode_s):.1%}; decoding per family would cost "
          f"{n}x the decode time ({2 * n * decode_s:.2f} s vs {2 * decode_s:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()

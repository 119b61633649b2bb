"""Shared helpers for the faces / quality tests: stores, NormalizedClip inputs, face videos.

Real clips come from ``../shared/fixtures/clips`` (tests skip when absent). Synthetic clips
paste a face cut from scikit-image's astronaut photo (a real face, found by MTCNN) onto a
plain canvas, one frame at a time, so each quality rule can be triggered on purpose.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage.store import ArtifactStore
from tasks.base import ItemContext, ItemInputs, StageEnv
from tasks.media import VideoWriter, count_frames, probe, read_wav, run_ffmpeg, write_wav
from tasks.records import NormalizedClip

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLIPS = SHARED / "fixtures" / "clips"
CANVAS_HW = (240, 320)
BACKGROUND = 110


def real_clips() -> list[Path]:
    return sorted(CLIPS.glob("face_*.mp4")) if CLIPS.is_dir() else []


def make_env(tmp_path: Path) -> StageEnv:
    return StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t")


def make_ctx(tmp_path: Path, stage: str, item_id: str) -> ItemContext:
    return ItemContext(ArtifactStore(str(tmp_path / "store")), stage, item_id, "k" * 40)


def commit_normalized_clip(
    tmp_path: Path, clip_id: str, video: Path, wav: Path, fps: float
) -> NormalizedClip:
    """Commit a video + wav as the download stage would and describe them."""
    info = probe(video)
    ctx = make_ctx(tmp_path, "download", clip_id)
    num_frames = count_frames(video)
    return NormalizedClip(
        clip_id=clip_id,
        dataset="sample",
        source_id=clip_id,
        start_s=0.0,
        end_s=num_frames / fps,
        duration_s=num_frames / fps,
        fps=fps,
        num_frames=num_frames,
        width=info.width,
        height=info.height,
        audio_sample_rate_hz=16000,
        audio_channels=1,
        video=ctx.commit(video, "clip.mp4", "video"),
        audio=ctx.commit(wav, "audio.wav", "audio"),
    )


def normalized_from_file(
    tmp_path: Path, src: Path, clip_id: str, fps: int = 25, max_duration_s: float | None = None
) -> NormalizedClip:
    """Normalize a real clip to constant ``fps`` (h264 + aac, 16 kHz mono wav) and commit it."""
    work = tmp_path / f"norm-{clip_id}"
    work.mkdir(parents=True)
    limit = ["-t", str(max_duration_s)] if max_duration_s else []
    video, wav = work / "clip.mp4", work / "audio.wav"
    run_ffmpeg(
        ["-i", str(src), *limit, "-vf", f"fps={fps}", "-c:v", "libx264", "-crf", "18",
         "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "16000", "-ac", "1", str(video)],
        "normalize test clip",
    )  # fmt: skip
    run_ffmpeg(
        ["-i", str(video), "-vn", "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(wav)],
        "extract test audio",
    )
    return commit_normalized_clip(tmp_path, clip_id, video, wav, float(fps))


def normalized_from_frames(
    tmp_path: Path,
    clip_id: str,
    frames: Iterable[np.ndarray],
    fps: float = 25.0,
    speech: bool = False,
) -> NormalizedClip:
    """Encode frames (an iterable of HxWx3 uint8 RGB) and commit them with 16 kHz audio:
    silence, or with ``speech`` espeak-ng speech (skips the test without espeak-ng)."""
    work = tmp_path / f"synth-{clip_id}"
    work.mkdir(parents=True)
    frames = list(frames)
    h, w = frames[0].shape[:2]
    video, wav = work / "clip.mp4", work / "audio.wav"
    with VideoWriter(video, w, h, fps) as writer:
        writer.write(np.stack(frames))
    num_samples = int(16000 * len(frames) / fps)
    samples = espeak_speech(work, num_samples) if speech else np.zeros(num_samples, np.float32)
    write_wav(wav, samples, 16000)
    return commit_normalized_clip(tmp_path, clip_id, video, wav, fps)


SENTENCE = "Speech for the test clip, one two three four five, and it goes on talking. "


def espeak_speech(work: Path, num_samples: int) -> np.ndarray:
    """Synthesised speech (espeak-ng, real phonemes) at 16 kHz mono, cut to ``num_samples``."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    raw, wav = work / "espeak.wav", work / "speech16k.wav"
    text = SENTENCE * (1 + num_samples // (16000 * 4))
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    run_ffmpeg(["-i", str(raw), "-ar", "16000", "-ac", "1", str(wav)], "resample speech")
    samples, _ = read_wav(wav)
    out = np.zeros(num_samples, np.float32)
    out[: min(num_samples, len(samples))] = samples[:num_samples]
    return out


def inputs_for(clip_id: str, **records: object) -> ItemInputs:
    return ItemInputs(item_id=clip_id, records=records)


def astronaut_face(size_px: int, mouth_open: float = 0.0) -> np.ndarray:
    """A square patch around the astronaut's face (face ≈ 0.6 of the side), resized.

    ``mouth_open`` in [0, 1] paints an open mouth (a dark ellipse between the lip corners)
    so clips can "talk"; 0 leaves the photo's closed mouth.
    """
    from skimage import data

    img = data.astronaut()
    cx, cy, side = 224, 117, 170  # face box ≈ (181, 62)-(268, 172) in the 512 px photo
    patch = img[cy - side // 2 : cy + side // 2, cx - side // 2 : cx + side // 2].copy()
    if mouth_open > 0:  # mouth corners ≈ (202, 139) and (245, 142) in the photo
        centre = (224 - cx + side // 2, 143 - cy + side // 2)
        axes = (14, max(1, round(10 * mouth_open)))
        cv2.ellipse(patch, centre, axes, 0, 0, 360, (45, 20, 25), thickness=-1)
    interp = cv2.INTER_AREA if size_px < side else cv2.INTER_LINEAR
    return cv2.resize(patch, (size_px, size_px), interpolation=interp)


def canvas(hw: tuple[int, int] = CANVAS_HW) -> np.ndarray:
    return np.full((*hw, 3), BACKGROUND, np.uint8)


def paste(frame: np.ndarray, patch: np.ndarray, x: int, y: int) -> np.ndarray:
    """Paste ``patch`` with its top-left at (x, y), clipped to the frame."""
    h, w = frame.shape[:2]
    ph, pw = patch.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
    if x0 < x1 and y0 < y1:
        frame[y0:y1, x0:x1] = patch[y0 - y : y1 - y, x0 - x : x1 - x]
    return frame


def moving_face_frames(
    num_frames: int,
    face_px: int = 150,
    path: Callable[[int], tuple[int, int]] | None = None,
    extra_faces: list[tuple[int, int]] | None = None,
    blur_sigma: float = 0.0,
    talking: bool = True,
) -> list[np.ndarray]:
    """Frames of one astronaut face moving along ``path(i) -> (x, y)`` (default: a slow
    sway of a few pixels), plus static ``extra_faces`` top-left positions of equal size.
    ``talking`` opens and closes the mouth about three times a second."""
    still = astronaut_face(face_px)
    faces = [astronaut_face(face_px, abs(np.sin(np.pi * k / 8))) for k in range(8)]
    h, w = CANVAS_HW
    x0, y0 = (w - face_px) // 2, (h - face_px) // 2
    path = path or (lambda i: (x0 + round(6 * np.sin(i / 6)), y0 + round(3 * np.cos(i / 9))))
    frames = []
    for i in range(num_frames):
        f = canvas()
        for ex, ey in extra_faces or []:
            paste(f, still, ex, ey)
        paste(f, faces[i % 8] if talking else still, *path(i))
        if blur_sigma > 0:
            f = cv2.GaussianBlur(f, (0, 0), blur_sigma)
        frames.append(f)
    return frames

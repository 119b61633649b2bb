"""A small offline dataset in the real HDTF metadata format, for tests and demo runs.

Three source videos of a real face photo (``skimage.data.astronaut()``, a NASA portrait in
the public domain) with smooth head motion and a mouth that opens with the loudness of real
synthetic speech (``espeak-ng``). Two sources are 30 fps and one 25 fps; audio is 44.1 or
48 kHz stereo AAC, so normalising to 25 fps / 16 kHz mono is real work downstream.

Layout under ``out_dir``::

    metadata/RD_video_url.txt  RD_resolution.txt  RD_annotion_time.txt
             RD_crop_wh.txt    RD_crop_ratio.txt
    videos/<youtube_id>.mp4
    SAMPLE_COMPLETE.json       (written last: the dataset is complete)

The metadata files reproduce HDTF's published traps on purpose: the URL file starts with
a UTF-8 BOM and has no final newline, one URL carries ``&t=3s``, one annotation line ends
with a space and lists unsorted, overlapping ranges, one source declares a non-standard
height (480) so its crop boxes are in native pixels while the others are measured at the
declared 720p, and one clip has no crop box.

The build is deterministic for a seed (motion comes from ``numpy`` seeded per source;
texts and voices are fixed), and atomic: everything is written into a temporary sibling
folder that is renamed onto ``out_dir`` only when complete, under an ``fcntl`` lock so two
processes never build the same dataset at once.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.media import VideoWriter, read_wav, run_ffmpeg, write_wav

SAMPLE_VERSION = 1
SAMPLE_SUBSET = "RD"
COMPLETE_MARKER = "SAMPLE_COMPLETE.json"
FRAME_SIZE_PX = 480  # square frames keep encoding cheap
FACE_SCALE = 1.4  # photo pixels -> frame pixels
FACE_CENTER_OUT = (240.0, 160.0)  # where the face centre sits in the frame (x, y)
SAMPLE_LICENCE = (
    "public domain (NASA portrait, skimage.data.astronaut); speech synthesised by espeak-ng"
)


@dataclass(frozen=True)
class SampleSource:
    """One synthetic source video and its HDTF metadata rows."""

    name: str  # HDTF video name (key of the url file)
    youtube_id: str  # 11 safe characters, like a YouTube id
    fps: float
    duration_s: float
    audio_rate_hz: int
    voice: str  # espeak-ng voice+variant
    text: str
    segments: str  # the annotation line's ranges, exactly as written
    declared_height: int  # RD_resolution.txt value
    crops: tuple[tuple[int, int, int, int] | None, ...]  # per clip: (x, w, y, h) or None
    url_suffix: str = ""


SOURCES: tuple[SampleSource, ...] = (
    SampleSource(
        name="TfSample1",
        youtube_id="tfSmpl0001a",
        fps=30.0,
        duration_s=12.0,
        audio_rate_hz=48000,
        voice="en-us+m3",
        text=(
            "Good morning and welcome to the talk forge sample broadcast. Today we look at "
            "how a face moves while a person speaks, and why every frame of a training clip "
            "must line up with its sound. Thank you for listening, and see you next week."
        ),
        segments="00:01-00:06 00:06-00:11",
        declared_height=720,  # boxes measured on a 720p frame: scaled by 480/720 on use
        crops=((168, 384, 48, 384), (180, 372, 54, 372)),
    ),
    SampleSource(
        name="TfSample2",
        youtube_id="tfSmpl0002b",
        fps=30.0,
        duration_s=11.0,
        audio_rate_hz=44100,
        voice="en-gb+f3",
        text=(
            "Here is the evening news in brief. The river rose after three days of rain, the "
            "library opened a new reading room, and the city orchestra will play in the park "
            "on Sunday afternoon if the weather stays kind to us."
        ),
        segments="00:05-00:10 00:00-00:06 ",  # unsorted, overlapping, trailing space
        declared_height=720,
        crops=((162, 396, 42, 396), None),  # clip 1 has no crop box (like MittRomney_1)
        url_suffix="&t=3s",
    ),
    SampleSource(
        name="TfSample3",
        youtube_id="tfSmpl0003c",
        fps=25.0,
        duration_s=13.0,
        audio_rate_hz=48000,
        voice="en-gb-scotland+m1",
        text=(
            "Let me tell you a short story about a lighthouse keeper who counted the ships "
            "every night. He wrote their names in a blue notebook, and when the notebook was "
            "full he started another one, because the sea never runs out of ships."
        ),
        segments="00:02-00:08 00:08-00:12",
        declared_height=480,  # not a standard height: reader reports it as unknown
        crops=((112, 256, 32, 256), (120, 248, 36, 248)),
    ),
)


def sample_metadata_dir(root: Path) -> Path:
    return root / "metadata"


def sample_videos_dir(root: Path) -> Path:
    return root / "videos"


def is_complete(root: Path, seed: int) -> bool:
    """True when ``root`` holds a finished sample built by this version for ``seed``."""
    marker = root / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("version") == SAMPLE_VERSION and meta.get("seed") == seed


def build_sample_dataset(out_dir: Path, seed: int = 0) -> Path:
    """Build the sample dataset at ``out_dir`` (or return it if already complete).

    Returns ``out_dir``. Safe against crashes (a half-built dataset only ever exists under
    a temporary name) and against concurrent callers (an ``fcntl`` lock beside it).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if is_complete(out_dir, seed):
        return out_dir
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        if is_complete(out_dir, seed):
            return out_dir
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed build
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
        try:
            _build_into(tmp, seed)
            if out_dir.exists():  # incomplete or built for another seed: replace it
                old = out_dir.parent / f".{out_dir.name}.tmp-old-{uuid.uuid4().hex}"
                out_dir.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_into(root: Path, seed: int) -> None:
    videos = sample_videos_dir(root)
    videos.mkdir(parents=True)
    work = root / ".work"
    work.mkdir()
    mouth_l, mouth_r = _mouth_corners(_base_image())
    for index, src in enumerate(SOURCES):
        speech = _synthesise_speech(src, work)
        _render_source(
            src, speech, videos / f"{src.youtube_id}.mp4", work, seed, index, mouth_l, mouth_r
        )
    shutil.rmtree(work)
    write_sample_metadata(sample_metadata_dir(root))
    marker = {"version": SAMPLE_VERSION, "seed": seed, "sources": [s.youtube_id for s in SOURCES]}
    (root / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def write_sample_metadata(meta_dir: Path) -> None:
    """Write the five RD_* files in the exact published HDTF format (traps included)."""
    meta_dir.mkdir(parents=True, exist_ok=True)
    p = SAMPLE_SUBSET
    url_lines = [
        f"{s.name} https://www.youtube.com/watch?v={s.youtube_id}{s.url_suffix}" for s in SOURCES
    ]
    # Like WDA_video_url.txt: a UTF-8 BOM before the first name and no final newline.
    (meta_dir / f"{p}_video_url.txt").write_bytes(
        b"\xef\xbb\xbf" + "\n".join(url_lines).encode("utf-8")
    )
    _write_lines(
        meta_dir / f"{p}_resolution.txt", [f"{s.name}.mp4 {s.declared_height}" for s in SOURCES]
    )
    _write_lines(
        meta_dir / f"{p}_annotion_time.txt", [f"{s.name}.mp4 {s.segments}" for s in SOURCES]
    )
    crop_wh, crop_ratio = [], []
    for s in SOURCES:
        for idx, box in enumerate(s.crops):
            if box is not None:
                x, w, y, h = box
                crop_wh.append(f"{s.name}_{idx}.mp4 {x} {w} {y} {h}")
                crop_ratio.append(f"{s.name}_{idx}.mp4 1.2")
    _write_lines(meta_dir / f"{p}_crop_wh.txt", crop_wh)
    _write_lines(meta_dir / f"{p}_crop_ratio.txt", crop_ratio)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _base_image() -> np.ndarray:
    from skimage.data import astronaut

    return np.ascontiguousarray(astronaut()[..., :3])


def _mouth_corners(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mouth corners of the photo's face, from MTCNN's five landmarks (run once)."""
    import torch
    from facenet_pytorch import MTCNN

    torch.manual_seed(0)
    detector = MTCNN(keep_all=False, device="cpu")
    boxes, _, landmarks = detector.detect(image, landmarks=True)
    if boxes is None or landmarks is None:
        raise RuntimeError("MTCNN found no face in the sample photo")
    points = np.asarray(landmarks[0], dtype=np.float64)
    return points[3], points[4]


def _synthesise_speech(src: SampleSource, work: Path) -> np.ndarray:
    """espeak-ng speech for ``src`` as float32 mono at 22.05 kHz, fitted to the duration."""
    wav = work / f"{src.youtube_id}-speech.wav"
    subprocess.run(
        ["espeak-ng", "-v", src.voice, "-s", "150", "-w", str(wav), src.text],
        check=True,
        capture_output=True,
    )
    samples, rate = read_wav(wav)
    if rate != 22050:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected 22050")
    total = round(src.duration_s * rate)
    lead = np.zeros(round(0.3 * rate), np.float32)
    track = np.concatenate([lead, samples])[:total]
    return np.pad(track, (0, total - track.size))


def _mouth_openness(speech: np.ndarray, rate_hz: int, fps: float, num_frames: int) -> np.ndarray:
    """Per-frame loudness in [0, 1]: RMS over each frame's audio window, lightly smoothed."""
    edges = np.round(np.arange(num_frames + 1) * rate_hz / fps).astype(int)
    rms = np.array(
        [
            math.sqrt(float(np.mean(speech[a:b] ** 2))) if b > a else 0.0
            for a, b in itertools.pairwise(edges)
        ]
    )
    ref = float(np.percentile(rms, 95)) or 1.0
    level = np.clip(rms / ref, 0.0, 1.0) ** 0.7
    return np.convolve(level, np.array([0.25, 0.5, 0.25]), mode="same")


def _motion(seed: int, index: int, num_frames: int, fps: float) -> np.ndarray:
    """Smooth head motion per frame: columns dx_px, dy_px, angle_deg, scale."""
    rng = np.random.default_rng([seed, index])
    t = np.arange(num_frames) / fps
    amplitude = np.array([10.0, 6.0, 3.0, 0.03])
    out = np.zeros((num_frames, 4))
    for k in range(4):
        freqs = rng.uniform(0.08, 0.45, size=2)
        phases = rng.uniform(0, 2 * np.pi, size=2)
        weights = rng.uniform(0.3, 1.0, size=2)
        wave = sum(
            w * np.sin(2 * np.pi * f * t + p)
            for w, f, p in zip(weights, freqs, phases, strict=True)
        )
        out[:, k] = amplitude[k] * wave / weights.sum()
    out[:, 3] += 1.0
    return out


def _frame_transform(face_center: np.ndarray, move: np.ndarray) -> np.ndarray:
    """2x3 affine from photo pixels to frame pixels for one frame's motion."""
    import cv2  # here, not at module level: the download stage's config loads this module

    dx, dy, angle_deg, scale = move
    rot = cv2.getRotationMatrix2D(
        (float(face_center[0]), float(face_center[1])), angle_deg, FACE_SCALE * scale
    )
    rot[0, 2] += FACE_CENTER_OUT[0] + dx - face_center[0]
    rot[1, 2] += FACE_CENTER_OUT[1] + dy - face_center[1]
    return rot


def _draw_mouth(image: np.ndarray, left: np.ndarray, right: np.ndarray, openness: float) -> None:
    """Paint an open mouth between the corners, its height proportional to ``openness``."""
    import cv2

    width = float(np.linalg.norm(right - left))
    if openness < 0.05 or width <= 0:
        return
    center = (left + right) / 2 + np.array([0.0, 0.12 * width * openness])
    angle = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
    axes = (max(1, round(0.42 * width)), max(1, round(0.3 * width * openness)))
    c = (round(center[0] * 4), round(center[1] * 4))
    cv2.ellipse(
        image, c, (axes[0] * 4, axes[1] * 4), angle, 0, 360, (120, 40, 45), -1, cv2.LINE_AA, 2
    )
    inner = (max(1, axes[0] * 4 - 8), max(1, axes[1] * 4 - 8))
    cv2.ellipse(image, c, inner, angle, 0, 360, (35, 8, 12), -1, cv2.LINE_AA, 2)
    if openness > 0.35:  # upper teeth show when the mouth is wide open
        teeth_c = (c[0], c[1] - round(axes[1] * 4 * 0.55))
        teeth_axes = (round(axes[0] * 4 * 0.7), max(1, round(axes[1] * 4 * 0.25)))
        cv2.ellipse(image, teeth_c, teeth_axes, angle, 0, 360, (225, 220, 210), -1, cv2.LINE_AA, 2)


def _render_source(
    src: SampleSource,
    speech: np.ndarray,
    out_path: Path,
    work: Path,
    seed: int,
    index: int,
    mouth_l: np.ndarray,
    mouth_r: np.ndarray,
) -> None:
    import cv2

    num_frames = round(src.duration_s * src.fps)
    openness = _mouth_openness(speech, 22050, src.fps, num_frames)
    motion = _motion(seed, index, num_frames, src.fps)
    base = _base_image()
    face_center = (mouth_l + mouth_r) / 2 - np.array([0.0, 24.0])  # between eyes and mouth

    mono = work / f"{src.youtube_id}-mono.wav"
    write_wav(mono, speech, 22050)
    stereo = work / f"{src.youtube_id}-stereo.wav"
    run_ffmpeg(
        ["-i", str(mono), "-ar", str(src.audio_rate_hz), "-ac", "2", str(stereo)],
        "resample sample audio",
    )

    size = FRAME_SIZE_PX
    with VideoWriter(out_path, size, size, src.fps, audio=stereo, crf=20) as writer:
        for i in range(num_frames):
            image = base.copy()
            _draw_mouth(image, mouth_l, mouth_r, float(openness[i]))
            matrix = _frame_transform(face_center, motion[i])
            frame = cv2.warpAffine(
                image,
                matrix,
                (size, size),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT101,
            )
            writer.write(frame)

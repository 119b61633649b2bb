"""Cut one clip out of a raw download and normalise it: constant fps video, 16 kHz mono audio.

One ffmpeg call decodes the source once and writes two outputs: ``clip.mp4`` (H.264 at the
configured constant frame rate, with 16 kHz mono AAC) and ``audio.wav`` (16 kHz mono
pcm_s16le, what audio feature extractors read).

Seeking: ``-ss`` is given *before* ``-i`` (input seeking). Because both streams are
re-encoded, ffmpeg seeks to the keyframe before ``start_s`` and then decodes and discards
up to exactly ``start_s`` (``-accurate_seek`` is the default), so the cut is frame-accurate
and output timestamps start at 0 — the same result as output seeking (``-ss`` after
``-i``) without decoding everything before the clip, which matters for a clip at 08:10 of
a 1080p source. Stream copies would cut on keyframes instead, which is why this module
never copies.

The result is verified, not trusted: the mp4 must hold ``round(duration × fps)`` frames
(±1) and the wav ``duration × rate`` samples (within two video frames). A truncated or
corrupt source decodes to fewer frames and becomes ``ItemFailure(FORMAT)``; a source
without audio, a zero-byte or unreadable file are ``FORMAT`` too; a clip outside the
source's duration is ``BAD_METADATA``.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

from tasks.base import FailureKind, ItemFailure
from tasks.download.celebvhq import celebv_crop_box
from tasks.download.hdtf import scale_crop
from tasks.media import count_frames, probe, run_ffmpeg
from tasks.records import CropBox, SourceClip

END_TOLERANCE_S = 1.0  # annotations are whole seconds; a source may end slightly early


@dataclass(frozen=True)
class NormalizeSettings:
    fps: float = 25.0
    audio_sample_rate_hz: int = 16000
    crf: int = 17
    apply_crop: bool = False
    audio_bitrate: str = "128k"


@dataclass(frozen=True)
class NormalizedFiles:
    """The two output files and what was verified about them."""

    video: Path
    audio: Path
    start_s: float
    end_s: float
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    audio_sample_rate_hz: int
    audio_channels: int
    crop: CropBox | None  # the crop applied, in source pixels


def _video_filter(crop: CropBox | None, fps: float) -> str:
    parts = ["yadif=deint=interlaced"]  # only frames flagged interlaced are touched
    if crop is not None:
        parts.append(f"crop={crop.w}:{crop.h}:{crop.x}:{crop.y}")
    # square pixels (anamorphic sources are widened) and even sides for yuv420p
    parts += ["scale=w=trunc(iw*sar/2)*2:h=trunc(ih/2)*2", "setsar=1", f"fps={fps:g}"]
    return ",".join(parts)


def normalize_clip(
    raw: Path, clip: SourceClip, settings: NormalizeSettings, out_dir: Path
) -> NormalizedFiles:
    """Cut ``[clip.start_s, clip.end_s)`` from ``raw`` into ``out_dir``; verify the outputs."""
    info = probe(raw)  # empty / unreadable -> ItemFailure(FORMAT)
    if not info.has_audio:
        raise ItemFailure(FailureKind.FORMAT, f"{raw.name}: source has no audio stream")
    if info.width <= 0 or info.height <= 0:
        raise ItemFailure(FailureKind.FORMAT, f"{raw.name}: no decodable picture size")
    start_s, end_s = float(clip.start_s), float(clip.end_s)
    if start_s < 0 or end_s <= start_s:
        raise ItemFailure(FailureKind.BAD_METADATA, f"bad clip range {start_s}-{end_s}s")
    if info.duration_s > 0:
        if end_s > info.duration_s + END_TOLERANCE_S:
            raise ItemFailure(
                FailureKind.BAD_METADATA,
                f"clip ends at {end_s:.2f}s but the source lasts {info.duration_s:.2f}s",
            )
        end_s = min(end_s, info.duration_s)
    duration_s = end_s - start_s
    expected_frames = round(duration_s * settings.fps)
    if expected_frames < 1:
        raise ItemFailure(FailureKind.BAD_METADATA, f"clip of {duration_s:.3f}s has no frame")

    crop = None
    if settings.apply_crop and clip.crop is not None:  # HDTF: pixels at the declared height
        crop = scale_crop(clip.crop, info.width, info.height)
    elif settings.apply_crop and clip.bbox is not None:  # CelebV-HQ: expand and square
        crop = celebv_crop_box(clip.bbox, info.width, info.height)

    video = out_dir / "clip.mp4"
    audio = out_dir / "audio.wav"
    rate = str(settings.audio_sample_rate_hz)
    t = f"{duration_s:.6f}"
    run_ffmpeg(
        [
            "-ss", f"{start_s:.6f}", "-i", str(raw),
            # output 1: the clip
            "-t", t, "-map", "0:v:0", "-map", "0:a:0", "-sn", "-dn",
            "-map_metadata", "-1", "-map_chapters", "-1",
            "-vf", _video_filter(crop, settings.fps),
            "-c:v", "libx264", "-preset", "veryfast", "-crf", str(settings.crf),
            "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", settings.audio_bitrate, "-ar", rate, "-ac", "1",
            "-movflags", "+faststart", str(video),
            # output 2: the audio track for feature extraction
            "-t", t, "-map", "0:a:0", "-map_metadata", "-1",
            "-c:a", "pcm_s16le", "-ar", rate, "-ac", "1", str(audio),
        ],
        f"cut {clip.clip_id}",
    )  # fmt: skip
    return _verify(video, audio, clip, settings, start_s, end_s, crop)


def _verify(
    video: Path,
    audio: Path,
    clip: SourceClip,
    settings: NormalizeSettings,
    start_s: float,
    end_s: float,
    crop: CropBox | None,
) -> NormalizedFiles:
    duration_s = end_s - start_s
    expected = round(duration_s * settings.fps)
    out = probe(video)
    frames = out.num_frames if out.num_frames is not None else count_frames(video)
    if abs(frames - expected) > 1:
        raise ItemFailure(
            FailureKind.FORMAT,
            f"{clip.clip_id}: decoded {frames} frames, expected {expected} "
            f"({duration_s:.2f}s at {settings.fps:g} fps): truncated or corrupt source",
        )
    if abs(out.fps - settings.fps) > 1e-3:
        raise ItemFailure(FailureKind.FFMPEG, f"{clip.clip_id}: output is {out.fps} fps")
    if not out.has_audio:
        raise ItemFailure(FailureKind.FORMAT, f"{clip.clip_id}: no audio in the cut")
    try:
        with wave.open(str(audio), "rb") as w:
            wav_rate, wav_channels, samples = w.getframerate(), w.getnchannels(), w.getnframes()
    except (wave.Error, EOFError, OSError) as exc:
        raise ItemFailure(FailureKind.FORMAT, f"{clip.clip_id}: unreadable wav: {exc}") from exc
    if wav_rate != settings.audio_sample_rate_hz or wav_channels != 1:
        raise ItemFailure(
            FailureKind.FFMPEG, f"{clip.clip_id}: wav is {wav_rate} Hz x{wav_channels}"
        )
    audio_s = samples / wav_rate
    if abs(audio_s - duration_s) > 2.0 / settings.fps:
        raise ItemFailure(
            FailureKind.MISALIGNED,
            f"{clip.clip_id}: audio lasts {audio_s:.3f}s, video {duration_s:.3f}s",
        )
    return NormalizedFiles(
        video=video,
        audio=audio,
        start_s=start_s,
        end_s=end_s,
        duration_s=frames / settings.fps,
        fps=settings.fps,
        num_frames=frames,
        width=out.width,
        height=out.height,
        audio_sample_rate_hz=wav_rate,
        audio_channels=wav_channels,
        crop=crop,
    )
